"""The one run-directory layout of fgmf-marl.

    runs/<name>/
        config.yaml        the resolved config (every default filled in): rerun with --config
        checkpoints/       step_<timesteps>.zip (periodic) and final.zip; beside each periodic one,
                           step_<timesteps>.resume.npz: the random streams and env state --resume
                           needs to continue exactly (fgmf_marl.teams.checkpoints), and
                           step_<timesteps>.time.json: the training seconds spent up to it, so a
                           resumed run reports its whole training time
        tb/                TensorBoard event files
        eval/              evaluation outputs (summary.json, summary.md, CSVs, plots)

An evaluation's output folder (``evaluate.py --out``) is staged the same way; until it finishes it holds
``config.yaml`` and ``cells/``, one JSON file per finished grid cell, which ``evaluate.py --resume`` continues
from (its progress, as checkpoints are a training's).

A run directory is created only after the config has been validated, and removed again if the
run fails (or is interrupted: Ctrl-C, SIGTERM) before it made progress (a checkpoint, a finished cell), so bad
input never leaves a half-written run. What a ``kill -9`` before that leaves (only the files a run writes, no
progress) is taken over by the next run into the same directory.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fgmf_marl.config import ConfigError

_STEP_RE = re.compile(r"step_(\d+)\.zip$")
#: what a run writes before its first checkpoint or finished cell (evaluate.py writes config.yaml first, too)
RUN_FILES = frozenset({"config.yaml", "tb", "eval", "checkpoints", "cells"})


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
    def cells(self) -> Path:
        """An unfinished evaluation's finished grid cells (``fgmf_marl.teams.grid.evaluate``)."""
        return self.root / "cells"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / "final.zip"

    def checkpoint_at(self, timesteps: int) -> Path:
        return self.checkpoints / f"step_{timesteps}.zip"

    @staticmethod
    def resume_state_of(checkpoint: Path) -> Path:
        """Where the exact-resume state of ``checkpoint`` lives (beside it)."""
        return checkpoint.with_name(checkpoint.stem + ".resume.npz")

    @staticmethod
    def training_time_of(checkpoint: Path) -> Path:
        """Where the training seconds spent up to ``checkpoint`` are kept (beside it)."""
        return checkpoint.with_name(checkpoint.stem + ".time.json")

    def latest_checkpoint(self) -> Path | None:
        """``final.zip`` if present, else the periodic checkpoint with the most timesteps."""
        if self.final_checkpoint.is_file():
            return self.final_checkpoint
        steps = [(int(m.group(1)), p) for p in self.checkpoints.glob("step_*.zip") if (m := _STEP_RE.search(p.name))]
        return max(steps)[1] if steps else None

    def has_checkpoint(self) -> bool:
        return self.latest_checkpoint() is not None

    def has_progress(self) -> bool:
        """A checkpoint or a finished evaluation cell: what ``--resume`` continues from."""
        return self.has_checkpoint() or any(self.cells.glob("*.json"))


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


def check_output_dir(path: str | Path, what: str = "output folder") -> None:
    """A one-line ConfigError unless ``path`` is a folder, or can be made one, that we can write into.

    Commands call it before any compute, so a typo in ``--out`` or ``--run-dir`` costs nothing;
    writability is probed by creating (and removing) a temporary folder, the one test that also
    holds for root and for read-only mounts.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is an existing file; accepted: a folder path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {str(path)!r} lies under the file {str(existing)!r}; accepted: a folder path")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({str(existing)!r}: {exc.strerror}); "
                          "accepted: a folder you can write to") from None


def check_output_file(path: str | Path, what: str = "output file") -> None:
    """A one-line ConfigError unless ``path`` is a regular file, or a new name, in a folder we can write into.

    A folder, device or pipe at ``path`` is refused: the atomic writer renames its temp file over the
    path, which would fail on a folder and replace a device node such as ``/dev/null`` with a file.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is an existing folder; accepted: a file path")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} is not a regular file (a device or a pipe); accepted: a file path")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {str(path)!r} lies under the file {str(existing)!r}; accepted: a path in a folder")
    check_output_dir(path.parent, f"{what} {str(path)!r}: its folder")


def _abandoned(run: RunDir) -> bool:
    """True for a run killed before it made progress: no checkpoint or finished cell, only the files a run writes.

    The temp files of an atomic write a kill interrupted (``.<name>.<random>.tmp``) count as the run's.
    """
    names = {p.name for p in run.root.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    return not run.has_progress() and names <= RUN_FILES


@contextmanager
def staged_run_dir(root: Path, *, resume: bool = False, flag: str = "--run-dir") -> Iterator[RunDir]:
    """Create (or, resuming, reuse) a run directory; delete a new one if the body fails early.

    "Early" means before any progress exists (a checkpoint, an evaluation's finished cell): an interrupted
    long run keeps its progress (what ``--resume`` continues from), a run that crashed at start-up leaves
    nothing. A folder that holds no progress and only what a run writes (``config.yaml``, ``tb/``, ``eval/``,
    ``checkpoints/``, ``cells/``: what ``kill -9`` leaves) is emptied and taken over; resuming such a folder is
    refused with a pointer to rerun without ``--resume``, since there is nothing to continue from. Any other
    content is refused. ``flag`` names the option that chose the folder, for the error messages.
    """
    run = RunDir(Path(root))
    if resume:
        if not run.config.is_file():
            raise ConfigError(f"cannot resume: {str(root)!r} is not a run directory (no config.yaml)")
        if not run.has_progress():
            raise ConfigError(f"cannot resume: {str(root)!r} holds no checkpoint or finished cell (it was stopped "
                              "before its first one); rerun without --resume to start it from zero")
        yield run
        return
    check_output_dir(run.root, "run directory")
    if run.root.exists() and any(run.root.iterdir()):
        if not _abandoned(run):
            raise ConfigError(f"run directory {str(root)!r} already exists and is not empty; use --resume or "
                              f"another {flag}")
        _empty(run.root)
        run.root.rmdir()
    created = not run.root.exists()
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run directory {str(root)!r} cannot be created: {exc.strerror}") from None
    try:
        yield run
    except BaseException:
        if not run.has_progress():
            shutil.rmtree(run.root, ignore_errors=True) if created else _empty(run.root)
        raise


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
