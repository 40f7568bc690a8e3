"""``scripts/replay.py``: verify, render and report oversight logs, and its command line.

    replay.py verify <log dir | log root> [--expect-head H] [--log-key-file F]
                                                   exit 0 and print the head if the log is intact,
                                                   1 naming the first bad record
    replay.py render <episode> [-o out] [--fps]    MP4 + GIF with per-agent heatmap overlays
    replay.py report <episode | log dir | log root> [-o out.html] [--log-key-file F]

``<episode>`` is ``<log dir>/ep_000003`` (with or without ``.npz``/``.json``) or ``<log dir>:3``.
A *log root* is a folder of logs, e.g. ``evaluate.py --log-explanations DIR`` (one log per grid
cell): ``verify`` checks each and prints a line per log (exit 1 if any fails), ``report`` puts them
all on one page; both use :func:`~fgmf_marl.oversight.store.find_logs`, so they agree on what a log is.
Derived files never go into a log's hash-chained files: ``render`` and ``report`` write to
``<log dir>/replay/`` by default (``verify`` knows that folder holds derived files), and refuse an
``-o`` anywhere inside a log but its ``replay/`` (a log root's logs included). A log root's report goes
to ``<log root>/report.html``. Output paths are checked (a writable folder, not a folder, device or
pipe) before any frame is drawn.
The key file may also be named by ``$FGMF_LOG_KEY_FILE``. Usage errors (missing paths, bad options,
an unreadable key file) exit with 2, as every fgmf-marl command.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from fgmf_marl.jobs import cli
from fgmf_marl.oversight.replay import ReplayConfig, replay

PROG = cli.command_name("replay.py")


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Verify, render and report fgmf-marl oversight logs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    v = sub.add_parser("verify", help="check the manifest's hash chain, seal, HMACs and every file's SHA-256")
    v.add_argument("target", metavar="log_dir", help="the oversight log directory to verify, or a folder of logs "
                   "(e.g. evaluate.py's --log-explanations DIR: each is verified)")
    v.add_argument("--expect-head", metavar="H", help="the head hash printed when the log was "
                   "closed, kept elsewhere (default: none, the log is checked against itself)")
    v.add_argument("--log-key-file", metavar="F", help="file holding the HMAC key the log was written with "
                   "(default: $FGMF_LOG_KEY_FILE if set, else no key)")
    r = sub.add_parser("render", help="MP4/GIF replay with PGCA overlays")
    r.add_argument("target", metavar="episode", help="<log dir>/ep_NNNNNN or <log dir>:N")
    r.add_argument("-o", "--out", help="output path without suffix, not inside a log but its replay/ folder "
                   "(default: <log dir>/replay/ep_NNNNNN)")
    r.add_argument("--fps", type=float, help="frames per second (default 4)")
    r.add_argument("--scale", type=int, help="pixel upscaling of the observations (default 4)")
    r.add_argument("--format", choices=["mp4", "gif", "both"], help="video format (default both)")
    h = sub.add_parser("report", help="self-contained HTML report of an episode or a log directory")
    h.add_argument("target", help="<log dir>, a folder of logs, <log dir>/ep_NNNNNN or <log dir>:N")
    h.add_argument("-o", "--out", help="output .html, not inside a log but its replay/ folder (default: <log dir>/replay/"
                   "ep_NNNNNN.html or <log dir>/replay/report.html; a folder of logs: <folder>/report.html)")
    h.add_argument("--log-key-file", metavar="F", help="HMAC key file, to check the log's HMACs for the verdict "
                   "(default: $FGMF_LOG_KEY_FILE if set, else no key)")
    return p


def resolve_config(args: argparse.Namespace) -> ReplayConfig:
    """Defaults < flags (the subcommand's own)."""
    names = ("command", "target", "out", "expect_head", "log_key_file", "fps", "scale", "format")
    return cli.load_config(ReplayConfig, flags={n: getattr(args, n, None) for n in names})


def main(argv: Sequence[str] | None = None) -> int:
    _, cfg = cli.start(build_parser(), argv, resolve_config)
    return replay(cfg)


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/replay.py``."""
    return cli.run(main, argv, prog=PROG)
