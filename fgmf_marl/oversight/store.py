"""The oversight log on disk: an open format, atomic writes, and a hash-chained manifest.

Layout of a log directory (format ``fgmf-oversight/1``)::

    <log dir>/
      manifest.jsonl        one JSON object per line, one line per episode, in write order
      ep_000000.npz         arrays of episode 0 (numpy ``savez_compressed``; open with ``np.load``)
      ep_000000.json        metadata, per-step x agent records and summary scores of episode 0
      ...

Manifest entry (keys sorted when hashed)::

    {"index": i, "episode": "ep_000000", "files": {"ep_000000.json": "<sha256>", "ep_000000.npz": "<sha256>"},
     "summary": {...}, "prev_hash": "<entry_hash of entry i-1, or 64 zeros>", "entry_hash": "<sha256>"}

``entry_hash = sha256(json.dumps(entry without entry_hash, sort_keys=True, separators=(",", ":")))``.
Because each entry hashes its predecessor's hash, editing a file (its sha256 changes), editing an entry,
removing an entry or reordering entries breaks the chain at the first affected entry, which
:func:`verify` names. The chain cannot stop someone who rewrites the whole manifest from the tampered
point on; for that, record the head hash (``verify`` prints it) somewhere else, e.g. in a run summary.

Arrays in ``ep_*.npz`` (T steps, L logged steps, N agents, A actions, C x H x W images):

==================  ==============  =========================================================
name                shape, dtype    meaning
==================  ==============  =========================================================
actions             (T, N) int64    action taken (on the observation the policy saw)
clean_actions       (T, N) int64    greedy action on the clean observation
greedy_actions      (T, N) int64    greedy action on the seen observation
probs               (T, N, A) f32   action probabilities on the seen observation
values              (T, N) f32      value estimate on the seen observation
rewards             (T, N) f32      reward of the step
linf                (T, N) f32      ||seen - clean||_inf in [0, 1] units (x 255 for /255 units)
flipped             (T, N) bool     greedy action on seen differs from the clean greedy action
logged_t            (L,) int64      step indices that carry images and explanations (every k-th)
clean_obs           (L, N, C, H, W) uint8   the clean observation
seen_obs            (L, N, C, H, W) f16     what the policy saw, in [0, 1]
pgca_P, pgca_G      (L, N, H, W) f16        PGCA parts (perturbation, Grad-CAM++), in [0, 1]
pgca_consensus      (L, N, H, W) f16        geometric-mean consensus
pgca_final          (L, N, H, W) f16        smoothed, contrast-enhanced map shown to reviewers
agreement           (L, N) f32              Spearman agreement of P and G, in [-1, 1]
topk_iou            (L, N) f32              top-k cell IoU of P and G, in [0, 1]
sgam_mask           (L, N, H, W) f16        SGAM keep-mask (only when the policy has SGAM)
relevance           (L, N, H, W) bool       ground-truth relevance (native env only)
frames              (L, h, w, 3) uint8      global frame when the agents observed (only with a frame source)
==================  ==============  =========================================================
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fgmf_marl.atomic import atomic_write_bytes

FORMAT = "fgmf-oversight/1"
MANIFEST = "manifest.jsonl"
GENESIS = "0" * 64


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "entry_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(log_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(log_dir) / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


class LogWriter:
    """Appends episodes to a log directory: files first, then the manifest entry (both atomic)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries = read_manifest(self.dir)
        bad = verify(self.dir)
        if not bad.ok:
            raise ValueError(f"refusing to append to oversight log {str(self.dir)!r}: {bad.message}")

    @property
    def head(self) -> str:
        return self.entries[-1]["entry_hash"] if self.entries else GENESIS

    def append(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
        """Write one episode (``arrays`` -> npz, ``meta`` -> json) and chain it into the manifest."""
        index = len(self.entries)
        name = f"ep_{index:06d}"
        meta = _jsonable({"format": FORMAT, "episode": name, **meta})
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(self.dir / f"{name}.npz", buf.getvalue())
        atomic_write_bytes(self.dir / f"{name}.json", json.dumps(meta, indent=1).encode())
        entry: dict[str, Any] = {
            "index": index, "episode": name,
            "files": {f"{name}.json": sha256_file(self.dir / f"{name}.json"),
                      f"{name}.npz": sha256_file(self.dir / f"{name}.npz")},
            "summary": meta.get("summary", {}), "prev_hash": self.head,
        }
        entry["entry_hash"] = entry_hash(entry)
        lines = [json.dumps(e, sort_keys=True) for e in [*self.entries, entry]]
        atomic_write_bytes(self.dir / MANIFEST, ("\n".join(lines) + "\n").encode())
        self.entries.append(entry)
        return entry


@dataclass
class VerifyResult:
    ok: bool
    n_entries: int
    message: str
    first_bad: int | None = None   # manifest index (or line) of the first bad entry
    head: str = GENESIS            # entry_hash of the last good entry


def verify(log_dir: str | Path) -> VerifyResult:
    """Check every manifest entry in order: index, chain link, entry hash, and file hashes."""
    folder = Path(log_dir)
    path = folder / MANIFEST
    if not path.exists():
        listed = sorted(p.name for p in folder.glob("ep_*"))
        if listed:
            return VerifyResult(False, 0, f"no {MANIFEST} but episode files exist ({listed[0]}, ...)", 0)
        return VerifyResult(True, 0, "empty log (no episodes)")
    prev = GENESIS
    listed: set[str] = set()
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            name = entry["episode"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return VerifyResult(False, i, f"entry {i}: manifest line {i + 1} is not a valid entry", i, prev)
        where = f"entry {i} ({name})"
        if entry.get("index") != i:
            return VerifyResult(False, i, f"{where}: index is {entry.get('index')}, expected {i} "
                                          "(entries removed or reordered)", i, prev)
        if entry.get("prev_hash") != prev:
            return VerifyResult(False, i, f"{where}: chain broken, prev_hash does not match entry {i - 1} "
                                          "(an earlier entry was removed, reordered or edited)", i, prev)
        if entry_hash(entry) != entry.get("entry_hash"):
            return VerifyResult(False, i, f"{where}: entry hash mismatch (the manifest entry was edited)", i, prev)
        for fname, digest in sorted(entry.get("files", {}).items()):
            fpath = folder / fname
            if not fpath.exists():
                return VerifyResult(False, i, f"{where}: file {fname} is missing", i, prev)
            if sha256_file(fpath) != digest:
                return VerifyResult(False, i, f"{where}: file {fname} was modified (sha256 mismatch)", i, prev)
            listed.add(fname)
        prev = entry["entry_hash"]
    for extra in sorted(p.name for p in folder.glob("ep_*")):
        if extra not in listed:
            return VerifyResult(False, len(lines), f"file {extra} is not listed in the manifest "
                                                   "(an interrupted write or an inserted file)", len(lines), prev)
    return VerifyResult(True, len(lines), f"OK: {len(lines)} episodes, chain intact, head {prev}", None, prev)


@dataclass
class Episode:
    """One logged episode: ``arrays`` (lazy-loaded npz, as dict) and ``meta`` (the JSON)."""

    name: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def n_agents(self) -> int:
        return int(self.meta["n_agents"])


def load_episode(path: str | Path) -> Episode:
    """Load an episode from ``<dir>/ep_XXXXXX`` (with or without extension, .npz or .json)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if not npz.exists() or not js.exists():
        raise FileNotFoundError(f"episode {str(stem)!r} not found: expected {npz.name} and {js.name}")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    return Episode(stem.name, arrays, json.loads(js.read_text()))


def list_episodes(log_dir: str | Path) -> list[Path]:
    """Episode stems in manifest order."""
    folder = Path(log_dir)
    return [folder / e["episode"] for e in read_manifest(folder)]
