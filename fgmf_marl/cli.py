"""What every fgmf-marl command line shares: one-line usage errors with exit code 2.

argparse prints the whole usage block before an error; our users asked for one line naming
what was wrong and what is accepted. ``ConfigError`` raised anywhere in a command (bad config
value, missing checkpoint, unknown attack) ends the same way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from fgmf_marl.config import ConfigError

USAGE_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, prog: str = "") -> int:
    """Run ``main(argv)``; a ``ConfigError`` becomes one line on stderr and exit code 2.

    argparse's own exits (``--help``, usage errors) are returned as codes too, so callers and
    tests see one convention: the return value is the process exit status.
    """
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    except ConfigError as exc:
        print(f"{prog or sys.argv[0]}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
