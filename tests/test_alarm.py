"""The attack alarm: its features against their definitions (the median squeezer against scipy's median filter,
the power transform against scipy's Yeo-Johnson), its score against scipy's Mahalanobis distance, its calibrated
false-alarm rate on fresh clean data, its AUROC against a brute-force pair count, the saved detector's refusals,
the adaptive attack (inside the budget, quieter than PGD), and the study, the log, the report and verify end to end
on a real policy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from scipy.spatial.distance import mahalanobis
from torch import nn

from fgmf_marl.attacks import PGD, expand_presets
from fgmf_marl.attacks.threats import FAULTS
from fgmf_marl.config import ConfigError
from fgmf_marl.attribution.pgca import PGCAResult
from fgmf_marl.oversight.alarm import (FEATURES, RESIDUAL_FLOOR, SQUEEZE_BITS, AdaptivePGD, AlarmDetector, StepHistory,
                                       auroc, episode_alarm_threshold, explanation_features, feature_names, median3,
                                       step_features, yeo_johnson)


class TinyView(nn.Module):
    """A policy view with the two calls the alarm makes: logits, and logits with a value."""

    n_actions = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)
        self.critic = nn.Linear(4 * 8 * 8, 1)

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(obs)).flatten(1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return 5 * self.head(self._features(obs))

    def logits_and_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._features(obs)
        return 5 * self.head(f), self.critic(f).squeeze(-1)


def _flat_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images of flat colour blocks, like the rendered worlds the alarm watches."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(n, 3, 2, 2, generator=gen)
    return blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def test_step_features_follow_their_definitions() -> None:
    view = TinyView().eval()
    obs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    previous = torch.tensor([[0.1, 0.2, 0.7], [float("nan")] * 3])
    previous_obs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    previous_obs[1] = float("nan")                              # slot 1's episode just began
    with torch.no_grad():
        f = step_features(view, obs, previous, previous_obs).numpy()
        logits, values = view.logits_and_value(obs)
    probs = torch.softmax(logits, -1).numpy().astype(np.float64)
    assert f.shape == (2, len(FEATURES))
    top = np.sort(probs, axis=-1)
    assert f[:, 0] == pytest.approx(top[:, -1] - top[:, -2], abs=1e-6)
    assert f[:, 1] == pytest.approx(-(probs * np.log(probs)).sum(-1), abs=1e-5)
    assert f[:, 2] == pytest.approx(values.numpy(), abs=1e-6)
    assert f[:, 3] == pytest.approx([0.5 * np.abs(probs[0] - previous[0].numpy()).sum(), 0.0], abs=1e-6)
    levels = 2 ** SQUEEZE_BITS - 1
    with torch.no_grad():
        p_bits = torch.softmax(view(torch.round(obs * levels) / levels), -1).numpy()
        smoothed = scipy.ndimage.median_filter(obs.numpy(), size=(1, 1, 3, 3), mode="nearest")
        p_median = torch.softmax(view(torch.from_numpy(smoothed)), -1).numpy()
    assert f[:, 4] == pytest.approx(np.abs(probs - p_bits).sum(-1), abs=1e-5)
    assert f[:, 5] == pytest.approx(np.abs(probs - p_median).sum(-1), abs=1e-5)
    residual = np.abs(obs.numpy() - smoothed).reshape(2, -1).mean(1)
    assert f[:, 6] == pytest.approx(np.log(residual + RESIDUAL_FLOOR), abs=1e-5)
    change = np.abs(obs.numpy()[0] - previous_obs.numpy()[0]).mean()
    assert f[0, 7] == pytest.approx(np.log(change + RESIDUAL_FLOOR), abs=1e-5) and np.isnan(f[1, 7])
    with torch.no_grad():
        assert np.isnan(step_features(view, obs, previous).numpy()[:, 7]).all()    # no previous frame at all


def _explained(final: torch.Tensor, seed: int = 0) -> PGCAResult:
    """A PGCA result with the given final maps and arbitrary, known evidence and agreement."""
    gen = torch.Generator().manual_seed(seed)
    b = final.shape[0]
    return PGCAResult(P=final, G=final, consensus=final, final=final, agreement=torch.rand(b, generator=gen) * 2 - 1,
                      topk_iou=torch.rand(b, generator=gen), target=torch.zeros(b, dtype=torch.long),
                      evidence=torch.rand(b, generator=gen) * 3)


def test_explanation_features_follow_their_definitions() -> None:
    gen = torch.Generator().manual_seed(4)
    final, previous = torch.rand(3, 6, 6, generator=gen), torch.rand(3, 6, 6, generator=gen)
    previous[2] = float("nan")                                  # slot 2's episode just began
    mask, previous_mask = torch.rand(3, 6, 6, generator=gen), torch.rand(3, 6, 6, generator=gen)
    explanation = _explained(final)
    f = explanation_features(explanation, mask, previous, previous_mask).numpy()
    assert f.shape == (3, 4)
    assert f[:, 0] == pytest.approx(explanation.evidence.numpy()) and f[:, 1] == pytest.approx(explanation.agreement.numpy())
    a, b = final.numpy().reshape(3, -1), previous.numpy().reshape(3, -1)
    tv = 0.5 * np.abs(a / a.sum(1, keepdims=True) - b / b.sum(1, keepdims=True)).sum(1)
    assert f[:2, 2] == pytest.approx(tv[:2], abs=1e-6) and np.isnan(f[2, 2])
    assert f[:, 3] == pytest.approx(np.abs(mask.numpy() - previous_mask.numpy()).reshape(3, -1).mean(1), abs=1e-6)
    assert explanation_features(explanation, None, final).numpy()[:, 2] == pytest.approx(0.0, abs=1e-6)   # no change
    assert np.isnan(explanation_features(explanation).numpy()[:, 2]).all()                  # no previous map at all


def test_the_step_history_forgets_a_slot_whose_episode_begins() -> None:
    view = TinyView().eval()
    obs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    history = StepHistory()
    with torch.no_grad():
        probs = torch.softmax(view(obs), -1)
    final = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(6))
    first = history.features(view, obs, probs, np.array([True, True]), _explained(final), final)
    assert first.shape == (2, len(feature_names(True, mask=True))) and np.isnan(first[:, [7, 10, 11]].numpy()).all()
    second = history.features(view, obs, probs, np.array([False, True]), _explained(final), final)
    assert second[0, [7, 10, 11]].numpy() == pytest.approx([np.log(RESIDUAL_FLOOR), 0.0, 0.0], abs=1e-6)
    assert np.isnan(second[1, [7, 10, 11]].numpy()).all()
    assert feature_names() == FEATURES and feature_names(True)[-1] == "explanation_change"


def test_the_median_squeezer_is_scipys_median_filter() -> None:
    x = torch.rand(3, 2, 9, 7, generator=torch.Generator().manual_seed(2))
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="nearest")
    assert np.allclose(median3(x).numpy(), ref)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0, 3.3, -1.2])
def test_the_power_transform_is_scipys_yeo_johnson(lam: float) -> None:
    x = np.random.default_rng(0).normal(size=(200, 1)) * 3
    ours = yeo_johnson(torch.from_numpy(x), torch.tensor([lam], dtype=torch.float64)).numpy()[:, 0]
    assert ours == pytest.approx(scipy.stats.yeojohnson(x[:, 0], lam), rel=1e-10, abs=1e-12)


def test_the_score_is_the_mahalanobis_distance_and_the_false_alarm_rate_holds_on_fresh_data() -> None:
    rng = np.random.default_rng(0)
    cov = np.diag([1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.5])
    cov[0, 1] = cov[1, 0] = 0.3
    cov[6, 7] = cov[7, 6] = 0.6                                # the frame change correlates with the residual
    skew = np.array([0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)     # two heavy-tailed features, like a squeezer's distance
    clean = lambda n: np.where(skew, np.exp(rng.multivariate_normal(np.zeros(8), cov, n)),   # noqa: E731
                               rng.multivariate_normal(np.zeros(8), cov, n))
    first_steps = clean(500)
    first_steps[:, 7] = np.nan                                 # episode starts: no frame change, not fitted on
    detector = AlarmDetector.fit(np.concatenate([clean(20000), first_steps]), clean(20000), false_alarm_rate=0.01)
    x = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.1, 0.2, -1.0])
    z = np.array([scipy.stats.yeojohnson(np.array([v]), lam)[0] for v, lam in zip(x, detector.lambdas)])
    assert detector.score(x) == pytest.approx(mahalanobis(z, detector.mean, detector.precision))
    # a step without a frame change: the distance under the marginal of the other seven features
    marginal = np.linalg.inv(np.linalg.inv(detector.precision)[:7, :7])
    x_first = np.concatenate([x[:7], [np.nan]])
    assert detector.score(x_first) == pytest.approx(mahalanobis(z[:7], detector.mean[:7], marginal))
    assert detector.score(np.stack([x, x_first])) == pytest.approx([float(detector.score(x)), float(detector.score(x_first))])
    assert detector.alarms(clean(50000)).mean() == pytest.approx(0.01, abs=0.003)
    shifted = clean(5000) + np.array([0, 0, 3.0, 0, 0, 0, 0, 0])
    assert detector.alarms(shifted).mean() > 0.5
    with pytest.raises(ValueError, match="NaN only in log_frame_change"):
        AlarmDetector.fit(np.where(np.arange(8) == 2, np.nan, clean(100)), clean(100))


def test_no_tail_of_a_feature_is_squashed_by_the_power_transform() -> None:
    """A negative, left-skewed clean feature (like a log frame change) makes scipy's maximum-likelihood lambda ~20,
    whose transform maps the whole negative side to about one value; clipped to [0, 2], a step far below every
    clean one scores as the outlier it is."""
    rng = np.random.default_rng(0)
    clean = lambda n: np.column_stack([rng.normal(size=n), -5 - 0.2 * rng.exponential(size=n)])   # noqa: E731
    assert scipy.stats.yeojohnson(clean(20000)[:, 1])[1] > 10          # what the unclipped fit would use
    detector = AlarmDetector.fit(clean(20000), clean(20000), features=("a", "b"))
    assert (detector.lambdas >= 0).all() and (detector.lambdas <= 2).all()
    assert detector.score(np.array([[0.0, -12.0]])) > 5 * detector.threshold   # far below the clean range


def test_a_frozen_camera_is_caught_by_the_frame_change() -> None:
    """Every frame a frozen camera delivers is a clean frame; only the change since the previous one gives it away."""
    view = TinyView().eval()
    with torch.no_grad():
        def features(n: int, seed: int, frozen: bool = False) -> np.ndarray:
            obs = _flat_images(n, seed)
            previous = obs.clone() if frozen else obs + 0.05 * torch.randn(obs.shape, generator=torch.Generator().manual_seed(seed))
            return step_features(view, obs, previous_obs=previous.clamp(0, 1)).numpy()
        detector = AlarmDetector.fit(features(400, 0), features(400, 1))
        assert detector.alarms(features(400, 2)).mean() < 0.05
        assert detector.alarms(features(400, 2, frozen=True)).mean() > 0.9


def test_the_episode_alarm_threshold_is_the_binomial_quantile() -> None:
    from math import comb
    n, p = 60, 0.01
    limit = episode_alarm_threshold(n, p, 0.01)
    tail = lambda k: sum(comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1, n + 1))   # noqa: E731
    assert tail(limit) <= 0.01 < tail(limit - 1)             # P(count > limit) within the rate, one less is not
    rng = np.random.default_rng(0)
    counts = rng.binomial(n, p, 200_000)
    assert (counts > limit).mean() <= 0.01


def test_auroc_is_the_share_of_pairs_an_attacked_step_wins() -> None:
    clean, attacked = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.9, 0.35, 0.7])
    pairs = ((attacked[:, None] > clean[None]) + 0.5 * (attacked[:, None] == clean[None])).mean()
    assert auroc(clean, attacked).value == pytest.approx(pairs)


def _fitted(view: TinyView) -> AlarmDetector:
    with torch.no_grad():
        return AlarmDetector.fit(step_features(view, _flat_images(400, 0), previous_obs=_flat_images(400, 2)).numpy(),
                                 step_features(view, _flat_images(400, 1), previous_obs=_flat_images(400, 3)).numpy())


def test_a_saved_detector_loads_as_it_was_and_nothing_else_loads(tmp_path) -> None:
    detector = _fitted(TinyView().eval())
    detector.save(tmp_path / "alarm_detector.json")
    loaded = AlarmDetector.load(tmp_path / "alarm_detector.json")
    x = np.random.default_rng(0).normal(size=(5, len(FEATURES)))
    assert loaded.score(x) == pytest.approx(detector.score(x)) and loaded.threshold == detector.threshold
    data = json.loads((tmp_path / "alarm_detector.json").read_text())
    bad = {"not json": b"{", "a pickle": b"\x80\x04K\x01.", "another format": json.dumps({**data, "format": "x"}).encode(),
           "other features": json.dumps({**data, "features": data["features"][:-1]}).encode(),
           "a non-finite mean": json.dumps({**data, "mean": [float("nan")] * len(FEATURES)}).encode(),
           "no lambdas": json.dumps({k: v for k, v in data.items() if k != "lambdas"}).encode()}
    for what, content in bad.items():
        path = tmp_path / "bad.json"
        path.write_bytes(content)
        with pytest.raises(ConfigError) as err:
            AlarmDetector.load(path)
        assert "\n" not in str(err.value), what


def test_the_adaptive_attack_stays_in_budget_and_is_quieter_than_pgd() -> None:
    view = TinyView().eval()
    detector = _fitted(view)
    obs = _flat_images(64, 5)
    eps = 8 / 255
    torch.manual_seed(0)
    plain = PGD(eps, steps=20)(view, obs)
    torch.manual_seed(0)
    hidden = AdaptivePGD(eps, detector, weight=10.0, steps=20)(view, obs)
    assert (hidden - obs).abs().max() <= eps + 1e-6 and hidden.min() >= 0 and hidden.max() <= 1
    with torch.no_grad():
        loud = detector.score(step_features(view, plain, torch.softmax(view(obs), -1)).numpy())
        quiet = detector.score(step_features(view, hidden, torch.softmax(view(obs), -1)).numpy())
    assert np.median(quiet) < 0.5 * np.median(loud)


def _train_tiny(run, train_cli, timesteps: int = 256) -> None:
    assert train_cli(["--timesteps", str(timesteps), "--run-dir", str(run), "--no-progress", "env.n_envs=2",
                      "ppo.n_steps=32", "ppo.batch_size=64", "eval_episodes=2", "env.native.max_steps=10"]) == 0


def test_the_alarm_study_on_a_trained_policy(tmp_path) -> None:
    from fgmf_marl.agents.policy_view import PolicyView
    from fgmf_marl.jobs.train import entry as train_cli
    from fgmf_marl.teams.alarms import alarm_study
    from fgmf_marl.teams.checkpoints import load_model

    run = tmp_path / "run"
    _train_tiny(run, train_cli)
    model, cfg = load_model(run)
    out, detector = alarm_study(PolicyView.from_model(model).eval(), cfg.env, {"pgd": PGD(32 / 255, steps=5)},
                                episodes=4, n_envs=2, adaptive_eps=[32], adaptive_weights=[1.0])
    assert set(out["attacks"]) == {"pgd", "adaptive-pgd[weight=1]@32"}
    for r in out["attacks"].values():
        assert out["clean_steps"] == 4 * 10 * 3 and r["steps"] == 4 * 10 * 3
        assert 0 <= r["auroc_ci95"][0] <= r["auroc"] <= r["auroc_ci95"][1] <= 1 and 0 <= r["detection"] <= 1
        assert np.isfinite(r["return"]) and 0 <= r["episode_detection"] <= 1
    # a dense 32/255 perturbation of a flat-colour world lights up the input residual: PGD is caught
    assert out["attacks"]["pgd"]["auroc"] > 0.9 and detector.features == FEATURES


def test_the_explained_detector_sees_the_same_steps_and_leaves_the_policy_side_unchanged(tmp_path) -> None:
    from fgmf_marl.agents.policy_view import PolicyView
    from fgmf_marl.jobs.train import entry as train_cli
    from fgmf_marl.teams.alarms import alarm_study
    from fgmf_marl.teams.checkpoints import load_model

    run = tmp_path / "run"
    _train_tiny(run, train_cli)
    model, cfg = load_model(run)
    view = PolicyView.from_model(model).eval()
    kwargs = dict(episodes=3, n_envs=2, adaptive_eps=[32], adaptive_weights=[1.0])
    plain, _ = alarm_study(view, cfg.env, {"pgd": PGD(32 / 255, steps=3)}, **kwargs)
    out, detector = alarm_study(view, cfg.env, {"pgd": PGD(32 / 255, steps=3)}, explanations=True, **kwargs)
    explained = out.pop("explained")
    assert out == plain and detector.features == FEATURES     # explaining every step changes nothing else
    assert explained["features"] == list(feature_names(True)) and set(explained["attacks"]) == set(out["attacks"])
    assert 0 <= explained["measured_false_alarms"] <= 1
    for r in explained["attacks"].values():
        assert 0 <= r["auroc_ci95"][0] <= r["auroc"] <= r["auroc_ci95"][1] <= 1 and 0 <= r["detection"] <= 1


def test_the_alarm_families_beyond_l_inf_are_evaluate_py_s_threat_models() -> None:
    from fgmf_marl.attacks.threats import L2PGD, Corruption, Patch
    from fgmf_marl.jobs.alarms import THREAT_MODELS, families, own_budget_families

    assert set(families(8)) == {"pgd@8", "ll-pgd@8", "mad@8", "square@8"}
    l2 = families(8, threat_models=["l2"])["pgd-l2@8"]
    assert isinstance(l2, L2PGD) and l2.eps == pytest.approx(8 / 255) and l2.steps == 10
    once = own_budget_families(THREAT_MODELS)
    assert set(once) == {s.replace(":", "[", 1) + "]" for s in expand_presets(["patch", "corruptions", "faults"])}
    assert sum(isinstance(a, Corruption) for a in once.values()) == 10 and sum(isinstance(a, Patch) for a in once.values()) == 1
    assert own_budget_families(["l2"]) == {}


def test_alarm_eval_then_the_alarm_in_the_log_the_report_and_verify(tmp_path, capsys) -> None:
    from fgmf_marl.jobs.alarms import entry as alarm_cli
    from fgmf_marl.jobs.evaluate import entry as evaluate_cli
    from fgmf_marl.jobs.replay import entry as replay_cli
    from fgmf_marl.jobs.train import entry as train_cli
    from fgmf_marl.oversight import list_episodes, load_episode

    run = tmp_path / "run"
    _train_tiny(run, train_cli, timesteps=64)
    out = tmp_path / "alarm"
    assert alarm_cli([str(run), "--eps", "8", "--episodes", "2", "--n-envs", "2", "--adaptive-weights", "0.1",
                      "--threat-models", "faults", "--surrogate", str(run), "--explanations", "--out", str(out),
                      "--no-progress"]) == 0
    data = json.loads((out / "alarm_eval.json").read_text())
    assert set(data["explained"]["attacks"]) == set(data["attacks"])
    assert "explanation-side features too (evidence, agreement, explanation_change;" in (out / "alarm_eval.md").read_text()
    faults = {f"fault[kind={k}]" for k in FAULTS}          # labelled as evaluate.py labels the faults preset
    assert faults == {s.replace(":", "[", 1) + "]" for s in expand_presets(["faults"])}
    assert set(data["attacks"]) == {"pgd@8", "ll-pgd@8", "mad@8", "square@8", "transfer@8",
                                    "adaptive-pgd[weight=0.1]@8"} | faults
    assert data["attacks"]["fault[kind=blackout]"]["auroc"] > 0.9   # a black frame is far from every clean one
    assert (out / "alarm_eval_config.yaml").is_file() and (out / "alarm_detector.json").is_file()
    capsys.readouterr()
    for bad in (["--eps", ""], ["--false-alarm-rate", "1"], ["--episodes", "0"], ["--adaptive-weights", "-1"],
                ["--adaptive-weights", "1,1"], ["--threat-models", "l3"], ["--threat-models", "l2,l2"],
                ["--surrogate", str(tmp_path / "nosuch")]):
        assert alarm_cli([str(run), "--out", str(tmp_path / "no"), *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "no").exists()

    logs = tmp_path / "logs"
    assert evaluate_cli([str(run), "--attacks", "pgd", "--eps", "32", "--episodes", "2", "--n-envs", "2",
                         "--log-explanations", str(logs), "--log-every", "5", "--alarm", str(out / "alarm_detector.json"),
                         "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    attacked = next(p for p in logs.iterdir() if "pgd" in p.name)
    episode = load_episode(list_episodes(attacked)[0])
    assert episode.arrays["alarm_score"].shape == episode.arrays["actions"].shape
    assert episode.arrays["alarm"].mean() > 0.5                       # a dense 32/255 attack rings the alarm
    assert {"alarm_score", "alarm"} <= set(episode.meta["records"][0])
    capsys.readouterr()
    assert replay_cli(["verify", str(attacked)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("OK") and "alarms: " in line and "of 2 episodes" in line and "2 episode alarms" in line
    assert replay_cli(["report", str(attacked), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "ALARM" in page and "alarm_rate" in page and "episode_alarm" in page

    capsys.readouterr()
    for bad in (["--alarm", str(out / "alarm_detector.json")],                                  # no log to write to
                ["--alarm", str(out / "alarm_eval.json"), "--log-explanations", str(tmp_path / "l2")]):  # not a detector
        assert evaluate_cli([str(run), "--attacks", "pgd", "--eps", "8", "--episodes", "1", "--out",
                             str(tmp_path / "no"), "--no-progress", *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
        assert not (tmp_path / "l2").exists()
