"""The attack alarm: its features against their definitions, its Gaussian score against scipy's Mahalanobis
distance, its calibrated false-alarm rate on fresh clean data, its AUROC against a brute-force pair count, and the
study end to end on a real policy (an attack must move the scores)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from fgmf_marl.attacks import PGD
from fgmf_marl.oversight.alarm import FEATURES, AlarmDetector, auroc, step_features


def test_step_features_follow_their_definitions() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    previous = np.array([[0.1, 0.2, 0.7], [np.nan, np.nan, np.nan]])
    f = step_features(probs, np.array([1.5, -0.5]), previous)
    assert f.shape == (2, len(FEATURES))
    assert f[:, 0] == pytest.approx([0.5, 0.0])                                   # top-1 minus top-2
    assert f[0, 1] == pytest.approx(-(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)))
    assert f[:, 2].tolist() == [1.5, -0.5] and f[:, 3] == pytest.approx([0.6, 0.0])   # TV distance; new episode 0


def test_the_score_is_the_mahalanobis_distance_and_the_false_alarm_rate_holds_on_fresh_data() -> None:
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.3, 0, 0], [0.3, 2.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 1.0]])
    clean = lambda n: rng.multivariate_normal(np.zeros(4), cov, n)   # noqa: E731
    detector = AlarmDetector.fit(clean(20000), clean(20000), false_alarm_rate=0.01)
    x = np.array([1.0, -2.0, 0.5, 0.0])
    assert detector.score(x) == pytest.approx(mahalanobis(x, detector.mean, detector.precision))
    assert detector.alarms(clean(50000)).mean() == pytest.approx(0.01, abs=0.003)
    shifted = clean(5000) + np.array([0, 0, 3.0, 0])
    assert detector.alarms(shifted).mean() > 0.5


def test_auroc_is_the_share_of_pairs_an_attacked_step_wins() -> None:
    clean, attacked = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.9, 0.35, 0.7])
    pairs = ((attacked[:, None] > clean[None]) + 0.5 * (attacked[:, None] == clean[None])).mean()
    assert auroc(clean, attacked).value == pytest.approx(pairs)


def test_the_alarm_study_on_a_trained_policy(tmp_path) -> None:
    from fgmf_marl.jobs.train import entry as train_cli
    from fgmf_marl.teams.alarms import alarm_study
    from fgmf_marl.teams.checkpoints import load_model
    from agents.policy_view import PolicyView

    run = tmp_path / "run"
    assert train_cli(["--timesteps", "256", "--run-dir", str(run), "--no-progress", "env.n_envs=2", "ppo.n_steps=32",
                      "ppo.batch_size=64", "eval_episodes=2", "env.native.max_steps=10"]) == 0
    model, cfg = load_model(run)
    out = alarm_study(PolicyView.from_model(model).eval(), cfg.env, {"pgd": PGD(32 / 255, steps=5)}, episodes=4,
                      n_envs=2)
    pgd = out["attacks"]["pgd"]
    assert out["clean_steps"] == 4 * 10 * 3 and pgd["steps"] == 4 * 10 * 3
    assert 0 <= pgd["auroc_ci95"][0] <= pgd["auroc"] <= pgd["auroc_ci95"][1] <= 1 and 0 <= pgd["detection"] <= 1


def test_alarm_eval_end_to_end_and_its_refusals(tmp_path, capsys) -> None:
    import json

    from fgmf_marl.jobs.alarms import entry as alarm_cli
    from fgmf_marl.jobs.train import entry as train_cli

    run = tmp_path / "run"
    assert train_cli(["--timesteps", "64", "--run-dir", str(run), "--no-progress", "env.n_envs=2", "ppo.n_steps=32",
                      "ppo.batch_size=64", "eval_episodes=2", "env.native.max_steps=10"]) == 0
    out = tmp_path / "alarm"
    assert alarm_cli([str(run), "--eps", "8", "--episodes", "2", "--n-envs", "2", "--out", str(out)]) == 0
    data = json.loads((out / "alarm_eval.json").read_text())
    assert set(data["attacks"]) == {"pgd@8", "ll-pgd@8", "mad@8", "square@8"}
    capsys.readouterr()
    for bad in (["--eps", ""], ["--false-alarm-rate", "1"], ["--episodes", "0"]):
        assert alarm_cli([str(run), "--out", str(tmp_path / "no"), *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
