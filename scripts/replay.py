#!/usr/bin/env python
"""Verify, render and report oversight logs; see ``fgmf_marl/oversight/replay_cli.py``."""
import sys

from fgmf_marl.oversight.replay_cli import entry

if __name__ == "__main__":
    sys.exit(entry())
