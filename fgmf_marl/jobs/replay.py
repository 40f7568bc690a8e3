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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from fgmf_marl.config import ConfigError, check_range
from fgmf_marl.jobs import cli
from fgmf_marl.oversight.render import derived_path, render_episode
from fgmf_marl.oversight.report import build_report
from fgmf_marl.oversight.store import find_logs, read_key, verify
from fgmf_marl.runs import check_output_file

PROG = "replay.py"


@dataclass
class ReplayConfig:
    """One ``replay.py`` call: the subcommand, its target and its options."""

    command: Literal["verify", "render", "report"] = "verify"
    target: str = ""                               # log dir (verify, report) or episode (render, report)
    out: str | None = None                         # render: path without suffix; report: the .html
    expect_head: str | None = None                 # verify: the head hash kept elsewhere
    log_key_file: str | None = None                # verify, report: the HMAC key file
    fps: float = 4.0                               # render
    scale: int = 4                                 # render: pixel upscaling of the observations
    format: Literal["mp4", "gif", "both"] = "both"  # render

    def validate(self) -> None:
        if not self.target:
            raise ConfigError(f"replay.py {self.command} needs a target (a log dir or <log dir>:N)")
        check_range("--fps", self.fps, 0, 1000, low_open=True)
        check_range("--scale", self.scale, 1, 64)
        if self.expect_head is not None and not re.fullmatch(r"[0-9a-f]{64}", self.expect_head):
            raise ConfigError(f"--expect-head {self.expect_head!r}: accepted: the 64 lowercase hex digits "
                              "of a head hash")


def resolve_episode(spec: str) -> Path:
    """``dir/ep_000003[.npz|.json]`` or ``dir:3`` -> the episode stem; ConfigError if absent."""
    if ":" in spec and not Path(spec).exists():
        folder, _, idx = spec.rpartition(":")
        if not idx.isdigit():
            raise ConfigError(f"episode {spec!r}: after ':' an episode number is expected, e.g. {folder}:0")
        stem = Path(folder) / f"ep_{int(idx):06d}"
    else:
        p = Path(spec)
        stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    if not stem.with_suffix(".npz").exists() or not stem.with_suffix(".json").exists():
        raise ConfigError(f"episode {spec!r} not found: expected {stem}.npz and {stem}.json "
                          "(give <log dir>/ep_NNNNNN or <log dir>:N)")
    return stem


def _shown(path: Path) -> str:
    """A folder name for the terminal: as is when printable, else Python's ascii() of it (cell names are not ours)."""
    return str(path) if str(path).isprintable() else ascii(str(path))


def replay(cfg: ReplayConfig) -> int:
    """Run one subcommand; returns the exit status (verify: 1 when a log fails)."""
    if cfg.command == "verify":
        folder = Path(cfg.target)
        logs = find_logs(folder)
        if cfg.expect_head is not None and logs != [folder]:
            raise ConfigError(f"--expect-head names one log's head, but {_shown(folder)} holds {len(logs)} logs; "
                              "verify one of them")
        key = read_key(cfg.log_key_file)
        bad = 0
        for log in logs:
            res = verify(log, expect_head=cfg.expect_head, key=key)
            bad += not res.ok
            line = res.message if res.ok else f"FAILED: {res.message}"
            print(line if logs == [folder] else f"{_shown(log)}: {line}")
        if logs != [folder]:
            print(f"{len(logs) - bad} of {len(logs)} logs OK" + (f", {bad} FAILED" if bad else ""))
        return 1 if bad else 0
    if cfg.command == "render":
        stem = resolve_episode(cfg.target)
        formats = ("mp4", "gif") if cfg.format == "both" else (cfg.format,)
        out = derived_path(stem, cfg.out)
        for fmt in formats:
            check_output_file(out.with_suffix(f".{fmt}"), "output")
        try:
            paths = render_episode(stem, out, formats=formats, fps=cfg.fps, scale=cfg.scale)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for path in paths:
            print(path)
        return 0
    target = Path(cfg.target)
    if not target.is_dir():
        target = resolve_episode(cfg.target)
        out = derived_path(target, cfg.out, ".html")
    elif find_logs(target) == [target]:
        out = derived_path(target / "report", cfg.out, ".html")
    else:
        out = derived_path(target / "report", cfg.out, ".html") if cfg.out else target / "report.html"
    check_output_file(out, "output")
    print(build_report(target, out, key=read_key(cfg.log_key_file)))
    return 0


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
