"""The one command-line convention of fgmf-marl, shared by every script in ``scripts/``.

Each command is a config dataclass plus ``main(argv) -> int``, which begins with :func:`start`
(parse, resolve the config, apply ``--threads``), calls the library (``fgmf_marl.teams``, the framework)
and prints:

1. ``build_parser()`` declares the command's flags; the shared ones (``--seed``, ``--device``,
   ``--threads``) come from :func:`add_runtime_flags` so they mean the same everywhere;
2. the command's ``resolve_config(args)`` calls :func:`load_config`, which turns the flags into dotted
   overrides and goes through the one config loader (:func:`fgmf_marl.config.load`: defaults < base <
   ``--config`` file < flags < ``KEY=VALUE``), so every value is type- and range-checked in one place
   before any compute starts;
3. :func:`run` wraps ``main``: a :class:`~fgmf_marl.config.ConfigError` anywhere becomes one line on
   stderr and exit code 2, as argparse's own usage errors do; SIGTERM (what ``kill``, a job
   scheduler or a container stop sends) is turned into the same unwinding as Ctrl-C, so a run
   stopped before its first checkpoint is removed either way (exit 143, Ctrl-C 130). An output
   that cannot be written (a full disk, a read-only folder: :class:`~fgmf_marl.atomic.WriteError`,
   or any OSError of :data:`WRITE_ERRNOS`) is one line and exit 2 too, after the same unwinding
   has removed what the command had half written.

argparse prints the whole usage block before an error; users asked for one line naming what was
wrong and what is accepted, which :class:`ArgumentParser` gives.
"""
from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence, TypeVar

import torch

from fgmf_marl import config as cfglib
from fgmf_marl.atomic import WriteError
from fgmf_marl.config import ConfigError
from fgmf_marl.interrupts import Terminated, clear_stop_request, request_stop, terminate

USAGE_ERROR = 2
INTERRUPTED = 128 + signal.SIGINT    # the shell's status for a process stopped by Ctrl-C
TERMINATED = 128 + signal.SIGTERM    # ... and by SIGTERM
T = TypeVar("T")
#: what an OSError means when it comes from writing, whichever writer raised it (TensorBoard's, a video encoder's)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def command_name(script: str) -> str:
    """The name a user typed: the console command's (``fgmf-evaluate``) when the process is one, else ``script``
    (``evaluate.py``: ``python scripts/evaluate.py``, and what tests calling ``main`` see). Why: usage lines and
    one-line errors should name the command that works, not a file the installed user does not have."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("fgmf-") else script


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def add_runtime_flags(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """``--device``, ``--threads`` and (with ``seed``) ``--seed``: flags every compute command shares."""
    if seed:
        parser.add_argument("--seed", type=int, help="random seed (default: the config's, 0)")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; positional ``KEY=VALUE`` overrides may stand between options.

    argparse cannot intermix positionals with subcommands, so a parser with subcommands
    (``replay.py``) parses plainly: its positionals belong to the subcommand anyway.
    """
    if parser._subparsers is not None:
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)


#: more intra-op threads than any machine has cores; torch segfaults on counts like 100000
MAX_THREADS = 1024


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads; validated here once for every command."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads={threads} must be an integer >= 1")
    if threads > MAX_THREADS:  # torch overflows or crashes the process on absurd counts
        raise ConfigError(f"--threads={threads} must be an integer <= {MAX_THREADS}")
    torch.set_num_threads(threads)


def start(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          resolve: Callable[[argparse.Namespace], T]) -> tuple[argparse.Namespace, T]:
    """The steps every command's ``main`` begins with: parse ``argv``, resolve the config with ``resolve``
    (through :func:`load_config`, validated), then apply ``--threads`` where the command has the flag.

    In this order, so a refused config leaves torch's thread count as it was; what follows (the call
    into the library and what is printed) is each command's own.
    """
    args = parse(parser, argv)
    cfg = resolve(args)
    apply_threads(getattr(args, "threads", None))
    return args, cfg


def flags_to_overrides(flags: dict[str, Any]) -> list[str]:
    """``{"ppo.n_steps": 32, "eps": [1, 2]}`` -> ``["ppo.n_steps=32", "eps=[1, 2]"]``; None means "not given".

    Values are written as JSON, which the loader reads back as YAML, so a flag and the same
    ``KEY=VALUE`` override are one and the same thing.
    """
    # ensure_ascii=False: JSON's \ud800-style escapes of characters beyond the BMP read back as broken halves
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in flags.items() if value is not None]


def load_config(cls: type[T], *, config_file: str | Path | None = None, flags: dict[str, Any] | None = None,
                overrides: Sequence[str] = (), base: dict | None = None) -> T:
    """The command's config: defaults < ``base`` < ``config_file`` < ``flags`` < ``overrides``, validated."""
    return cfglib.load(cls, config_file, flags_to_overrides(flags or {}) + list(overrides), base=base)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, prog: str = "") -> int:
    """Run ``main(argv)``; a ``ConfigError`` or a failed write becomes one line on stderr and exit code 2.

    argparse's own exits (``--help``, usage errors) are returned as codes too, so callers and
    tests see one convention: the return value is the process exit status. Ctrl-C and SIGTERM
    unwind ``main`` (removing a run without checkpoints) and return 130 and 143; SIGUSR1 asks the job to stop
    at its next resumable point (``fgmf_marl.interrupts``), and it then returns 143 too.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    previous_usr1 = signal.signal(signal.SIGUSR1, request_stop) if in_main_thread else None
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    except ConfigError as exc:
        print(f"{prog or sys.argv[0]}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as exc:
        if not isinstance(exc, WriteError) and exc.errno not in WRITE_ERRNOS:
            raise
        print(f"{prog or sys.argv[0]}: error: cannot write {exc.filename or 'the output'}: {exc.strerror}",
              file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog or sys.argv[0]}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Terminated:
        print(f"{prog or sys.argv[0]}: terminated", file=sys.stderr)
        return TERMINATED
    finally:
        clear_stop_request()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGUSR1, previous_usr1)
