"""The oversight log on disk: an open format, atomic writes, a hash-chained, sealed (optionally keyed) manifest.

Layout of a log directory (format ``fgmf-oversight/2``)::

    <log dir>/
      manifest.jsonl        one JSON record per line: an "episode" record per episode, in write order,
                            and a "seal" record each time a run closes the log
      ep_000000.npz         arrays of episode 0 (a zip of ``.npy`` files as ``savez_compressed``; ``np.load``)
      ep_000000.json        metadata, per-step x agent records and summary scores of episode 0
      ...
      quarantine/1/         files of an interrupted write, moved aside when the log was next opened
      replay/               derived files (``replay.py render`` videos, ``report`` pages): not part of the
                            chain, never read back, ignored by :func:`verify` (which says they are there)

A log is a folder holding a manifest or an episode file (:func:`holds_log`). A folder holding no log
itself but logs in sub-folders (``evaluate.py --log-explanations DIR`` writes one per grid cell) is a
*log root*: :func:`find_logs` names them, and ``replay.py verify`` and ``report`` handle each of them.

Format ``fgmf-oversight/1`` manifests (records without ``kind``, no seal) do not verify: record again.

Manifest records (``canonical(r) = json.dumps(r without "entry_hash" and "hmac", sort_keys=True,
separators=(",", ":"))``)::

    {"kind": "episode", "index": i, "episode": "ep_%06d" % i,
     "files": {"ep_%06d.json" % i: "<sha256>", "ep_%06d.npz" % i: "<sha256>"}, "summary": {...},
     "prev_hash": "<entry_hash of the previous record, or 64 zeros>", "entry_hash": "<sha256(canonical)>",
     "hmac": "<HMAC-SHA256(key, canonical)>"  (only when the log is written with a key)}
    {"kind": "seal", "count": <episodes before it>, "prev_hash": ..., "entry_hash": ..., "hmac": ...}

The *head* of a log is the ``entry_hash`` of its last record: it commits to every record and every
file before it. :meth:`LogWriter.close` writes the seal and returns the head; keep it elsewhere
(``results.json``, the run summary) and check it with ``verify(..., expect_head=H)``. A log belongs
to one run: :class:`LogWriter` refuses a folder that holds a log unless ``append=True``; an appending
run chains its episodes on after the earlier seal, and its own seal supersedes that one.

What :func:`verify` detects (sha256 is assumed collision resistant; HMAC keys are assumed secret):

* Always: a changed, missing, swapped, extra or symlinked ``ep_*`` file; an edited record, or a
  removed, reordered or inserted record, unless the attacker recomputed the chain from that point
  (an index, name, ``prev_hash`` or ``entry_hash`` mismatch); a record whose ``files`` is not exactly
  its own ``.json`` and ``.npz``; names that point outside the log (``..``, absolute, symlinks);
  records after a seal other than episodes; a seal whose count or chain link does not match
  (e.g. the last episode deleted, files and line, from a sealed log); a log whose records mix
  HMACs and none. An unsealed log (an interrupted run, or one whose seal was removed along with
  its tail) verifies but is reported "NOT SEALED: tail truncation cannot be detected".
* Without a key, nothing stops someone who rewrites the log from any point and recomputes the
  chain and the seal: a forged appended episode, an edited, removed or reordered episode, or a
  truncated tail then verify, unless the head kept elsewhere is given (``expect_head``).
* With the key: every record must carry a valid HMAC, so any rewrite, forged or appended record,
  re-seal, or stripped HMAC fails without the key. Still undetected without ``expect_head``:
  cutting the log back to an earlier record (reported "NOT SEALED" unless the cut lands on an
  earlier run's seal), and swapping in a whole other log written with the same key. A keyed log
  verified without the key says its HMACs were not checked.
* With ``expect_head``: any change at all since that head was printed (edits, removal, reorder,
  append, truncation), with or without a key.

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
evidence            (L, N) f32              largest drop of the target score one segment's removal causes (>= 0; NaN for grid P)
sgam_mask           (L, N, H, W) f16        SGAM keep-mask (only when the policy has SGAM)
relevance           (L, N, H, W) bool       ground-truth relevance (native env only)
frames              (L, h, w, 3) uint8      global frame when the agents observed (only with a frame source)
==================  ==============  =========================================================
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fgmf_marl.atomic import atomic_write_bytes
from fgmf_marl.config import ConfigError

FORMAT = "fgmf-oversight/2"
MANIFEST = "manifest.jsonl"
QUARANTINE = "quarantine"
DERIVED = "replay"
GENESIS = "0" * 64
KEY_ENV = "FGMF_LOG_KEY_FILE"
MIN_KEY_BYTES = 16
#: the only names a log may refer to: an episode stem or one of its two files
_NAME = re.compile(r"ep_\d{6}(\.json|\.npz)?")
_log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed and HMAC'd: the record without ``entry_hash`` and ``hmac``."""
    body = {k: v for k, v in record.items() if k not in ("entry_hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def record_hmac(record: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(record), hashlib.sha256).hexdigest()


def read_key(path: str | None) -> bytes | None:
    """The HMAC key in file ``path``, else in the file named by ``$FGMF_LOG_KEY_FILE``, else None.

    Surrounding whitespace is stripped, so keys written by ``echo`` and ``printf`` agree; a key is
    kept in a file (not on the command line) so it stays out of shell history and ``ps``.
    """
    source = path or os.environ.get(KEY_ENV) or None
    if source is None:
        return None
    where = f"log key file {source!r}" + ("" if path else f" (from ${KEY_ENV})")
    try:
        key = Path(source).read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist; give a file holding the key "
                          f"(--log-key-file or ${KEY_ENV})") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror}); give a readable file holding the key") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{where} holds {len(key)} bytes; accepted: a key of at least {MIN_KEY_BYTES} bytes, "
                          "e.g. from `head -c 32 /dev/urandom | base64 > FILE`")
    return key


def log_path(folder: str | Path, name: Any) -> Path:
    """``folder / name`` for a name a log may use (``ep_NNNNNN[.json|.npz]``, not a symlink); else ConfigError.

    Names from a manifest are data from whoever wrote the log: this keeps every read inside it.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"oversight log {str(folder)!r} names {_show(name)}; accepted: ep_NNNNNN, "
                          "ep_NNNNNN.json, ep_NNNNNN.npz inside the log")
    path = Path(folder) / name
    if path.is_symlink():
        raise ConfigError(f"oversight log {str(folder)!r}: {name} is a symlink; log files must be plain files")
    return path


def _show(value: Any) -> str:
    """A log-supplied value as safe, short, one-line text for messages."""
    return value if isinstance(value, str) and _NAME.fullmatch(value) else ascii(value)[:60]


def _manifest_lines(folder: Path) -> list[str]:
    path = folder / MANIFEST
    if path.is_symlink():
        raise ConfigError(f"{path} is a symlink; log files must be plain files")
    if not path.exists():
        return []
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a manifest is JSON lines") from None


def read_records(log_dir: str | Path) -> list[dict[str, Any]]:
    """All manifest records in order (episodes and seals); ConfigError naming the line if one is not a record."""
    path = Path(log_dir) / MANIFEST
    records = []
    for i, line in enumerate(_manifest_lines(Path(log_dir))):
        record = _parse(line)
        if record is None:
            raise ConfigError(f"{path} line {i + 1}: not a manifest record "
                              "(a JSON object with kind 'episode' or 'seal')")
        records.append(record)
    return records


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("kind") in ("episode", "seal") else None


def read_manifest(log_dir: str | Path) -> list[dict[str, Any]]:
    """The episode records in order (seal records left out)."""
    return [r for r in read_records(log_dir) if r["kind"] == "episode"]


def alarm_line(log_dir: str | Path) -> str | None:
    """One line on the attack alarms the log's episodes raised, from the manifest's summaries, or None for a log
    written without an alarm. Read it only after :func:`verify` passed: the summaries are as trustworthy as the chain."""
    summaries = [r.get("summary") for r in read_manifest(log_dir)]
    counts = [s["alarms"] for s in summaries if isinstance(s, dict) and isinstance(s.get("alarms"), int)]
    if not counts:
        return None
    firsts = [s["first_alarm_t"] for s in summaries
              if isinstance(s, dict) and isinstance(s.get("first_alarm_t"), int) and not isinstance(s["first_alarm_t"], bool)]
    earliest = f", the earliest at step {min(firsts)}" if firsts else ""
    flagged = sum(isinstance(s, dict) and s.get("episode_alarm") is True for s in summaries)
    return (f"alarms: {sum(counts)} agent-steps in {sum(c > 0 for c in counts)} of {len(counts)} episodes"
            f"{earliest}; {flagged} episode alarms")


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy arrays and scalars as lists and numbers, non-finite floats as null."""
    kind = type(obj)
    if kind is float:   # the common leaves first: an episode's records hold thousands
        return obj if math.isfinite(obj) else None
    if kind is int or kind is bool or kind is str or obj is None:
        return obj
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


def holds_log(folder: str | Path) -> bool:
    """True when ``folder`` already holds an oversight log (a manifest or an ``ep_NNNNNN.json``/``.npz`` file).

    Derived files (``ep_000003.mp4`` in ``replay/``) do not make a folder a log.
    """
    folder = Path(folder)
    return (folder / MANIFEST).exists() or any(_NAME.fullmatch(p.name) for p in folder.glob("ep_*.*"))


def find_logs(folder: str | Path) -> list[Path]:
    """The logs ``folder`` stands for: ``[folder]`` if it holds a log, else its sub-folders that hold one, sorted.

    ConfigError (one line) when it is not a directory or neither it nor a sub-folder holds a log, so
    ``verify`` and ``report`` agree on what a log is. Symlinked sub-folders are not followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"log dir {str(folder)!r} does not exist or is not a directory")
    if holds_log(folder):
        return [folder]
    logs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and holds_log(p))
    if not logs:
        raise ConfigError(f"{str(folder)!r} is not an oversight log: no {MANIFEST}, and no sub-folder holds one")
    return logs


def _quarantine_unfinished(folder: Path) -> str | None:
    """Move the files of an interrupted write into ``quarantine/<n>/``; the one-line report, or None.

    Only what a crash of :meth:`LogWriter.append` can leave is moved: the next episode's files
    (written, no manifest line) and hidden temp files. Anything else is left for :func:`verify`.
    """
    n = len(read_manifest(folder))
    orphans = [p for p in (folder / f"ep_{n:06d}.json", folder / f"ep_{n:06d}.npz") if p.exists() or p.is_symlink()]
    temps = sorted(folder.glob(".*.tmp"))
    if not orphans and not temps:
        return None
    root = folder / QUARANTINE
    k = 1
    while (root / str(k)).exists():
        k += 1
    dest = root / str(k)
    dest.mkdir(parents=True)
    for p in orphans + temps:
        p.rename(dest / p.name)
    what = [f"the unfinished episode ep_{n:06d} (files written, no manifest line)"] if orphans else []
    what += [f"{len(temps)} temp file(s)"] if temps else []
    return (f"oversight log {str(folder)!r}: an earlier run was interrupted; moved {' and '.join(what)} "
            f"into {QUARANTINE}/{k}")


#: zlib level of the episode files: level 1 compresses the float16 maps and images ~4x faster than numpy's
#: default (6) for files ~18 % larger, and the log is written while the evaluation waits
NPZ_COMPRESSLEVEL = 1


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` (what ``np.savez_compressed`` writes, at ``NPZ_COMPRESSLEVEL``;
    ``np.load`` reads it), never pickling an object array."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=NPZ_COMPRESSLEVEL) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


class LogWriter:
    """Writes one run's episodes into a log folder (files first, then the manifest line, both atomic).

    A folder that already holds a log is refused unless ``append`` (so a log and its run's summary
    count the same episodes). On open, an interrupted write is quarantined (reported in
    ``self.recovered`` and as a logging warning) and the log must then verify, with ``key`` when
    given; a keyed log can only be appended to with its key. ``close()`` seals the log and returns
    its head hash, which the caller prints and records.
    """

    def __init__(self, log_dir: str | Path, *, append: bool = False, key: bytes | None = None) -> None:
        self.dir = Path(log_dir)
        self.key = key
        if not append and holds_log(self.dir):
            raise ConfigError(f"oversight log folder {str(self.dir)!r} already holds a log; give --append to add "
                              "to it, or choose a new folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.recovered = _quarantine_unfinished(self.dir)
        if self.recovered:
            _log.warning(self.recovered)
        res = verify(self.dir, key=key)
        if not res.ok:
            raise ConfigError(f"refusing to append to oversight log {str(self.dir)!r}: {res.message}")
        if res.keyed and key is None:
            raise ConfigError(f"oversight log {str(self.dir)!r} carries HMACs; give its key "
                              f"(--log-key-file or ${KEY_ENV}) to append to it")
        self.records = read_records(self.dir)
        self._lines = [json.dumps(r, sort_keys=True) for r in self.records]   # the manifest's lines, encoded once

    @property
    def head(self) -> str:
        """The entry_hash of the last record (GENESIS for an empty log)."""
        return self.records[-1]["entry_hash"] if self.records else GENESIS

    @property
    def n_episodes(self) -> int:
        return sum(r["kind"] == "episode" for r in self.records)

    def append(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
        """Write one episode (``arrays`` -> npz, ``meta`` -> json) and chain it into the manifest."""
        index = self.n_episodes
        name = f"ep_{index:06d}"
        meta = _jsonable({"format": FORMAT, "episode": name, **meta})
        files = {f"{name}.npz": npz_bytes(arrays), f"{name}.json": json.dumps(meta, indent=1).encode()}
        for fname, data in files.items():
            atomic_write_bytes(self.dir / fname, data)
        return self._commit({
            "kind": "episode", "index": index, "episode": name,
            "files": {fname: hashlib.sha256(data).hexdigest() for fname, data in sorted(files.items())},
            "summary": meta.get("summary", {}), "prev_hash": self.head,
        })

    def close(self) -> str:
        """Seal the log (episode count + chain link, HMAC'd when keyed) and return its head hash.

        Idempotent: a log whose last record is a seal is not sealed again.
        """
        if not self.records or self.records[-1]["kind"] != "seal":
            self._commit({"kind": "seal", "count": self.n_episodes, "prev_hash": self.head})
        return self.head

    def _commit(self, record: dict[str, Any]) -> dict[str, Any]:
        record["entry_hash"] = entry_hash(record)
        if self.key is not None:
            record["hmac"] = record_hmac(record, self.key)
        lines = self._lines + [json.dumps(record, sort_keys=True)]
        atomic_write_bytes(self.dir / MANIFEST, ("\n".join(lines) + "\n").encode())
        self.records.append(record)
        self._lines = lines
        return record


@dataclass
class VerifyResult:
    ok: bool
    n_entries: int                 # episodes in the log (up to the first bad record)
    message: str                   # one line: "OK: ..." or what is wrong and where
    first_bad: int | None = None   # 0-based manifest line of the first bad record
    head: str = GENESIS            # entry_hash of the last good record
    sealed: bool = False           # the last record is a seal
    keyed: bool = False            # the records carry HMACs


def _problem(folder: Path, rec: dict[str, Any], n_eps: int, prev: str, after_seal: bool,
             keyed: bool, key: bytes | None) -> str | None:
    """What is wrong with record ``rec`` given the records before it, or None.

    Checked in this order: where the record may stand, then its chain link and hashes, then its HMAC,
    then (for an episode) its files, so the message names the first thing an attacker changed.
    """
    name = f"ep_{n_eps:06d}"
    if rec["kind"] == "seal":
        if after_seal:
            return "a seal follows a seal (after a seal only episodes may follow)"
        if rec.get("count") != n_eps:
            return f"seal counts {_show(rec.get('count'))} episodes, the log has {n_eps} before it"
    else:
        if rec.get("index") != n_eps:
            return f"index is {_show(rec.get('index'))}, expected {n_eps} (entries removed or reordered)"
        if rec.get("episode") != name:
            return f"episode is named {_show(rec.get('episode'))}, expected {name}"
        if not isinstance(rec.get("files"), dict) or sorted(rec["files"]) != [f"{name}.json", f"{name}.npz"]:
            return f"files must be exactly {name}.json and {name}.npz, got {_show(rec.get('files'))}"
    if ("hmac" in rec) != keyed:
        return "has no HMAC but earlier records do" if keyed else "has an HMAC but earlier records do not"
    if rec.get("prev_hash") != prev:
        return "chain broken, prev_hash does not match the previous record (a record was removed, reordered or edited)"
    if entry_hash(rec) != rec.get("entry_hash"):
        return "entry hash mismatch (the manifest record was edited)"
    if key is not None and not keyed:
        return "no HMAC, but a key was given (the log was written without a key, or its HMACs were stripped)"
    if key is not None and not hmac.compare_digest(str(rec["hmac"]), record_hmac(rec, key)):
        return "HMAC mismatch (edited and rechained without the key, or the wrong key)"
    if rec["kind"] == "seal":
        return None
    for fname, digest in sorted(rec["files"].items()):
        try:
            path = log_path(folder, fname)
        except ConfigError as exc:
            return str(exc)
        if not path.is_file():
            return f"file {fname} is missing"
        if sha256_file(path) != digest:
            return f"file {fname} was modified (sha256 mismatch)"
    return None


def verify(log_dir: str | Path, *, expect_head: str | None = None, key: bytes | None = None) -> VerifyResult:
    """Check every manifest record in order, the files they list, the seal, and optionally the head.

    See the module docstring for what is detected with and without ``key`` and ``expect_head``.
    Never modifies the log.
    """
    folder = Path(log_dir)
    try:
        lines = _manifest_lines(folder)
    except ConfigError as exc:
        return VerifyResult(False, 0, str(exc), 0)
    prev, n_eps, listed, hashes = GENESIS, 0, set(), []
    keyed: bool | None = None
    sealed = False
    for i, line in enumerate(lines):
        rec = _parse(line)
        if rec is None:
            return VerifyResult(False, n_eps, f"entry {i}: manifest line {i + 1} is not a manifest record "
                                              "(a JSON object with kind 'episode' or 'seal')", i, prev)
        keyed = ("hmac" in rec) if keyed is None else keyed
        problem = _problem(folder, rec, n_eps, prev, sealed, keyed, key)
        label = "seal" if rec["kind"] == "seal" else _show(rec.get("episode"))
        if problem:
            return VerifyResult(False, n_eps, f"entry {i} ({label}): {problem}", i, prev, keyed=keyed)
        if rec["kind"] == "episode":
            listed.update(rec["files"])
            n_eps += 1
        sealed = rec["kind"] == "seal"
        prev = rec["entry_hash"]
        hashes.append(prev)
    bad = [_show(p.name) for p in sorted(folder.glob("ep_*")) if p.name not in listed]
    if bad:
        return VerifyResult(False, n_eps, f"file {bad[0]} is not listed in the manifest (an inserted file, or an "
                                          "interrupted write: opening the log with append quarantines it)",
                            len(lines), prev, sealed, bool(keyed))
    if expect_head is not None and expect_head != prev:
        why = (f"the expected head is line {hashes.index(expect_head) + 1}: records were appended after it"
               if expect_head in hashes else "the log was rewritten or truncated, or the head is another log's")
        return VerifyResult(False, n_eps, f"head is {prev}, expected {_show(expect_head)}: {why}",
                            len(lines), prev, sealed, bool(keyed))
    notes = [f"OK: {n_eps} episodes, chain intact",
             "sealed" if sealed else "NOT SEALED: tail truncation cannot be detected"]
    if expect_head is not None:
        notes.append("head matches the expected head")
    if keyed:
        notes.append("HMACs verified" if key is not None else "HMACs NOT checked (no key given)")
    if (folder / QUARANTINE).is_dir():
        notes.append(f"{QUARANTINE}/ holds files of an interrupted write")
    if (folder / DERIVED).is_dir():
        notes.append(f"{DERIVED}/ holds derived files (not covered by the chain)")
    return VerifyResult(True, n_eps, ", ".join(notes) + f", head {prev}", None, prev, sealed, bool(keyed))


@dataclass
class Episode:
    """One logged episode: ``arrays`` (the npz, as dict) and ``meta`` (the JSON)."""

    name: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def n_agents(self) -> int:
        return int(self.meta["n_agents"])


def load_episode(path: str | Path) -> Episode:
    """Load an episode from ``<dir>/ep_NNNNNN`` (with or without extension, .npz or .json).

    A missing or unreadable file (not a zip, not UTF-8 JSON, pickled arrays) is a one-line
    ConfigError naming it. Pickles are refused: a log is data, not code.
    """
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if not npz.is_file() or not js.is_file():
        raise ConfigError(f"episode {str(stem)!r} not found: expected {npz.name} and {js.name}")
    try:
        with zipfile.ZipFile(npz) as archive:
            size = sum(info.file_size for info in archive.infolist())
        if size <= MAX_EPISODE_BYTES:
            with np.load(npz, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, MemoryError) as exc:
        raise ConfigError(f"episode file {str(npz)!r} is not a readable .npz ({type(exc).__name__})") from None
    if size > MAX_EPISODE_BYTES:
        raise ConfigError(f"episode file {str(npz)!r} unpacks to {size / 2**30:.1f} GiB; accepted: at most "
                          f"{MAX_EPISODE_BYTES / 2**30:.0f} GiB")
    try:
        meta = json.loads(js.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"episode file {str(js)!r} is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"episode file {str(js)!r} holds a JSON {type(meta).__name__}; accepted: a JSON object")
    problem = _shape_problem(arrays, meta)
    if problem:
        raise ConfigError(f"episode {str(stem)!r}: {problem}; accepted: a {FORMAT} episode whose arrays agree "
                          "with each other and with its n_agents")
    return Episode(stem.name, arrays, meta)


#: the format's arrays (see the table above) by their leading axes, with the number of axes after those
STEP_ARRAYS = {"actions": 0, "clean_actions": 0, "greedy_actions": 0, "probs": 1, "values": 0, "rewards": 0,
               "linf": 0, "flipped": 0}
#: per-step arrays only some logs have: the attack alarm's score and verdict (a log written with a detector)
OPTIONAL_STEP_ARRAYS = {"alarm_score": 0, "alarm": 0}
LOGGED_ARRAYS = {"clean_obs": 3, "seen_obs": 3, "pgca_P": 2, "pgca_G": 2, "pgca_consensus": 2, "pgca_final": 2,
                 "agreement": 0, "topk_iou": 0, "evidence": 0, "sgam_mask": 2, "relevance": 2}
#: the largest episode file :func:`load_episode` unpacks: a crafted ``.npz`` may declare arrays of any size
MAX_EPISODE_BYTES = 4 * 2**30


def _shape_problem(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str | None:
    """What makes ``arrays`` and ``meta`` disagree with the format, or None: checked once on load, so
    renderers and reports can index by ``n_agents``, ``logged_t`` and the actions without checks of their own.

    Why: a log is data from whoever wrote it; a claimed ``n_agents`` of 10**9 or a ``logged_t`` past the
    episode's end would otherwise surface as a MemoryError or an IndexError deep in a renderer.
    """
    missing = [k for k in (*STEP_ARRAYS, "logged_t") if k not in arrays]
    if missing:
        return f"array {missing[0]!r} is missing"
    odd = next((k for k, v in arrays.items() if v.dtype.kind not in "biuf"), None)
    if odd is not None:
        return f"array {_show(odd)} has dtype {arrays[odd].dtype}, not numbers or booleans"
    n = meta.get("n_agents")
    if isinstance(n, bool) or not isinstance(n, int) or arrays["actions"].ndim != 2 or n != arrays["actions"].shape[1]:
        return f"n_agents is {_show(n)} but actions has shape {arrays['actions'].shape}, not (steps, n_agents)"
    steps = arrays["actions"].shape[0]
    logged = arrays["logged_t"]
    if logged.ndim != 1 or logged.dtype.kind not in "iu" or (logged.size and not 0 <= logged.min() <= logged.max() < steps):
        return f"logged_t must be step indices in 0..{steps - 1}"
    for names, lead in ((STEP_ARRAYS, (steps, n)), (OPTIONAL_STEP_ARRAYS, (steps, n)), (LOGGED_ARRAYS, (len(logged), n))):
        for key, extra in names.items():
            if key in arrays and (arrays[key].ndim != 2 + extra or arrays[key].shape[:2] != lead):
                return f"array {key!r} has shape {arrays[key].shape}, not {lead} then {extra} more axes"
    frames = arrays.get("frames")
    if frames is not None and (frames.ndim != 4 or frames.shape[0] != len(logged) or frames.shape[3] != 3):
        return f"array 'frames' has shape {frames.shape}, not ({len(logged)}, height, width, 3)"
    actions = arrays["actions"]
    if actions.size and not 0 <= actions.min() <= actions.max() < arrays["probs"].shape[2]:
        return f"actions must be in 0..{arrays['probs'].shape[2] - 1} (the probs' last axis)"
    maps = [arrays[k].shape[-2:] for k, extra in LOGGED_ARRAYS.items() if k in arrays and extra >= 2]
    if len(set(maps)) > 1:
        return f"the logged images and maps differ in size: {sorted(set(maps))}"
    return None


def list_episodes(log_dir: str | Path) -> list[Path]:
    """Episode stems in manifest order; ConfigError if a record names a path outside the log."""
    folder = Path(log_dir)
    stems = []
    for rec in read_manifest(folder):
        name = rec.get("episode")
        for fname in (name, f"{name}.json", f"{name}.npz"):
            log_path(folder, fname)
        stems.append(folder / name)
    return stems
