#!/usr/bin/env python
"""Explanation-quality table of a trained run; see ``fgmf_marl/attribution/explain_cli.py``."""
import sys

from fgmf_marl.attribution.explain_cli import entry

if __name__ == "__main__":
    sys.exit(entry())
