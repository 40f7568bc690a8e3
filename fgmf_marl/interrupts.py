"""How a job stops: on SIGTERM at once, on SIGUSR1 at its next resumable point.

SIGTERM raises :class:`Terminated` in the main thread, unwound like Ctrl-C. SIGUSR1 only records a request
(:func:`request_stop`); a long job checks it where stopping loses nothing (a training at its next rollout
boundary, after saving a checkpoint there; an evaluation after its current grid cell) and then raises
:class:`Terminated` itself. Why both: a training checkpoints every ``checkpoint_every`` steps, so a SIGTERM
loses the work since the last checkpoint (on pistonball up to an hour of FGMF training); a stop requested a
rollout ahead loses none. One home for this because the jobs' shared ``main`` skeleton
(``fgmf_marl.jobs.cli``, exit 143), the training callbacks, the evaluation grid and the experiment runner
(which raises :class:`Terminated` from its own loop, after Ray replaced the handler) all need it.
"""
from __future__ import annotations

import signal
import threading


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM; a BaseException, as KeyboardInterrupt, so no
    ``except Exception`` swallows it and every ``finally`` and ``staged_run_dir`` clean-up runs."""


def terminate(signum: int, frame: object) -> None:
    """The SIGTERM handler of every job: ignore further SIGTERMs (the clean-up must finish), raise Terminated."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


_stop = threading.Event()


def request_stop(signum: int | None = None, frame: object = None) -> None:
    """The SIGUSR1 handler of every job (callable directly, e.g. by a test): ask the job to stop at its next
    resumable point."""
    _stop.set()


def stop_requested() -> bool:
    """True once a stop was requested and not yet cleared."""
    return _stop.is_set()


def clear_stop_request() -> None:
    """Forget a stop request (the jobs' ``main`` does this when it returns, so it does not outlive the job)."""
    _stop.clear()
