"""Oversight log: recording through the rollout hook, atomic writes, the hash chain and ``verify``."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from fgmf_marl.atomic import atomic_write
from fgmf_marl.attribution import PGCA
from fgmf_marl.config import ConfigError
from fgmf_marl.envs.native import ACTION_NAMES as NATIVE_ACTION_NAMES
from fgmf_marl.jobs.replay import main as replay_main
from fgmf_marl.oversight import OversightLogger, load_episode, read_manifest, verify
from fgmf_marl.oversight.store import MANIFEST, LogWriter, npz_bytes
from fgmf_marl.rollout import rollout
from test_attribution import make_view

SIZE = 24


class SquareEnv(gym.Env):
    """A bright square drifting over a dark image; fixed-length episodes so all agents end together."""

    def __init__(self, length: int = 5, seed: int = 0) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (3, SIZE, SIZE), np.uint8)
        self.action_space = gym.spaces.Discrete(5)
        self.length, self.rng = length, np.random.default_rng(seed)

    def _obs(self) -> np.ndarray:
        img = np.zeros((3, SIZE, SIZE), np.uint8)
        y, x = self.pos
        img[:, y:y + 5, x:x + 5] = 220
        return img

    def reset(self, *, seed=None, options=None):
        self.t, self.pos = 0, self.rng.integers(0, SIZE - 5, 2)
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.pos = np.clip(self.pos + self.rng.integers(-2, 3, 2), 0, SIZE - 5)
        return self._obs(), float(action == 1), False, self.t >= self.length, {}


def make_venv(n_envs: int = 2, n_agents: int = 2, length: int = 5) -> DummyVecEnv:
    venv = DummyVecEnv([lambda i=i: SquareEnv(length, seed=i) for i in range(n_envs * n_agents)])
    venv.n_agents = n_agents
    return venv


def sign_noise(eps: float = 8 / 255):
    gen = torch.Generator().manual_seed(0)

    def perturb(x: torch.Tensor) -> torch.Tensor:
        return (x + eps * torch.sign(torch.randn(x.shape, generator=gen))).clamp(0, 1)
    return perturb


def write_log(folder: Path, n_episodes: int = 3, every: int = 1, perturb=None, attack: str | None = None,
              tb_writer=None):
    view = make_view()
    venv = make_venv()
    with OversightLogger(folder, view, every=every, attack_name=attack,
                         pgca=PGCA(view, grid=4), tb_writer=tb_writer) as log:
        result = rollout(view, venv, n_episodes, perturb=perturb, step_hook=log.step_hook)
    log.writer.close()  # seal (idempotent: a logger that seals on close makes this a no-op)
    return result, log


def test_logger_records_rollout_episodes(tmp_path: Path) -> None:
    result, log = write_log(tmp_path, n_episodes=3)
    entries = read_manifest(tmp_path)
    assert len(entries) == 3 == len(result.team_returns)
    assert verify(tmp_path).ok
    returns = sorted(load_episode(tmp_path / e["episode"]).meta["summary"]["team_return"] for e in entries)
    np.testing.assert_allclose(returns, sorted(result.team_returns), rtol=1e-6)
    ep = load_episode(tmp_path / "ep_000000")
    a = ep.arrays
    assert a["actions"].shape == (5, 2) and a["probs"].shape == (5, 2, 5)
    assert a["seen_obs"].shape == (5, 2, 3, SIZE, SIZE) and a["clean_obs"].dtype == np.uint8
    for key in ("pgca_P", "pgca_G", "pgca_consensus", "pgca_final"):
        assert a[key].shape == (5, 2, SIZE, SIZE) and a[key].min() >= 0 and a[key].max() <= 1
    assert not a["flipped"].any() and (a["linf"] == 0).all()  # no attack
    assert len(ep.meta["records"]) == 5 * 2 and ep.meta["summary"]["steps"] == 5
    np.testing.assert_allclose(a["probs"].sum(-1), 1, atol=1e-5)


def test_logger_every_k_steps_attack_facts_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    eps = 8 / 255
    writer = SummaryWriter(str(tmp_path / "tb"))
    result, _ = write_log(tmp_path, n_episodes=2, every=2, perturb=sign_noise(eps), attack="sign-noise",
                          tb_writer=writer)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "oversight/least_trusted_step" in events.Tags()["images"]
    assert len(events.Scalars("oversight/mean_agreement")) == 2
    ep = load_episode(tmp_path / "ep_000001")
    a = ep.arrays
    assert a["logged_t"].tolist() == [0, 2, 4] and a["pgca_final"].shape[0] == 3 and a["actions"].shape[0] == 5
    assert ep.meta["attack"] == "sign-noise"
    np.testing.assert_allclose(a["linf"], eps, atol=1e-6)  # dark pixels can move up by the full eps
    clean = a["clean_obs"].astype(np.float32) / 255
    seen = a["seen_obs"].astype(np.float32)
    assert np.abs(seen - clean).max() <= eps + 2e-3  # float16 storage
    np.testing.assert_array_equal(a["flipped"], a["greedy_actions"] != a["clean_actions"])
    assert ep.meta["summary"]["attacked_fraction"] == 1.0


@pytest.fixture(scope="module")
def pristine_log(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "log"
    write_log(folder, n_episodes=3)
    assert verify(folder).ok
    return folder


@pytest.fixture
def copy_log(pristine_log: Path):
    def make(dest: Path) -> Path:
        folder = dest / "log"
        shutil.copytree(pristine_log, folder)
        assert verify(folder).ok
        return folder
    return make


def test_hash_chain_detects_edited_episode(tmp_path: Path, copy_log) -> None:
    folder = copy_log(tmp_path)
    ep = load_episode(folder / "ep_000001")
    arrays = dict(ep.arrays)
    arrays["actions"] = arrays["actions"].copy()
    arrays["actions"][0, 0] = (arrays["actions"][0, 0] + 1) % 5
    np.savez_compressed(folder / "ep_000001.npz", **arrays)
    res = verify(folder)
    assert not res.ok and res.first_bad == 1 and "ep_000001.npz was modified" in res.message


def test_hash_chain_detects_edited_json_and_manifest(tmp_path: Path, copy_log) -> None:
    folder = copy_log(tmp_path)
    meta = json.loads((folder / "ep_000000.json").read_text())
    meta["summary"]["team_return"] += 1
    (folder / "ep_000000.json").write_text(json.dumps(meta))
    assert verify(folder).first_bad == 0
    folder = copy_log(tmp_path / "b")
    lines = (folder / MANIFEST).read_text().splitlines()
    entry = json.loads(lines[0])
    entry["summary"]["flip_rate"] = 0.5  # the entry itself edited, files untouched
    lines[0] = json.dumps(entry, sort_keys=True)
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")
    res = verify(folder)
    assert res.first_bad == 0 and "entry hash mismatch" in res.message


def test_hash_chain_detects_removed_episode(tmp_path: Path, copy_log) -> None:
    folder = copy_log(tmp_path)
    lines = (folder / MANIFEST).read_text().splitlines()
    (folder / MANIFEST).write_text("\n".join([lines[0], lines[2]]) + "\n")
    for suffix in (".npz", ".json"):
        (folder / f"ep_000001{suffix}").unlink()
    res = verify(folder)
    assert not res.ok and res.first_bad == 1 and "ep_000002" in res.message
    # removing only the files is caught too
    folder2 = copy_log(tmp_path / "b")
    (folder2 / "ep_000001.npz").unlink()
    assert "missing" in verify(folder2).message


def test_hash_chain_detects_reordered_episodes(tmp_path: Path, copy_log) -> None:
    folder = copy_log(tmp_path)
    lines = (folder / MANIFEST).read_text().splitlines()
    (folder / MANIFEST).write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    res = verify(folder)
    assert not res.ok and res.first_bad == 0
    # swapping the files' contents instead of the entries
    folder2 = copy_log(tmp_path / "b")
    for suffix in (".npz", ".json"):
        a, b = folder2 / f"ep_000000{suffix}", folder2 / f"ep_000002{suffix}"
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
    assert verify(folder2).first_bad == 0


def test_appending_to_a_tampered_log_is_refused(tmp_path: Path, copy_log) -> None:
    folder = copy_log(tmp_path)
    with pytest.raises(ConfigError, match="already holds a log; give --append"):
        OversightLogger(folder, make_view())  # one log = one run
    (folder / "ep_000000.json").write_text("{}")
    with pytest.raises(ConfigError, match="refusing to append"):
        LogWriter(folder, append=True)


def test_crash_during_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "ep.npz"

    def failing(fh):
        fh.write(b"x" * 1000)
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ep.npz"]


def test_process_killed_mid_write_leaves_log_verifiable(tmp_path: Path, copy_log) -> None:
    folder = copy_log(tmp_path)
    code = ("import os, sys; from fgmf_marl.atomic import atomic_write\n"
            "def w(fh):\n    fh.write(b'partial'); fh.flush(); os._exit(9)\n"
            f"atomic_write({str(folder / 'ep_000003.npz')!r}, w)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9
    assert not (folder / "ep_000003.npz").exists()  # only a hidden temp file may remain
    assert verify(folder).ok


def test_replay_verify_cli_exit_codes(tmp_path: Path, capsys, copy_log) -> None:
    folder = copy_log(tmp_path)
    assert replay_main(["verify", str(folder)]) == 0
    assert "OK: 3 episodes" in capsys.readouterr().out
    (folder / "ep_000002.json").write_text("{}")
    assert replay_main(["verify", str(folder)]) == 1
    assert "entry 2 (ep_000002)" in capsys.readouterr().out
    script = Path(__file__).resolve().parents[1] / "scripts" / "replay.py"
    proc = subprocess.run([sys.executable, str(script), "verify", str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_logger_on_native_env_records_frames_relevance_and_scores(tmp_path: Path) -> None:
    from fgmf_marl.envs.batched import CoverageVecEnv
    from fgmf_marl.envs.native import CoverageConfig
    venv = CoverageVecEnv(CoverageConfig(max_steps=4), n_envs=2, seed=3)
    view = make_view(size=48)
    rendered = []
    with OversightLogger.for_venv(tmp_path, view, venv, pgca=PGCA(view, grid=4),
                                  run_info={"checkpoint": "test"}) as log:
        def hook(rec):
            log.step_hook(rec)
            rendered.append(venv.render().copy())  # the frame after this step
        rollout(view, venv, 2, step_hook=hook)
    assert verify(tmp_path).ok
    ep = load_episode(tmp_path / "ep_000001")
    a = ep.arrays
    assert a["relevance"].shape == (4, 3, 48, 48) and a["relevance"].any()
    assert a["frames"].shape[0] == 4 and a["frames"].shape[-1] == 3
    env = ep.meta["env_index"]
    for t in range(1, 4):  # the frame logged for step t is the world the agents observed: after step t-1
        np.testing.assert_array_equal(a["frames"][t], rendered[t - 1][env])
    s = ep.meta["summary"]
    assert 0 <= s["relevance_mass_accuracy"] <= 1 and 0 <= s["pointing_game"] <= 1
    assert ep.meta["run"] == {"checkpoint": "test"}
    from fgmf_marl.oversight.render import caption
    action = int(a["actions"][0, 0])
    assert f"agent 0: {NATIVE_ACTION_NAMES[action]} p=" in caption(ep, 0, 0)


def test_episode_files_are_npz_that_numpy_reads_and_never_pickle(tmp_path: Path) -> None:
    import io
    arrays = {"maps": np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float16),
              "t": np.arange(4, dtype=np.int64), "flags": np.array([True, False])}
    data = npz_bytes(arrays)
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for key, value in arrays.items():
            assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value)
    reference = io.BytesIO()
    np.savez_compressed(reference, **arrays)
    assert len(data) < 2 * len(reference.getvalue())
    with pytest.raises(ValueError):
        npz_bytes({"objects": np.array([{"a": 1}], dtype=object)})


@pytest.mark.parametrize("every", [1, 2])
def test_steps_explained_together_equal_one_call_per_step(tmp_path: Path, every: int) -> None:
    """Logged steps wait for ``explain_batch`` agent-slots (or an episode's end) and share one PGCA call;
    the log must be what one call per step writes. Env copies end at different steps (5 and 7)."""
    view = make_view()
    logs = {}
    for batch in (1, 5, 1000):
        venv = DummyVecEnv([lambda i=i: SquareEnv(5 + 2 * (i // 2), seed=i) for i in range(4)])
        venv.n_agents = 2
        folder = tmp_path / f"batch{batch}"
        with OversightLogger(folder, view, every=every, pgca=PGCA(view, grid=4), explain_batch=batch) as log:
            rollout(view, venv, 4, perturb=sign_noise(), step_hook=log.step_hook)
        assert verify(folder).ok
        logs[batch] = [load_episode(folder / e["episode"]) for e in read_manifest(folder) if e["kind"] == "episode"]
    reference = logs[1]
    assert len(reference) == 4 and {ep.meta["summary"]["steps"] for ep in reference} == {5, 7}
    for batch in (5, 1000):
        for ep, ref in zip(logs[batch], reference):
            assert ep.arrays.keys() == ref.arrays.keys() and "pgca_final" in ep.arrays
            for key, value in ref.arrays.items():
                np.testing.assert_allclose(ep.arrays[key].astype(np.float64), value.astype(np.float64),
                                           atol=2e-3, err_msg=key)
            assert [r["t"] for r in ep.meta["records"]] == [r["t"] for r in ref.meta["records"]]


def test_explain_batch_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="explain_batch must be >= 1"):
        OversightLogger(tmp_path / "log", make_view(), explain_batch=0)
    assert not (tmp_path / "log").exists()


def test_logged_images_are_numpys_float16_and_uint8_of_what_the_policy_saw(tmp_path: Path) -> None:
    """The logger converts by torch (half, round) before the host copy: bit for bit numpy's astype(float16) and
    rint, on the observations and on values of every float16 range (normal, subnormal, underflow, overflow)."""
    view, venv = make_view(), make_venv()
    seen: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []
    with OversightLogger(tmp_path, view, pgca=PGCA(view, grid=4)) as log:
        def hook(record) -> None:
            seen.append(record.seen_obs.clone())
            clean.append(record.clean_obs.clone())
            log.step_hook(record)
        rollout(view, venv, 2, perturb=sign_noise(), step_hook=hook)
    ep = load_episode(tmp_path / "ep_000000")   # env copy 0: slots 0 and 1 of every step
    expect_seen = np.stack([s[:2].numpy().astype(np.float16) for s in seen])
    expect_clean = np.stack([np.rint(c[:2].numpy() * 255).astype(np.uint8) for c in clean])
    assert np.array_equal(ep.arrays["seen_obs"].view(np.uint16), expect_seen.view(np.uint16))
    assert np.array_equal(ep.arrays["clean_obs"], expect_clean)
    values = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * scale
                        for scale in (1.0, 1e-4, 1e-7, 1e5)] + [torch.tensor([0.0, 1.0, 65504.0, 65520.0, 6e-8, 3e-8])])
    with np.errstate(over="ignore"):
        assert np.array_equal(values.half().numpy().view(np.uint16), values.numpy().astype(np.float16).view(np.uint16))


def test_episodes_are_written_in_the_background_and_close_waits_for_them(tmp_path: Path, monkeypatch) -> None:
    """Episodes reach the log in the order they ended, from a writer thread; when ``close()`` returns every one
    is written and chained, the log is sealed and the thread is gone."""
    import threading
    import time
    writers: list[str] = []
    append = LogWriter.append

    def slow_append(self, arrays, meta):
        writers.append(threading.current_thread().name)
        time.sleep(0.05)   # a slow disk: the evaluation goes on meanwhile
        return append(self, arrays, meta)
    monkeypatch.setattr(LogWriter, "append", slow_append)
    view = make_view()
    venv = DummyVecEnv([lambda i=i: SquareEnv(5 + 2 * (i // 2), seed=i) for i in range(4)])   # copies end at 5 and 7
    venv.n_agents = 2
    log = OversightLogger(tmp_path, view, pgca=PGCA(view, grid=4))
    result = rollout(view, venv, 4, step_hook=log.step_hook)
    head = log.close()
    assert verify(tmp_path, expect_head=head).ok and verify(tmp_path).sealed
    assert len(writers) == 4 and all(name.startswith("oversight-log") for name in writers)
    metas = [load_episode(tmp_path / e["episode"]).meta for e in read_manifest(tmp_path)]
    assert [(m["env_index"], m["summary"]["steps"]) for m in metas] == [(0, 5), (1, 7), (0, 5), (1, 7)]   # as they ended
    assert sorted(result.lengths.tolist()) == [5, 5, 7, 7]
    assert log.close() == head   # idempotent
    assert not any(t.name.startswith("oversight-log") for t in threading.enumerate())


def test_a_failed_episode_write_is_raised_and_no_later_episode_is_written(tmp_path: Path, monkeypatch) -> None:
    from fgmf_marl.atomic import WriteError
    calls: list[int] = []
    append = LogWriter.append

    def failing_append(self, arrays, meta):
        calls.append(1)
        if len(calls) == 2:
            raise WriteError(28, "No space left on device", str(self.dir / "ep_000001.npz"))
        return append(self, arrays, meta)
    monkeypatch.setattr(LogWriter, "append", failing_append)
    view = make_view()
    with pytest.raises(WriteError, match="No space left"):
        with OversightLogger(tmp_path, view, pgca=PGCA(view, grid=4)) as log:
            rollout(view, make_venv(n_envs=1), 4, step_hook=log.step_hook)
    assert len(calls) == 2   # the episodes after the failed one were not written
    result = verify(tmp_path)
    assert result.ok and result.n_entries == 1 and not result.sealed


def test_an_interrupted_evaluation_still_writes_the_episodes_that_ended(tmp_path: Path, monkeypatch, caplog) -> None:
    """An exception inside ``with OversightLogger(...)`` (SIGTERM, a failing env) waits for the queued writes: the
    finished episodes are in the log, complete, and it stays unsealed, as an interrupted run's."""
    import time
    append = LogWriter.append
    monkeypatch.setattr(LogWriter, "append", lambda self, arrays, meta: (time.sleep(0.1), append(self, arrays, meta))[1])
    view = make_view()

    class Stop(Exception):
        pass
    with pytest.raises(Stop):
        with OversightLogger(tmp_path, view, pgca=PGCA(view, grid=4)) as log:
            def hook(record) -> None:
                log.step_hook(record)
                if record.episode[0] == 2 and record.t[0] == 1:
                    raise Stop
            rollout(view, make_venv(n_envs=1), 5, step_hook=hook)
    result = verify(tmp_path)
    assert result.ok and result.n_entries == 2 and not result.sealed
    assert [load_episode(tmp_path / e["episode"]).meta["summary"]["steps"] for e in read_manifest(tmp_path)] == [5, 5]
    assert not caplog.records   # no write failed
