#!/usr/bin/env python
"""Evaluate checkpoints under attack: ``python scripts/evaluate.py --help`` (code: ``fgmf_marl/jobs/evaluate.py``)."""
import sys

from fgmf_marl.jobs.evaluate import entry

if __name__ == "__main__":
    sys.exit(entry())
