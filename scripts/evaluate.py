#!/usr/bin/env python
"""Evaluate checkpoints under attack: ``python scripts/evaluate.py --help``."""
import sys

from fgmf_marl.evaluation import cli

if __name__ == "__main__":
    sys.exit(cli())
