#!/usr/bin/env python
"""Regenerate an experiment's tables on Ray: ``python scripts/reproduce.py --help`` (code: ``fgmf_marl/jobs/reproduce.py``)."""
import sys

from fgmf_marl.jobs.reproduce import entry

if __name__ == "__main__":
    sys.exit(entry())
