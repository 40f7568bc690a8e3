#!/usr/bin/env python
"""Certified robustness by randomised smoothing: ``python scripts/certify.py --help`` (code: ``fgmf_marl/jobs/certify.py``)."""
import sys

from fgmf_marl.jobs.certify import entry

if __name__ == "__main__":
    sys.exit(entry())
