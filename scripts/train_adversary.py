#!/usr/bin/env python
"""Train a PA-AD-style adversary against a frozen victim: ``python scripts/train_adversary.py --help``."""
import sys

from agents.adversary import cli

if __name__ == "__main__":
    sys.exit(cli())
