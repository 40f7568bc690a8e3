"""Atomic file writes: readers see the old file or the complete new one, never half of one.

The one home for this in fgmf-marl: configs, run summaries, checkpoints' side files and the
oversight log all write through here (temp file in the same folder, fsync, rename, fsync folder).
A write that fails (a full disk, a read-only folder) raises :class:`WriteError` naming the path, which
the command-line skeleton (``fgmf_marl.jobs.cli``) turns into one line and exit code 2.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class WriteError(OSError):
    """An output that could not be written; ``filename`` is the path asked for, ``strerror`` the reason.

    Why: the OSError of a failed ``write()`` names no file, and a temp file's name is not the one the
    user gave, so the writer re-raises it with the path the user knows.
    """


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temp file, fsync, then rename over ``path``.

    Readers see the old file or the complete new one, never a half-written one; if ``write`` fails
    the temp file is removed and ``path`` is untouched. An OSError of the file system (no space, a
    read-only or missing folder, a file where a folder must be) is raised as :class:`WriteError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror, str(path)) from exc
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.strerror:
            raise WriteError(exc.errno, exc.strerror, str(path)) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))
