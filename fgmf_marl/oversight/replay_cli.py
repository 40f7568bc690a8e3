"""``scripts/replay.py``: verify, render and report oversight logs (the logic lives here, testable).

    replay.py verify <log dir>                     exit 0 if the chain is intact, 1 naming the first bad entry
    replay.py render <episode> [-o out] [--fps]    MP4 + GIF with per-agent heatmap overlays
    replay.py report <episode | log dir> [-o out.html]

``<episode>`` is ``<log dir>/ep_000003`` (with or without ``.npz``/``.json``) or ``<log dir>:3``.
Usage errors (missing paths, bad options) exit with 2, as every fgmf-marl command.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fgmf_marl.cli import ArgumentParser, run_cli
from fgmf_marl.config import ConfigError


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


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="replay.py", description="Verify, render and report fgmf-marl oversight logs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    v = sub.add_parser("verify", help="check the manifest's hash chain and every file's SHA-256")
    v.add_argument("log_dir")
    r = sub.add_parser("render", help="MP4/GIF replay with PGCA overlays")
    r.add_argument("episode", help="<log dir>/ep_NNNNNN or <log dir>:N")
    r.add_argument("-o", "--out", help="output path without suffix (default: next to the episode)")
    r.add_argument("--fps", type=float, default=4.0)
    r.add_argument("--scale", type=int, default=4, help="pixel upscaling of the 48x48 observations")
    r.add_argument("--format", choices=["mp4", "gif", "both"], default="both")
    h = sub.add_parser("report", help="self-contained HTML report of an episode or a log directory")
    h.add_argument("target", help="<log dir>, <log dir>/ep_NNNNNN or <log dir>:N")
    h.add_argument("-o", "--out", help="output .html (default: <target>.html or <log dir>/report.html)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from fgmf_marl.oversight.store import MANIFEST, verify
        folder = Path(args.log_dir)
        if not folder.is_dir():
            raise ConfigError(f"log dir {args.log_dir!r} does not exist or is not a directory")
        if not (folder / MANIFEST).exists() and not any(folder.glob("ep_*")):
            raise ConfigError(f"{args.log_dir!r} is not an oversight log: no {MANIFEST}")
        res = verify(folder)
        print(res.message if res.ok else f"FAILED: {res.message}")
        return 0 if res.ok else 1
    if args.command == "render":
        from fgmf_marl.oversight.render import render_episode
        if args.fps <= 0 or args.scale < 1:
            raise ConfigError(f"--fps must be > 0 and --scale >= 1, got {args.fps} and {args.scale}")
        stem = resolve_episode(args.episode)
        formats = ("mp4", "gif") if args.format == "both" else (args.format,)
        try:
            paths = render_episode(stem, args.out or stem, formats=formats, fps=args.fps, scale=args.scale)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for path in paths:
            print(path)
        return 0
    from fgmf_marl.oversight.report import build_report
    target = Path(args.target)
    if not target.is_dir():
        target = resolve_episode(args.target)
        out = Path(args.out) if args.out else target.with_suffix(".html")
    else:
        out = Path(args.out) if args.out else target / "report.html"
    print(build_report(target, out))
    return 0


def entry() -> int:
    return run_cli(main, prog="replay.py")
