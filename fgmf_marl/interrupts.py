"""How a job stops on SIGTERM: :class:`Terminated`, raised in the main thread and unwound like Ctrl-C.

One home for it because both the jobs' shared ``main`` skeleton (``fgmf_marl.jobs.cli``, exit 143) and the
experiment runner (which must raise it from its own loop, after Ray replaced the handler) need it.
"""
from __future__ import annotations

import signal


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM; a BaseException, as KeyboardInterrupt, so no
    ``except Exception`` swallows it and every ``finally`` and ``staged_run_dir`` clean-up runs."""


def terminate(signum: int, frame: object) -> None:
    """The SIGTERM handler of every job: ignore further SIGTERMs (the clean-up must finish), raise Terminated."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated
