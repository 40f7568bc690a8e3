"""The one run-directory layout of fgmf-marl.

    runs/<name>/
        config.yaml        the resolved config (every default filled in): rerun with --config
        checkpoints/       step_<timesteps>.zip (periodic) and final.zip
        tb/                TensorBoard event files
        eval/              evaluation outputs (summary.json, summary.md, CSVs, plots)

A run directory is created only after the config has been validated, and removed again if the
run fails before it wrote its first checkpoint, so bad input never leaves a half-written run.
"""
from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fgmf_marl.config import ConfigError

_STEP_RE = re.compile(r"step_(\d+)\.zip$")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / "final.zip"

    def checkpoint_at(self, timesteps: int) -> Path:
        return self.checkpoints / f"step_{timesteps}.zip"

    def latest_checkpoint(self) -> Path | None:
        """``final.zip`` if present, else the periodic checkpoint with the most timesteps."""
        if self.final_checkpoint.is_file():
            return self.final_checkpoint
        steps = [(int(m.group(1)), p) for p in self.checkpoints.glob("step_*.zip") if (m := _STEP_RE.search(p.name))]
        return max(steps)[1] if steps else None

    def has_checkpoint(self) -> bool:
        return self.latest_checkpoint() is not None


def resolve_checkpoint(path: str | Path) -> tuple[Path, RunDir | None]:
    """Accept a run directory or a checkpoint file; return the checkpoint and its run (if any)."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"run directory {str(path)!r} holds no checkpoint (expected checkpoints/final.zip or step_N.zip)")
        return ckpt, run
    if path.is_file():
        if path.suffix != ".zip":
            raise ConfigError(f"checkpoint {str(path)!r} is not a .zip file written by train_marl.py")
        parent = path.parent.parent
        return path, RunDir(parent) if (parent / "config.yaml").is_file() else None
    raise ConfigError(f"checkpoint {str(path)!r} does not exist (give a run directory or a .zip checkpoint)")


@contextmanager
def staged_run_dir(root: Path, *, resume: bool = False) -> Iterator[RunDir]:
    """Create (or, resuming, reuse) a run directory; delete a new one if the body fails early.

    "Early" means before any checkpoint exists: an interrupted long run keeps its checkpoints
    (they are what ``--resume`` continues from), a run that crashed at start-up leaves nothing.
    """
    run = RunDir(Path(root))
    if resume:
        if not run.config.is_file():
            raise ConfigError(f"cannot resume: {str(root)!r} is not a run directory (no config.yaml)")
        yield run
        return
    if run.root.exists() and any(run.root.iterdir()):
        raise ConfigError(f"run directory {str(root)!r} already exists and is not empty; use --resume or another --run-dir")
    created = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        yield run
    except BaseException:
        if not run.has_checkpoint():
            shutil.rmtree(run.root, ignore_errors=True) if created else _empty(run.root)
        raise


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
