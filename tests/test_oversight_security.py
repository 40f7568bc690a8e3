"""The oversight log against a hostile writer: escaping and CSP in reports, paths kept inside the log,
the seal, the head kept elsewhere, HMAC keys, and recovery from a crash between files and manifest line.

Logs are written with :class:`LogWriter` and small synthetic episodes (no policy, no rollout), and
"attacks" edit the files then recompute what a keyless attacker can: file hashes, the chain, the seal.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fgmf_marl.config import ConfigError
from fgmf_marl.jobs.cli import run
from fgmf_marl.jobs.replay import main as replay_main
from fgmf_marl.oversight import store
from fgmf_marl.oversight.report import build_report
from fgmf_marl.oversight.store import (GENESIS, MANIFEST, LogWriter, entry_hash, load_episode, read_key,
                                       read_records, record_hmac, sha256_file, verify)

HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "'><svg onload=alert(1)>",
           "javascript:alert(1)"]
KEY = b"k" * 32
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "span", "table", "tr", "th",
                "td", "a", "img", "div", "b", "br"}


def episode(seed: int, T: int = 3, N: int = 2, size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.random((T, N, 5)).astype(np.float32)
    actions = rng.integers(0, 4, (T, N))
    clean = rng.integers(0, 255, (T, N, 3, size, size)).astype(np.uint8)
    return {"actions": actions, "clean_actions": actions, "greedy_actions": actions,
            "probs": probs / probs.sum(-1, keepdims=True), "values": rng.random((T, N)).astype(np.float32),
            "rewards": rng.random((T, N)).astype(np.float32), "linf": np.full((T, N), 8 / 255, np.float32),
            "flipped": rng.random((T, N)) < 0.5, "logged_t": np.arange(T),
            "clean_obs": clean, "seen_obs": (clean / 255).astype(np.float16),
            "pgca_final": rng.random((T, N, size, size)).astype(np.float16),
            "agreement": rng.uniform(-1, 1, (T, N)).astype(np.float32),
            "topk_iou": rng.random((T, N)).astype(np.float32)}


def meta(attack: str = "pgd", hostile: bool = False) -> dict:
    h = HOSTILE
    m = {"env_index": 0, "episode_in_env": 0, "n_agents": 2, "attack": attack, "every": 1,
         "action_names": ["noop", "up", "down", "left", "right"], "run": {"checkpoint": "runs/x"},
         "summary": {"team_return": 1.5, "flip_rate": 0.25}}
    if hostile:  # every string field a log carries
        m.update(env_index=h[1], episode_in_env=h[0], attack=h[0], action_names=h + ["right"],
                 pgca={h[0]: h[1]}, run={h[0]: h[1], "checkpoint": h[3], "seed": h[2]},
                 summary={"team_return": h[0], "flip_rate": h[1], h[2]: h[3], "mean_linf_255": h[3]},
                 records=[{"t": 0, "agent": h[0], "action": h[1]}])
    return m


def make_log(folder: Path, n: int = 3, key: bytes | None = None, seal: bool = True, **kw) -> str:
    w = LogWriter(folder, key=key)
    for i in range(n):
        w.append(episode(i), meta(**kw))
    return w.close() if seal else w.head


def rewrite(folder: Path, records: list[dict]) -> None:
    (folder / MANIFEST).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def rechain(folder: Path, records: list[dict] | None = None, key: bytes | None = None) -> str:
    """What an attacker does after editing: recompute file hashes, counts, links and entry hashes."""
    records = read_records(folder) if records is None else records
    prev, n = GENESIS, 0
    for r in records:
        r.pop("hmac", None)
        if r["kind"] == "episode":
            if isinstance(r.get("files"), dict):
                r["files"] = {f: sha256_file(folder / f) for f in r["files"]}
            n += 1
        else:
            r["count"] = n
        r["prev_hash"] = prev
        r["entry_hash"] = entry_hash(r)
        if key is not None:
            r["hmac"] = record_hmac(r, key)
        prev = r["entry_hash"]
    rewrite(folder, records)
    return prev


class Audit(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.csp: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        d = dict(attrs)
        if tag == "meta" and (d.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp.append(d.get("content") or "")


def audit(text: str) -> Audit:
    """Assert the page runs nothing and links nowhere: the checks a hostile log must not get past."""
    a = Audit()
    a.feed(text)
    a.close()
    assert set(a.tags) <= ALLOWED_TAGS, set(a.tags) - ALLOWED_TAGS
    assert "script" not in a.tags
    for tag, k, v in a.attrs:
        assert not k.lower().startswith("on"), (tag, k, v)
        assert "javascript:" not in v.lower().replace(" ", ""), (tag, k, v)
        if k == "href":
            assert re.fullmatch(r"#(c\d+-)?ep_\d{6}|#c\d+", v), (tag, k, v)  # fragments the page made itself
        if k == "src":
            assert v.startswith("data:image/"), (tag, k, v[:40])
    assert len(a.csp) == 1 and "default-src 'none'" in a.csp[0] and "script-src" not in a.csp[0]
    assert text.index("Content-Security-Policy") < text.index("<title>")
    for h in HOSTILE:
        if "<" in h:
            assert h not in text and h.replace('"', "'") not in text
    return a


def test_audit_catches_unsafe_pages() -> None:
    csp = "<head><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'\"><title>"
    for bad in ["<script>x</script>", "<img src=x onerror=alert(1)>", "<a href='javascript:alert(1)'>",
                "<a href='../elsewhere'>", "<svg onload=x>"]:
        with pytest.raises(AssertionError):
            audit(csp + bad)
    with pytest.raises(AssertionError):
        audit("<head><title>no csp")


@pytest.mark.parametrize("which", ["dir", "episode"])
def test_report_escapes_every_field_of_a_hostile_log(tmp_path: Path, which: str) -> None:
    folder = tmp_path / "log_<img src=x onerror=alert(1)>"
    w = LogWriter(folder)
    w.append(episode(0), meta(hostile=True))               # written hostile, chained by the writer
    w.append(episode(1), meta())
    w.close()
    js = folder / "ep_000001.json"                         # edited afterwards and rechained
    m = json.loads(js.read_text())
    m.update(meta(hostile=True))
    js.write_text(json.dumps(m))
    records = read_records(folder)
    records[1]["summary"] = {h: h for h in HOSTILE}
    rechain(folder, records)
    assert verify(folder).ok                               # keyless: the rewrite is not detectable ...
    out = tmp_path / "r.html"
    target = folder if which == "dir" else folder / "ep_000001"
    build_report(target, out)
    text = out.read_text()
    audit(text)                                            # ... but it cannot run anything
    assert html.escape(HOSTILE[0], quote=True) in text     # the values are shown, escaped
    assert html.escape(HOSTILE[1], quote=True) in text
    if which == "dir":
        assert "chain intact" in text and text.count("<a href='#ep_") == 2


def test_report_of_a_folder_of_logs_escapes_their_names(tmp_path: Path, capsys) -> None:
    """Cell folder names are not the report's own: shown escaped, never used in an id or href."""
    root = tmp_path / "root"
    names = [HOSTILE[0].replace("/", "_"), HOSTILE[1].replace("/", "_")]
    for name in names:
        make_log(root / name, n=1, hostile=True)
    text = build_report(root, tmp_path / "r.html").read_text()
    audit(text)
    for name in names:
        assert html.escape(name, quote=True) in text
    assert replay_main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 of 2 logs OK"


def test_paths_outside_the_log_are_refused_by_verify_and_report(tmp_path: Path) -> None:
    make_log(tmp_path / "elsewhere", n=1)                  # a real episode outside the log
    for attack in ("episode", "files", "absolute"):
        folder = tmp_path / attack
        make_log(folder, n=2)
        records = read_records(folder)
        if attack == "episode":
            records[0]["episode"] = "../elsewhere/ep_000000"
        elif attack == "files":
            records[0]["files"] = {"../elsewhere/ep_000000.json": "", "../elsewhere/ep_000000.npz": ""}
        else:
            records[0]["files"] = {str(tmp_path / "elsewhere" / "ep_000000.json"): ""}
        rechain(folder, records)
        res = verify(folder)
        assert not res.ok and res.first_bad == 0, res.message
        assert replay_main(["verify", str(folder)]) == 1
        if attack == "episode":
            with pytest.raises(ConfigError, match="accepted: ep_NNNNNN"):
                build_report(folder, tmp_path / "r.html")
            assert run(replay_main, ["report", str(folder), "-o", str(tmp_path / "r.html")]) == 2
        else:  # the report reads only ep_NNNNNN files inside the log, and shows the verdict
            text = build_report(folder, tmp_path / f"{attack}.html").read_text()
            assert "FAILED: entry 0 (ep_000000): files must be exactly" in text
    assert not (tmp_path / "r.html").exists()


def test_symlinked_episode_file_is_refused(tmp_path: Path) -> None:
    make_log(tmp_path / "elsewhere", n=2)
    folder = tmp_path / "log"
    make_log(folder, n=2)
    (folder / "ep_000001.json").unlink()
    shutil.copy(tmp_path / "elsewhere" / "ep_000001.json", tmp_path / "secret.json")
    os.symlink(tmp_path / "secret.json", folder / "ep_000001.json")
    rechain(folder)
    res = verify(folder)
    assert not res.ok and "symlink" in res.message
    with pytest.raises(ConfigError, match="symlink"):
        build_report(folder, tmp_path / "r.html")


def test_deleting_the_last_episode_of_a_sealed_log_is_detected(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    head = make_log(folder, n=3)
    ok = verify(folder)
    assert ok.ok and ok.sealed and ok.head == head and "sealed" in ok.message and head in ok.message
    lines = (folder / MANIFEST).read_text().splitlines()
    for suffix in (".npz", ".json"):
        (folder / f"ep_000002{suffix}").unlink()
    (folder / MANIFEST).write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # files and line gone, seal kept
    res = verify(folder)
    assert not res.ok and res.first_bad == 2 and "seal" in res.message
    (folder / MANIFEST).write_text("\n".join(lines[:2]) + "\n")              # the seal removed as well
    res = verify(folder)
    assert res.ok and not res.sealed and "NOT SEALED: tail truncation cannot be detected" in res.message
    res = verify(folder, expect_head=head)
    assert not res.ok and "rewritten or truncated" in res.message


def test_forged_appended_entry(tmp_path: Path) -> None:
    for key in (None, KEY):
        folder = tmp_path / f"log{key is not None}"
        head = make_log(folder, n=2, key=key)
        shutil.copy(folder / "ep_000001.npz", folder / "ep_000002.npz")
        shutil.copy(folder / "ep_000001.json", folder / "ep_000002.json")
        ep0, ep1, seal = read_records(folder)
        forged = dict(ep1, index=2, episode="ep_000002", files={"ep_000002.json": "", "ep_000002.npz": ""})
        new_head = rechain(folder, [ep0, ep1, forged, seal])  # forged episode, re-sealed, HMACs stripped
        assert verify(folder).ok                   # without a key to check, the forgery is consistent ...
        res = verify(folder, expect_head=head)     # ... and the head kept elsewhere catches it
        assert not res.ok and new_head != head and "rewritten or truncated" in res.message
        if key is not None:
            res = verify(folder, key=key)
            assert not res.ok and res.first_bad == 0 and "no HMAC" in res.message


def test_keyed_log_rewrite_and_rechain_needs_the_key(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    make_log(folder, n=3, key=KEY)
    assert verify(folder, key=KEY).ok and "HMACs verified" in verify(folder, key=KEY).message
    plain = verify(folder)
    assert plain.ok and plain.keyed and "HMACs NOT checked" in plain.message
    assert not verify(folder, key=b"x" * 32).ok                     # the wrong key
    records = read_records(folder)
    records[0], records[1] = records[1], records[0]                 # reorder ...
    records[0].update(index=0, episode="ep_000000", files={"ep_000000.json": "", "ep_000000.npz": ""})
    records[1].update(index=1, episode="ep_000001", files={"ep_000001.json": "", "ep_000001.npz": ""})
    rechain(folder, records, key=b"guessed-key-000000")            # ... rechained with a guessed key
    res = verify(folder, key=KEY)
    assert not res.ok and res.first_bad == 0 and "HMAC mismatch" in res.message
    rechain(folder)                                                 # HMACs stripped
    res = verify(folder, key=KEY)
    assert not res.ok and "no HMAC, but a key was given" in res.message
    unkeyed = tmp_path / "unkeyed"
    make_log(unkeyed, n=1)
    assert not verify(unkeyed, key=KEY).ok
    LogWriter(tmp_path / "keyed2", key=KEY).close()
    with pytest.raises(ConfigError, match="carries HMACs; give its key"):
        LogWriter(tmp_path / "keyed2", append=True)


def test_mixed_hmacs_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    make_log(folder, n=2, key=KEY, seal=False)
    records = read_records(folder)
    records[1].pop("hmac")
    records[1]["entry_hash"] = entry_hash(records[1])
    rewrite(folder, records)
    res = verify(folder)
    assert not res.ok and res.first_bad == 1 and "has no HMAC but earlier records do" in res.message


def test_expect_head_and_key_on_the_command_line(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "log"
    head = make_log(folder, n=2, key=KEY)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    assert replay_main(["verify", str(folder), "--expect-head", head, "--log-key-file", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert head in out and "HMACs verified" in out and "head matches" in out
    assert replay_main(["verify", str(folder), "--expect-head", "a" * 64]) == 1
    assert "FAILED: head is" in capsys.readouterr().out
    monkeypatch.setenv("FGMF_LOG_KEY_FILE", str(key_file))
    assert replay_main(["verify", str(folder)]) == 0 and "HMACs verified" in capsys.readouterr().out
    assert run(replay_main, ["verify", str(folder), "--expect-head", "xyz"]) == 2
    assert run(replay_main, ["verify", str(folder), "--log-key-file", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 2


def test_read_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FGMF_LOG_KEY_FILE", raising=False)
    assert read_key(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="holds 0 bytes"):
        read_key(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_key(str(tmp_path / "missing"))
    monkeypatch.setenv("FGMF_LOG_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"from \$FGMF_LOG_KEY_FILE"):
        read_key(None)


def test_crash_between_files_and_manifest_line_is_quarantined(tmp_path: Path, monkeypatch, caplog) -> None:
    folder = tmp_path / "log"
    w = LogWriter(folder)
    w.append(episode(0), meta())
    real = store.atomic_write_bytes

    def crash_on_manifest(path, data):
        if Path(path).name == MANIFEST:
            raise KeyboardInterrupt  # the process dies after the episode's files are written
        real(path, data)
    monkeypatch.setattr(store, "atomic_write_bytes", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        w.append(episode(1), meta())
    monkeypatch.undo()
    (folder / ".ep_000002.npz.abc123.tmp").write_bytes(b"partial")
    assert not verify(folder).ok and "ep_000001" in verify(folder).message
    with pytest.raises(ConfigError, match="already holds a log; give --append to add to it"):
        LogWriter(folder)
    w2 = LogWriter(folder, append=True)
    assert "unfinished episode ep_000001" in w2.recovered and "1 temp file" in w2.recovered
    assert len(w2.recovered.splitlines()) == 1 and w2.recovered in caplog.text
    assert sorted(p.name for p in (folder / "quarantine" / "1").iterdir()) == [
        ".ep_000002.npz.abc123.tmp", "ep_000001.json", "ep_000001.npz"]
    w2.append(episode(2), meta())
    head = w2.close()
    res = verify(folder, expect_head=head)
    assert res.ok and res.n_entries == 2 and res.sealed and "quarantine/ holds" in res.message
    assert LogWriter(folder, append=True).recovered is None


def test_appending_to_a_sealed_log_supersedes_the_seal(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    first = make_log(folder, n=2)
    w = LogWriter(folder, append=True)
    assert w.close() == first                    # nothing appended: not sealed twice
    w.append(episode(5), meta())
    second = w.close()
    kinds = [r["kind"] for r in read_records(folder)]
    assert kinds == ["episode", "episode", "seal", "episode", "seal"]
    res = verify(folder)
    assert res.ok and res.n_entries == 3 and res.head == second
    res = verify(folder, expect_head=first)
    assert not res.ok and "records were appended after it" in res.message
    records = read_records(folder)
    rechain(folder, records[:3] + [dict(records[2])])  # a seal right after a seal
    assert "a seal follows a seal" in verify(folder).message


@pytest.mark.parametrize("edit, message", [
    ({"files": {}}, "files must be exactly ep_000001.json and ep_000001.npz"),
    ({"files": {"ep_000001.json": ""}}, "files must be exactly"),
    ({"index": 7, "episode": "ep_000007"}, "index is 7, expected 1"),
    ({"episode": "ep_000007"}, "episode is named ep_000007, expected ep_000001"),
])
def test_malformed_entries_are_refused_even_when_rechained(tmp_path: Path, edit: dict, message: str) -> None:
    folder = tmp_path / "log"
    make_log(folder, n=3)
    records = read_records(folder)
    records[1].update(edit)
    rechain(folder, records)
    res = verify(folder)
    assert not res.ok and res.first_bad == 1 and message in res.message, res.message


@pytest.mark.parametrize("which, content", [("npz", b"not a zip"), ("json", b"\xff\xfe{"), ("json", b"{nope")])
def test_corrupt_episode_files_are_one_line_errors(tmp_path: Path, which: str, content: bytes) -> None:
    folder = tmp_path / "log"
    make_log(folder, n=1)
    (folder / f"ep_000000.{which}").write_bytes(content)
    rechain(folder)
    with pytest.raises(ConfigError, match=rf"ep_000000\.{which}") as exc:
        load_episode(folder / "ep_000000")
    assert "\n" not in str(exc.value)
    assert run(replay_main, ["report", str(folder), "-o", str(tmp_path / "r.html")]) == 2
    assert run(replay_main, ["render", f"{folder}:0", "-o", str(tmp_path / "v")]) == 2


def test_manifest_garbage_is_reported_not_raised(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    make_log(folder, n=1)
    with open(folder / MANIFEST, "ab") as fh:
        fh.write(b"\xff\n")
    assert "not UTF-8" in verify(folder).message
    (folder / MANIFEST).write_text('["a list"]\n')
    res = verify(folder)
    assert not res.ok and res.first_bad == 0 and "not a manifest record" in res.message
    with pytest.raises(ConfigError, match="line 1: not a manifest record"):
        LogWriter(folder, append=True)


def test_seal_must_count_the_episodes_before_it(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    make_log(folder, n=2)
    records = read_records(folder)
    records[-1]["count"] = 3                      # a seal claiming an episode the log does not have
    records[-1]["entry_hash"] = entry_hash(records[-1])
    rewrite(folder, records)
    res = verify(folder)
    assert not res.ok and res.first_bad == 2 and "seal counts 3 episodes, the log has 2" in res.message
