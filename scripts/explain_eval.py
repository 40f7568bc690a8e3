#!/usr/bin/env python
"""Explanation-quality table of a trained run: ``python scripts/explain_eval.py --help`` (code: ``fgmf_marl/jobs/explain.py``)."""
import sys

from fgmf_marl.jobs.explain import entry

if __name__ == "__main__":
    sys.exit(entry())
