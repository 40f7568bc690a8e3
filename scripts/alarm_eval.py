#!/usr/bin/env python
"""How well the attack alarm separates attacked steps from clean ones: ``python scripts/alarm_eval.py --help`` (code: ``fgmf_marl/jobs/alarms.py``)."""
import sys

from fgmf_marl.jobs.alarms import entry

if __name__ == "__main__":
    sys.exit(entry())
