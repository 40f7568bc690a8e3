#!/usr/bin/env python
"""Train a PA-AD-style adversary against a frozen team: ``python scripts/train_adversary.py --help`` (code: ``fgmf_marl/jobs/adversary.py``)."""
import sys

from fgmf_marl.jobs.adversary import entry

if __name__ == "__main__":
    sys.exit(entry())
