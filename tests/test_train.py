"""Training end to end: run directory contents, checkpoint reload, resume, and every CLI error path."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.jobs.train import entry as cli
from fgmf_marl.runs import RunDir
from fgmf_marl.teams.checkpoints import load_model

FAST = ["env.n_envs=4", "ppo.n_steps=32", "ppo.batch_size=128", "ppo.n_epochs=1", "eval_episodes=4",
        "checkpoint_every=768"]


def _train(run_dir: Path, *extra: str) -> int:
    return cli(["--timesteps", "1536", "--run-dir", str(run_dir), "--no-progress", *FAST, *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    root = tmp_path_factory.mktemp("runs") / "short"
    assert _train(root) == 0
    return RunDir(root)


def test_short_run_writes_config_checkpoints_tensorboard_and_summary(trained_run: RunDir) -> None:
    assert trained_run.config.is_file()
    assert trained_run.final_checkpoint.is_file()
    assert trained_run.checkpoint_at(1536).is_file() or any(trained_run.checkpoints.glob("step_*.zip"))
    assert list(trained_run.tensorboard.rglob("events.out.tfevents.*"))
    summary = json.loads((trained_run.eval / "summary.json").read_text())
    assert summary["timesteps"] >= 1536 and summary["episodes"] == 4
    assert np.isfinite(summary["normalised_mean"])


def test_tensorboard_holds_the_final_scores_hparams_and_pgca_overlays(trained_run: RunDir) -> None:
    events = EventAccumulator(str(trained_run.tensorboard / "final"), size_guidance={"images": 0}).Reload()
    summary = json.loads((trained_run.eval / "summary.json").read_text())
    scalars = events.Scalars("final/normalised_mean")   # add_scalar's, and add_hparams' copy of its metrics
    assert all(s.value == pytest.approx(summary["normalised_mean"], rel=1e-5) for s in scalars)
    assert summary["timesteps"] in {s.step for s in scalars}
    images = events.Images("final/pgca_agents")
    assert len(images) == 4 and images[0].width == 3 * 48 and images[0].height == 48   # 3 agents side by side
    plugins = {value.metadata.plugin_data.plugin_name for path in (trained_run.tensorboard / "final").glob("events.*")
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    assert "hparams" in plugins


def test_checkpoint_reload_reproduces_actions(trained_run: RunDir) -> None:
    model, cfg = load_model(trained_run.root)
    reloaded, _ = load_model(trained_run.final_checkpoint)
    assert cfg.env.n_envs == 4 and cfg.ppo.n_steps == 32
    obs = torch.rand(16, *model.observation_space.shape)
    with torch.no_grad():
        a = PolicyView.from_model(model)(obs)
        b = PolicyView.from_model(reloaded)(obs)
    assert torch.equal(a, b)
    uint8_obs = (obs * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(model.predict(uint8_obs, deterministic=True)[0],
                                  reloaded.predict(uint8_obs, deterministic=True)[0])


def test_final_evaluation_writes_a_verifiable_oversight_log(tmp_path: Path) -> None:
    from fgmf_marl.oversight.store import list_episodes, verify

    root = tmp_path / "logged"
    assert cli(["--timesteps", "384", "--run-dir", str(root), "--no-progress", "--log-explanations", "log_every=10",
                *FAST, "eval_episodes=2"]) == 0
    log_dir = RunDir(root).eval / "oversight"
    assert verify(log_dir).ok
    assert len(list_episodes(log_dir)) == 2


def test_resume_continues_to_the_new_total(tmp_path: Path, trained_run: RunDir) -> None:
    import shutil

    root = tmp_path / "resumed"
    shutil.copytree(trained_run.root, root)
    run = RunDir(root)
    spent = json.loads(run.training_time_of(run.final_checkpoint).read_text())["wall_seconds"]
    assert spent == json.loads((run.eval / "summary.json").read_text())["wall_seconds"] > 0
    assert cli(["--resume", "--run-dir", str(root), "--timesteps", "2304", "--no-progress"]) == 0
    model, _ = load_model(root)
    assert model.num_timesteps >= 2304
    # the summary counts the training before the resume too, not only the last segment
    summary = json.loads((run.eval / "summary.json").read_text())
    assert summary["wall_seconds"] > spent and summary["fps"] == pytest.approx(2304 / summary["wall_seconds"])


def test_every_checkpoint_records_the_training_seconds_spent_up_to_it(tmp_path: Path, trained_run: RunDir) -> None:
    steps = sorted(trained_run.checkpoints.glob("step_*.zip"), key=lambda p: int(p.stem.split("_")[1]))
    assert steps
    times = [json.loads(trained_run.training_time_of(p).read_text()) for p in steps]
    assert [t["timesteps"] for t in times] == [int(p.stem.split("_")[1]) for p in steps]
    assert all(0 < a["wall_seconds"] <= b["wall_seconds"] for a, b in zip(times, times[1:] + times[-1:]))
    # a checkpoint without the record (written before the clock existed): the total is unknown, not the segment
    run = RunDir(tmp_path / "unrecorded")
    shutil.copytree(trained_run.root, run.root)
    run.final_checkpoint.unlink()
    shutil.rmtree(run.eval)
    for p in run.checkpoints.glob("*.time.json"):
        p.unlink()
    assert cli(["--resume", "--run-dir", str(run.root), "--no-progress"]) == 0
    assert math.isnan(json.loads((run.eval / "summary.json").read_text())["wall_seconds"])


def test_resume_of_a_trained_but_unevaluated_run_only_evaluates_it(tmp_path: Path, trained_run: RunDir) -> None:
    run = RunDir(tmp_path / "unevaluated")
    shutil.copytree(trained_run.root, run.root)
    before = json.loads((run.eval / "summary.json").read_text())
    shutil.rmtree(run.eval)                               # killed after final.zip, before the evaluation
    final = run.final_checkpoint.read_bytes()
    assert cli(["--resume", "--run-dir", str(run.root), "--no-progress"]) == 0
    after = json.loads((run.eval / "summary.json").read_text())
    assert run.final_checkpoint.read_bytes() == final     # not trained further
    assert after["timesteps"] == before["timesteps"] and after["normalised_mean"] == before["normalised_mean"]
    assert after["wall_seconds"] == pytest.approx(before["wall_seconds"])   # the recorded training time
    assert cli(["--resume", "--run-dir", str(run.root), "--no-progress"]) == 2   # evaluated: nothing left to do


def test_linear_lr_schedule_anneals_to_zero(tmp_path: Path, trained_run: RunDir) -> None:
    """CleanRL-style annealing (the default): the run's last update uses lr 0; ``constant`` keeps the lr."""
    assert _train(tmp_path / "constant", "ppo.lr_schedule=constant", "ppo.learning_rate=1e-3") == 0
    constant, _ = load_model(tmp_path / "constant")
    annealed, cfg = load_model(trained_run.root)
    assert cfg.ppo.lr_schedule == "linear"
    assert annealed.policy.optimizer.param_groups[0]["lr"] == 0.0
    assert constant.policy.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments"),
    (["--env", "nope"], "invalid choice"),
    (["ppo.not_a_key=1"], "unknown config key 'ppo.not_a_key'"),
    (["ppo.n_steps=abc"], "'ppo.n_steps' must be an integer"),
    (["ppo.learning_rate=-1"], "ppo.learning_rate=-1.0 must be in (0, 1]"),
    (["ppo.n_steps=100000", "env.n_envs=4096"], "GiB rollout buffer; accepted: up to 8 GiB"),
    (["ppo.lr_schedule=cosine"], "ppo.lr_schedule"),
    (["policy.train_dtype=float16"], "policy.train_dtype"),
    (["env.name=nope"], "unknown environment 'nope'"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--resume"], "is not a run directory"),
    (["--defense", "nope"], "invalid choice"),
    (["ppo.batch_size=100000", "env.n_envs=2"], "exceeds the rollout size"),
])
def test_cli_errors_exit_2_with_one_line_and_no_run_dir(argv: list[str], message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert cli([*argv, "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_incompatible_checkpoint_on_resume_is_a_clean_error(tmp_path: Path, trained_run: RunDir,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root = tmp_path / "other"
    shutil.copytree(trained_run.root, root)
    code = cli(["--resume", "--run-dir", str(root), "--timesteps", "3000", "--no-progress", "env.native.size=32"])
    assert code == 2
    assert "incompatible" in capsys.readouterr().err
    assert RunDir(root).final_checkpoint.is_file()  # the existing run is left as it was


def test_resume_applies_a_new_budget_and_refuses_what_it_cannot_change(tmp_path: Path, trained_run: RunDir,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import yaml

    root = tmp_path / "resumed"
    shutil.copytree(trained_run.root, root)
    before = (root / "config.yaml").read_text()
    for override in ("ppo.n_steps=16", "ppo.ent_coef=0.5", "seed=9", "defense.kind=sappo"):
        assert cli(["--resume", "--run-dir", str(root), "--timesteps", "3000", "--no-progress", override]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--resume: {override.split('=')[0]}=" in err and "only these may change" in err
        assert len(err.splitlines()) == 1 and (root / "config.yaml").read_text() == before
    assert cli(["--resume", "--run-dir", str(root), "--timesteps", "2304", "--no-progress", "eval_episodes=2"]) == 0
    recorded = yaml.safe_load((root / "config.yaml").read_text())
    assert recorded["timesteps"] == 2304 and recorded["eval_episodes"] == 2  # describes the run as trained
    assert json.loads((root / "eval" / "summary.json").read_text())["episodes"] == 2


def test_missing_checkpoint_is_a_clean_error(tmp_path: Path) -> None:
    from fgmf_marl.config import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "nothing.zip")
    (tmp_path / "garbage.zip").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_model(tmp_path / "garbage.zip")



def test_bfloat16_training_runs_and_records_its_dtype(tmp_path: Path) -> None:
    assert _train(tmp_path / "bf16", "policy.train_dtype=bfloat16", "--defense", "fgmf") == 0
    assert "train_dtype: bfloat16" in (tmp_path / "bf16" / "config.yaml").read_text()
    summary = json.loads((tmp_path / "bf16" / "eval" / "summary.json").read_text())
    assert np.isfinite(summary["normalised_mean"])


def _policy_tensors(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(path)
    return model.policy.state_dict()


@pytest.mark.parametrize("extra", [
    [],
    # the regularisers' generator, the attacker's slot generator and its PGD random starts, all active
    ["--defense", "fgmf", "--adversary", "pgd", "adversary.start=0", "adversary.warmup=0", "adversary.steps=1",
     "defense.scorpio.start=0", "defense.scorpio.warmup=0", "defense.scorpio.every=1",
     "defense.sgam.start=0", "defense.sgam.warmup=0"],
], ids=["ppo", "fgmf_adversarial"])
def test_an_interrupted_run_resumes_bit_for_bit(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str]) -> None:
    """What a kill after the step-768 checkpoint leaves, resumed, ends in the uninterrupted run's very weights.

    1,536 steps, so that two updates follow the cut: the learning rate anneals to 0 at the last one."""
    fast = [o for o in FAST if not o.startswith("checkpoint_every")] + ["checkpoint_every=384"]
    clean = RunDir(tmp_path / "clean")
    assert cli(["--timesteps", "1536", "--run-dir", str(clean.root), "--no-progress", *fast, *extra]) == 0
    assert clean.resume_state_of(clean.checkpoint_at(768)).is_file()
    cut = clean.checkpoint_at(768)

    def interrupted(name: str) -> RunDir:
        run = RunDir(tmp_path / name)
        shutil.copytree(clean.root, run.root)
        run.final_checkpoint.unlink()
        shutil.rmtree(run.eval)
        for p in run.checkpoints.glob("step_*"):
            if not p.name.startswith(cut.stem + "."):
                p.unlink()
        return run

    exact = interrupted("exact")
    assert cli(["--resume", "--run-dir", str(exact.root), "--no-progress"]) == 0
    assert "resuming from step_768.zip: exactly" in capsys.readouterr().out
    reference = _policy_tensors(clean.final_checkpoint)
    resumed = _policy_tensors(exact.final_checkpoint)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert json.loads((exact.eval / "summary.json").read_text())["normalised_mean"] == \
        json.loads((clean.eval / "summary.json").read_text())["normalised_mean"]
    # without the state file the same resume restarts the env and the random streams: other weights
    fresh = interrupted("fresh")
    fresh.resume_state_of(fresh.checkpoint_at(768)).unlink()
    assert cli(["--resume", "--run-dir", str(fresh.root), "--no-progress"]) == 0
    assert "with a fresh env reset (no step_768.resume.npz" in capsys.readouterr().out
    other = _policy_tensors(fresh.final_checkpoint)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


class _Payload:
    """Unpickling this writes a marker file: proof that a loader ran code from the file."""

    marker: Path

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "ran"))


def test_a_resume_state_file_can_never_run_code(tmp_path: Path, trained_run: RunDir, capsys: pytest.CaptureFixture) -> None:
    from fgmf_marl.teams.checkpoints import restore_resume_state

    run = RunDir(tmp_path / "hostile")
    shutil.copytree(trained_run.root, run.root)
    payload = _Payload()
    payload.marker = tmp_path / "marker"
    state = run.resume_state_of(run.checkpoint_at(768))
    assert state.is_file()
    with open(state, "wb") as fh:
        np.savez(fh, __json__=np.array([payload], dtype=object))
    model, _ = load_model(run.checkpoint_at(768))
    assert restore_resume_state(state, model) == f"{state.name} is unreadable (ValueError)"
    assert not payload.marker.exists() and model._last_obs is None
