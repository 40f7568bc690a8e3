#!/usr/bin/env python
"""Verify, render and report oversight logs: ``python scripts/replay.py --help`` (code: ``fgmf_marl/jobs/replay.py``)."""
import sys

from fgmf_marl.jobs.replay import entry

if __name__ == "__main__":
    sys.exit(entry())
