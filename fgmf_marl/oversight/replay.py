"""Replaying oversight logs: verify their chains, render an episode, or write the HTML report of a log or a folder
of logs; ``scripts/replay.py`` is its command line."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fgmf_marl.config import ConfigError, check_range
from fgmf_marl.oversight.render import derived_path, render_episode
from fgmf_marl.oversight.report import build_report
from fgmf_marl.oversight.store import alarm_line, find_logs, read_key, verify
from fgmf_marl.runs import check_output_file


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
            alarms = alarm_line(log) if res.ok else None
            line += f"; {alarms}" if alarms else ""
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
