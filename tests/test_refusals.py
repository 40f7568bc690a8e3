"""Refused commands change nothing: one line on stderr, exit 2, checked before compute, every file as it was.

Resumes that cannot run, outputs that cannot be written (a file in the way, a read-only folder, a
full disk), outputs inside an oversight log, values and knobs that have no effect, and crafted or
damaged log and resume files. A full disk is simulated by making ``fsync`` fail with ENOSPC; a
read-only folder by making the writability probe fail with EACCES when the tests run as root (for
whom ``chmod`` blocks nothing), with ``chmod`` otherwise.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgmf_marl import atomic, runs
from fgmf_marl.config import ConfigError
from fgmf_marl.jobs import adversary, alarms, certify, evaluate, explain, replay, reproduce, train
from fgmf_marl.oversight import replay as replay_library
from fgmf_marl.oversight.render import render_frames
from fgmf_marl.oversight.store import Episode
from fgmf_marl.runs import RunDir
from fgmf_marl.teams import grid, training
from test_oversight import sign_noise, write_log

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2",
        "env.native.max_steps=10", "checkpoint_every=192", "--no-progress"]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders and pipes): what "as it found it" compares."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _one_line_exit_2(code: int, capsys: pytest.CaptureFixture, names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert names in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    root = tmp_path_factory.mktemp("runs") / "tiny"
    assert train.entry(["--timesteps", "384", "--run-dir", str(root), *TINY]) == 0
    return RunDir(root)


@pytest.fixture(scope="module")
def log_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log root of two cell logs, as evaluate.py --log-explanations writes."""
    root = tmp_path_factory.mktemp("logs") / "root"
    write_log(root / "cell_a", n_episodes=1, every=2, perturb=sign_noise(), attack="sign-noise")
    shutil.copytree(root / "cell_a", root / "cell_b")
    return root


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.os, "fsync", fsync)


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` refuses new files: chmod, or for root (whom chmod does not stop) a failing writability probe."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(runs.tempfile, "TemporaryDirectory", refuse)


# ----------------------------------------------------------------------------------- train_marl.py
def test_a_refused_resume_leaves_the_run_byte_identical(run: RunDir, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    before = _tree(copy.root)
    code = train.entry(["--resume", "--run-dir", str(copy.root), "--timesteps", "100", "checkpoint_every=64",
                        "eval_episodes=3", "--no-progress"])
    _one_line_exit_2(code, capsys, "cannot resume: the run already has")
    assert _tree(copy.root) == before
    # trained but never evaluated: a resume may evaluate it, but not under a smaller budget than it was given
    shutil.rmtree(copy.eval)
    before = _tree(copy.root)
    code = train.entry(["--resume", "--run-dir", str(copy.root), "--timesteps", "100", "--no-progress"])
    _one_line_exit_2(code, capsys, "raise --timesteps")
    assert _tree(copy.root) == before


def test_a_resume_state_of_the_wrong_shape_resumes_with_a_fresh_reset(run: RunDir, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    copy.final_checkpoint.unlink()
    shutil.rmtree(copy.eval)
    for p in copy.checkpoints.glob("step_384*"):
        p.unlink()
    state = copy.resume_state_of(copy.checkpoint_at(192))
    with np.load(state) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["last_obs"] = arrays["last_obs"][:, :, :7]
    with open(state, "wb") as fh:
        np.savez(fh, **arrays)
    capsys.readouterr()
    assert train.entry(["--resume", "--run-dir", str(copy.root), "--no-progress"]) == 0
    assert "with a fresh env reset (step_192.resume.npz does not fit this run: last_obs is uint8" in \
        capsys.readouterr().out


def test_a_full_disk_under_a_new_run_is_one_line_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _full_disk(monkeypatch)
    code = train.entry(["--timesteps", "64", "--run-dir", str(tmp_path / "new"), *TINY])
    _one_line_exit_2(code, capsys, f"cannot write {tmp_path / 'new' / 'config.yaml'}: No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, names", [
    (["--adversary", "director", "adversary.bpda=true"], "adversary.bpda=True has no effect with adversary.kind=director; "
                                                         "it applies with adversary.kind=fgsm or pgd"),
    (["adversary.director_steps=16"], "adversary.director_steps=16 has no effect with adversary.kind=none"),
    (["--adversary", "fgsm", "adversary.steps=5"], "adversary.steps=5 has no effect with adversary.kind=fgsm"),
    (["adversary.eps=8"], "adversary.eps=8.0 has no effect with adversary.kind=none"),
])
def test_adversary_knobs_without_effect_in_the_mode_are_refused(args: list[str], names: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    code = train.entry(["--timesteps", "64", "--run-dir", str(tmp_path / "new"), *TINY, *args])
    _one_line_exit_2(code, capsys, names)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- evaluate.py
@pytest.mark.parametrize("args, names", [
    (["--budget-agents", ""], "budget_agents is an empty list"),
    (["--budget-agents", ",,"], "budget_agents is an empty list"),
    (["--budget-steps", ""], "budget_steps is an empty list"),
    (["--budget-agents", "1", "--budget-steps", ","], "budget_steps is an empty list"),
    (["--budget-selectors", "random"], "budget_selectors='random' has no effect without a budget"),
])
def test_empty_budgets_and_selectors_without_a_budget_are_refused(args: list[str], names: str, run: RunDir,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = evaluate.entry([str(run.root), "--out", str(tmp_path / "out"), "--attacks", "random", "--eps", "2",
                           "--no-progress", *args])
    _one_line_exit_2(code, capsys, names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["out", "log"])
def test_a_full_disk_under_evaluate_is_one_line_and_leaves_nothing(where: str, run: RunDir, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [str(run.root), "--out", str(tmp_path / "out"), "--attacks", "random", "--eps", "2", "--episodes", "1",
            "--n-envs", "1", "--no-progress", "--log-explanations", str(tmp_path / "logs")]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:   # the disk fills up once the first oversight log episode is being written
        if where == "out" or ".ep_" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    err = _one_line_exit_2(evaluate.entry(argv), capsys, "No space left on device")
    assert err.startswith("evaluate.py: error: cannot write ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--log-explanations"])
def test_evaluate_checks_its_output_folders_before_loading_anything(flag: str, run: RunDir, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(grid, "load_victim", lambda *a, **k: pytest.fail("loaded a checkpoint first"))
    argv = [str(run.root), "--out", str(tmp_path / "out"), "--attacks", "random", "--eps", "2", "--no-progress",
            flag, str(tmp_path / "a_file" / "sub")]
    _one_line_exit_2(evaluate.entry(argv), capsys, "lies under the file")


# --------------------------------------------------------------------------------------- replay.py
@pytest.mark.parametrize("command", ["render", "report"])
@pytest.mark.parametrize("case", ["under_a_file", "read_only", "full_disk", "fifo", "folder"])
def test_replay_outputs_that_cannot_be_written_are_one_line(command: str, case: str, log_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "a_file").write_text("x")
    out = {"under_a_file": out_dir / "a_file" / "x", "read_only": out_dir / "x", "full_disk": out_dir / "x",
           "fifo": out_dir / "pipe", "folder": out_dir}[case]
    if case == "folder" and command == "render":   # -o names the videos without their suffix
        (out_dir / "x.mp4").mkdir()
        out = out_dir / "x"
    if case == "fifo":
        os.mkfifo(out_dir / "pipe.html" if command == "report" else out_dir / "pipe.mp4")
        out = out.with_suffix(".html") if command == "report" else out
    elif command == "report" and case != "folder":
        out = out.with_suffix(".html")
    if case == "read_only":
        _read_only(monkeypatch, out_dir)
    if case == "full_disk":
        _full_disk(monkeypatch)
    logs_before = _tree(log_root)
    before = _tree(out_dir)
    target = f"{log_root / 'cell_a'}:0" if command == "render" else str(log_root)
    code = replay.entry([command, target, "-o", str(out)])
    names = {"under_a_file": "lies under the file", "read_only": "is not writable", "fifo": "is not a regular file",
             "full_disk": "No space left on device", "folder": "is an existing folder"}[case]
    _one_line_exit_2(code, capsys, names)
    out_dir.chmod(0o755)
    assert _tree(out_dir) == before and _tree(log_root) == logs_before


@pytest.mark.parametrize("inside", ["cell_a/manifest.jsonl", "cell_b/ep_000000.json", "cell_a/quarantine/x.html",
                                    "cell_b/sub/report.html", "cell_a/../cell_b/report.html"])
def test_report_refuses_any_output_inside_a_log_of_its_root(inside: str, log_root: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    before = _tree(log_root)
    code = replay.entry(["report", str(log_root), "-o", str(log_root / inside)])
    _one_line_exit_2(code, capsys, "is inside the oversight log")
    assert _tree(log_root) == before


def test_report_may_write_into_a_logs_replay_folder(log_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(log_root, root)
    assert replay.entry(["report", str(root), "-o", str(root / "cell_a" / "replay" / "all.html")]) == 0
    assert (root / "cell_a" / "replay" / "all.html").is_file()


def _crafted(log_root: Path, tmp_path: Path, edit_meta: Any = None, edit_arrays: Any = None) -> Path:
    log = tmp_path / "log"
    shutil.copytree(log_root / "cell_a", log)
    if edit_meta is not None:
        meta = json.loads((log / "ep_000000.json").read_text())
        edit_meta(meta)
        (log / "ep_000000.json").write_text(json.dumps(meta))
    if edit_arrays is not None:
        with np.load(log / "ep_000000.npz") as data:
            arrays = {k: data[k] for k in data.files}
        edit_arrays(arrays)
        with open(log / "ep_000000.npz", "wb") as fh:
            np.savez(fh, **arrays)
    return log


@pytest.mark.parametrize("edit_meta, edit_arrays, names", [
    (lambda m: m.update(n_agents=10**9), None, "n_agents is 1000000000 but actions has shape (5, 2)"),
    (lambda m: m.update(n_agents="2"), None, "n_agents is '2'"),
    (None, lambda a: a.update(logged_t=a["logged_t"] + 1000), "logged_t must be step indices in 0..4"),
    (None, lambda a: a.update(logged_t=-a["logged_t"] - 1), "logged_t must be step indices"),
    (None, lambda a: a.update(pgca_final=a["pgca_final"][:, :1]), "array 'pgca_final' has shape (3, 1, 24, 24)"),
    (None, lambda a: a.update(actions=a["actions"] + 100), "actions must be in 0..4"),
    (None, lambda a: a.update(probs=a["probs"].astype(str)), "array 'probs' has dtype <U"),
    (None, lambda a: a.pop("values"), "array 'values' is missing"),
    (None, lambda a: a.update(sgam_mask=np.zeros((3, 2, 12, 12))), "the logged images and maps differ in size"),
])
@pytest.mark.parametrize("command", ["render", "report"])
def test_crafted_episodes_are_one_line_errors(command: str, edit_meta: Any, edit_arrays: Any, names: str,
                                              log_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = _crafted(log_root, tmp_path, edit_meta, edit_arrays)
    target = f"{log}:0" if command == "render" else str(log)
    code = replay.entry([command, target, "-o", str(tmp_path / "out" / "x")])
    _one_line_exit_2(code, capsys, names)
    assert not (tmp_path / "out").exists()


def test_frames_beyond_the_memory_budget_are_refused_before_any_is_drawn() -> None:
    steps, agents = 200, 3
    arrays = {"seen_obs": np.zeros((steps, agents, 3, 48, 48), np.float16), "pgca_final": np.zeros((1,)),
              "logged_t": np.arange(steps)}
    episode = Episode("ep_000000", arrays, {"n_agents": agents})
    with pytest.raises(ConfigError, match=r"200 frames of 3 agents' 48x48 px views at scale 64 need [\d.]+ GiB; "
                                          r"accepted: at most 1 GiB"):
        render_frames(episode, 64)


# --------------------------------------------------------------------------------- fuzzing the CLIs
class ReachedCompute(Exception):
    """Raised where a command's compute would begin: every check before it passed."""


FUZZ_VALUES = ["nan", "-nan", ".nan", "inf", "-inf", ".inf", "1e400", "-1e400", str(2**64), str(10**12), "-1", "0",
               "", " ", ",", ",,", "1,,2", "abc", "1.5", "-0.5", "0x10", "[1, 2]", "{a: 1}", "null", "true", "~",
               "../..", "/proc/no-such/x", "cuda:abc", "1e-300", "é"]
#: each command's job module, where its compute begins (module, name), and the arguments that make the rest of
#: a call valid
COMMANDS = {
    "train": (train, (training, "training_env"), ["--no-progress"]),
    "evaluate": (evaluate, (grid, "load_victim"), ["checkpoint", "--no-progress"]),
    "replay": (replay, (replay_library, "replay"), []),
    "explain": (explain, (explain, "explain"), ["--checkpoint", "ckpt", "--no-progress"]),
    "certify": (certify, (certify, "certify"), ["ckpt", "--no-progress"]),
    "adversary": (adversary, (adversary, "train_adversary"), ["--victim", "ckpt", "--no-progress"]),
    "alarms": (alarms, (alarms, "resolve_checkpoint"), ["ckpt"]),
    "reproduce": (reproduce, (reproduce, "load_experiment"), ["experiments/tiny.yaml", "--no-progress"]),
}


def _flags(parser: Any) -> list[tuple[str, bool]]:
    """(option, takes a value) of every optional argument of ``parser`` but --help."""
    return [(a.option_strings[-1], a.nargs != 0) for a in parser._actions
            if a.option_strings and a.dest != "help"]


def _subparsers(parser: Any) -> dict[str, Any]:
    action = next((a for a in parser._actions if a.choices and isinstance(a.choices, dict)), None)
    return dict(action.choices) if action is not None else {}


def _argv(command: str, data: Any) -> list[str]:
    module, _, base = COMMANDS[command]
    parser = module.build_parser()
    subs = _subparsers(parser)
    if subs:
        sub = data.draw(st.sampled_from(sorted(subs)))
        parser, base = subs[sub], [sub, data.draw(st.sampled_from(["log", "log:0", *FUZZ_VALUES]))]
    flags = data.draw(st.lists(st.sampled_from(_flags(parser)), max_size=4))
    argv = list(base)
    for flag, takes_value in flags:
        argv += [flag, data.draw(st.one_of(st.sampled_from(FUZZ_VALUES), st.text(max_size=6)))] if takes_value \
            else [flag]
    return argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_flags_end_in_exit_2_or_reach_compute_never_a_traceback(command: str, data: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    module, (library, compute), _ = COMMANDS[command]

    def reached(*args: Any, **kwargs: Any) -> None:
        raise ReachedCompute
    monkeypatch.setattr(library, compute, reached)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FGMF_LOG_KEY_FILE", raising=False)
    argv = [a.replace("\x00", "") for a in _argv(command, data)]   # a real command line cannot hold NUL
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        code = module.entry(argv)
    except ReachedCompute:
        code = None
    finally:
        torch.set_num_threads(threads)
    if code is not None:
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and "error:" in err, (argv, err)
    assert list(tmp_path.iterdir()) == [], argv   # nothing written before compute
