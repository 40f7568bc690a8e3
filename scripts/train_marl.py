#!/usr/bin/env python
"""Train a team of vision agents: ``python scripts/train_marl.py --help``."""
import sys

from agents.train_cli import cli

if __name__ == "__main__":
    sys.exit(cli())
