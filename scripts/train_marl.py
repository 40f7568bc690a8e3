#!/usr/bin/env python
"""Train a team of vision agents: ``python scripts/train_marl.py --help`` (code: ``fgmf_marl/jobs/train.py``)."""
import sys

from fgmf_marl.jobs.train import entry

if __name__ == "__main__":
    sys.exit(entry())
