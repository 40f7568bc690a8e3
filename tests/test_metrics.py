"""Explanation metrics against hand-computed values on tiny synthetic cases."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from torch import nn

from fgmf_marl.attribution import PGCA
from fgmf_marl.attribution.metrics import (auc, deletion_auc, deletion_insertion_curves, insertion_auc,
                                           map_similarity, max_sensitivity, pointing_game,
                                           relevance_mass_accuracy, relevance_rank_accuracy, support_spearman)
from fgmf_marl.attribution.study import episode_mean_ci
from test_attribution import make_view, random_obs


def test_localisation_metrics_hand_computed() -> None:
    maps = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]] * 3)
    masks = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [0, 1]], [[0, 0], [0, 0]]], dtype=torch.bool)
    mass = relevance_mass_accuracy(maps, masks)
    assert mass[0] == pytest.approx(0.75) and mass[1] == pytest.approx(0.75) and math.isnan(mass[2])
    rank = relevance_rank_accuracy(maps, masks)
    assert rank[0] == pytest.approx(1.0) and rank[1] == pytest.approx(0.5) and math.isnan(rank[2])
    point = pointing_game(maps, masks)
    assert point[:2].tolist() == [1.0, 1.0] and math.isnan(point[2])
    miss = pointing_game(torch.tensor([[[1.0, 0.0], [0.0, 0.5]]]), torch.tensor([[[0, 1], [1, 1]]], dtype=torch.bool))
    assert miss.tolist() == [0.0]
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        relevance_mass_accuracy(maps, masks[:, 0])


class _Linear(nn.Module):
    """logits = [sum(w * x), 0]: the target score of action 0 after deleting pixels is known in closed form."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_deletion_and_insertion_auc_hand_computed() -> None:
    w = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    view = _Linear(w)
    obs = torch.ones(1, 1, 2, 2)
    maps = w.clone()  # delete in the order 4, 3, 2, 1
    curve = deletion_insertion_curves(view, obs, maps, [0], n_steps=4, kind="logit", chunk_size=3)
    assert curve.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert float(deletion_auc(view, obs, maps, [0], n_steps=4, kind="logit")) == pytest.approx(3.75)
    assert float(insertion_auc(view, obs, maps, [0], n_steps=4, kind="logit")) == pytest.approx(6.25)
    # the worst order (least important first) has a larger deletion AUC
    assert float(deletion_auc(view, obs, -maps, [0], n_steps=4, kind="logit")) == pytest.approx((9.5 + 8 + 5.5 + 2) / 4)  # curve 10, 9, 7, 4, 0
    assert auc(torch.tensor([[1.0, 1.0, 1.0]])).item() == pytest.approx(1.0)


def test_max_sensitivity_bounds_and_zero_for_constant_method() -> None:
    obs = torch.full((2, 1, 4, 4), 0.5)
    radius = 0.1

    def identity(x, target=None):
        return x[:, 0]
    sens = max_sensitivity(identity, obs, [0, 0], radius=radius, n_samples=16)
    bound = radius * 4 / (0.5 * 4)  # ||d||_F <= r sqrt(16); ||phi(x)||_F = 0.5 * sqrt(16)
    assert torch.all(sens > 0.5 * bound) and torch.all(sens <= bound + 1e-6)

    def constant(x, target=None):
        return torch.ones(x.shape[0], 4, 4)
    assert torch.all(max_sensitivity(constant, obs, [0, 0], radius=radius, n_samples=4) == 0)


def test_map_similarity_hand_computed() -> None:
    a = torch.arange(16.0).reshape(1, 4, 4)
    same = map_similarity(a, a, top_fraction=0.25)
    assert same["spearman"].item() == pytest.approx(1.0) and same["topk_iou"].item() == 1.0
    rev = map_similarity(a, -a, top_fraction=0.25)
    assert rev["spearman"].item() == pytest.approx(-1.0) and rev["topk_iou"].item() == 0.0


def test_support_spearman_matches_scipy_on_the_support_only() -> None:
    from scipy.stats import spearmanr

    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 6, 6, generator=gen), torch.rand(3, 6, 6, generator=gen)
    support = torch.rand(3, 6, 6, generator=gen) > 0.5
    support[2] = False
    support[2, 0, 0] = True  # one pixel: no rank correlation
    out = support_spearman(a, b, support)
    for i in range(2):
        expected = spearmanr(a[i][support[i]].numpy(), b[i][support[i]].numpy()).statistic
        assert out[i].item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(out[2])
    # off-support pixels never matter: a shared zero background alone gives no correlation
    shared = torch.zeros(1, 6, 6)
    x, y = shared.clone(), shared.clone()
    x[0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y[0, :2, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    assert map_similarity(x, y)["spearman"].item() > 0.5  # the full map mostly sees the common zeros
    square = torch.zeros(1, 6, 6, dtype=torch.bool)
    square[0, :2, :2] = True
    assert support_spearman(x, y, square).item() == pytest.approx(-1.0)
    assert math.isnan(support_spearman(square.float(), x, square).item())   # flat on the support: no ranking


def test_clean_vs_attacked_similarity_with_pgd() -> None:
    from fgmf_marl import attacks

    view = make_view()
    obs = random_obs(3)
    target = view(obs).argmax(-1)
    pgca = PGCA(view, grid=4)
    clean_maps = pgca.attribute(obs, target)
    none = map_similarity(clean_maps, pgca.attribute(attacks.PGD(0.0)(view, obs), target))
    assert torch.allclose(none["spearman"], torch.ones(3))
    adv = attacks.PGD(16 / 255, steps=5)(view, obs)
    assert (adv - obs).abs().max() <= 16 / 255 + 1e-6
    sim = map_similarity(clean_maps, pgca.attribute(adv, target))
    assert torch.all(sim["spearman"].abs() <= 1) and torch.all(sim["spearman"] < 1)


# ---------------------------------------------------------------- explain_eval end to end
def _untrained_run(root, **policy):
    from fgmf_marl.teams.train_config import TrainConfig
    from fgmf_marl.agents.defended import build_model
    from fgmf_marl.envs.registry import make_vec_env
    from fgmf_marl import config as cfglib
    from fgmf_marl.runs import RunDir
    cfg = cfglib.from_dict(TrainConfig, {"env": {"n_envs": 1, "native": {"max_steps": 10}}, "policy": policy})
    run = RunDir(root)
    run.checkpoints.mkdir(parents=True)
    cfglib.save_yaml(cfg, run.config)
    model = build_model(cfg.defense, make_vec_env(cfg.env, seed=0), cfg.policy.policy_kwargs(),
                        {"seed": 0, "device": "cpu", "n_steps": 8, "batch_size": 8})
    model.save(str(run.final_checkpoint))
    return run


def test_explain_eval_cli_writes_table_for_all_methods(tmp_path, capsys) -> None:
    import json

    from fgmf_marl.jobs.explain import main
    from fgmf_marl.jobs.cli import run as run_cli
    run = _untrained_run(tmp_path / "run")
    argv = ["--checkpoint", str(run.root), "--episodes", "1", "--every", "5", "--n-envs", "1", "--eps", "2",
            "--sensitivity-samples", "2", "--randomisation-samples", "2", "--ig-steps", "4", "--grid", "4",
            "--deletion-steps", "4", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("PGCA", "P (segments)", "G (grad x input)", "P grid (old)", "Grad-CAM++ (old G)",
                 "Integrated Gradients", "Occlusion", "GradientShap", "SmoothGrad", "Segment mask (no model)", "Random (chance)"):
        assert f"| {name} |" in out
    data = json.loads((run.eval / "explain_eval.json").read_text())
    assert data["settings"]["n_samples"] == 2 * 3  # steps 0 and 5 of one episode, 3 agents
    row = data["table"][0]
    assert 0 <= row["relevance_mass"]["mean"] <= 1 and row["relevance_mass"]["n"] == 6
    assert row["relevance_mass"]["episodes"] == 1 and "target_mass" in row   # both ground truths
    lo, hi = row["relevance_mass"]["ci95"]
    assert lo <= row["relevance_mass"]["mean"] <= hi
    assert (run.eval / "explain_eval.md").exists() and (run.eval / "explain_eval_config.yaml").exists()
    assert data["settings"]["randomisation_n"] == 2 and len(data["mprt"]) == len(data["table"])
    assert data["mprt"][0]["similarity"]["original"] == pytest.approx(1.0) and "Model-parameter randomisation" in out
    assert run_cli(main, ["--checkpoint", str(tmp_path / "missing")]) == 2
    assert run_cli(main, ["--checkpoint", str(run.root), "--every", "0"]) == 2


def test_explain_eval_refuses_the_randomisation_test_where_quantus_cannot_randomise_the_actor(tmp_path, capsys) -> None:
    """A ViT's learned positions and attention input projections have no ``reset_parameters``: one line, exit 2,
    before any episode is run; without the test the study runs."""
    from fgmf_marl.jobs.explain import main
    from fgmf_marl.jobs.cli import run as run_cli
    run = _untrained_run(tmp_path / "vit", backbone="vit", vit_dim=8, vit_depth=1, vit_heads=2)
    assert run_cli(main, ["--checkpoint", str(run.root), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "backbone.pos" in err and "--randomisation-samples 0" in err


def test_episode_mean_ci_lies_within_the_per_episode_range() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(7), 5)
    values = rng.random(groups.size) + groups * 0.1
    values[3] = np.nan
    per = np.array([np.nanmean(values[groups == g]) for g in range(7)])
    mean, lo, hi, n = episode_mean_ci(values, groups, seed=1)
    assert n == 7 and mean == pytest.approx(per.mean())
    assert per.min() <= lo <= mean <= hi <= per.max()
    assert np.isnan(episode_mean_ci(np.full(4, np.nan), np.arange(4))[0])


def test_study_sanity_rows_separate_model_free_maps_from_model_dependent_ones() -> None:
    """The randomisation rows of ``explain_eval``: a seeded random map and the model-free segment mask
    lose nothing when the model is randomised, and the gradient map's ranking inside the entities changes."""
    from fgmf_marl.envs.batched import CoverageVecEnv
    from fgmf_marl.envs.native import CoverageConfig
    from fgmf_marl.attribution import RandomMap
    from fgmf_marl.attribution.perturbation import SegmentMask
    from fgmf_marl.attribution.pgca import PGCAStage
    from fgmf_marl.attribution.study import collect_samples, explain_eval
    from helpers import coverage_view

    from fgmf_marl.attacks import PGD
    from fgmf_marl.attribution import PGCA
    from fgmf_marl.defenses.sgam import SGAM, with_gradient_shield

    cfg = CoverageConfig()
    view = coverage_view(cfg, seed=0)
    assert with_gradient_shield(view) is None  # no gate: no masked-gradient rows
    view.set_gate(SGAM(3, init_keep=0.5))
    shielded = with_gradient_shield(view)
    assert shielded.gate.gradient_shield and not view.gate.gradient_shield
    samples = collect_samples(view, CoverageVecEnv(cfg, n_envs=2, seed=0), 2, every=20, seed=0)
    methods = {"random": lambda v: RandomMap(v, seed=0), "segments": lambda v: SegmentMask(v),
               "G": lambda v: PGCAStage(v, "G"), "PGCA": lambda v: PGCA(v)}
    attack = lambda x: PGD(4 / 255, steps=2)(view, x)  # noqa: E731
    result = explain_eval(view, samples, methods, n_steps=4, sensitivity_samples=4, randomisation_samples=6,
                          progress=False, shielded=shielded, attack=attack)
    ratios = result.ratios()
    assert ratios["segments"]["shielded / unshielded"] == pytest.approx(1.0)  # model-free: the shield changes nothing
    assert ratios["random"]["attacked / clean"] == pytest.approx(1.0, abs=0.2)
    # the shield damps G's gradients at the salient pixels: its maps change while the forward does not
    assert not np.allclose(result.per_sample["G"]["shielded_relevance_mass"], result.per_sample["G"]["relevance_mass"])
    assert set(result.trust) == {"agreement", "evidence", "confidence"}
    for signal in result.trust.values():
        assert {"spearman", "flagged_mass", "rest_mass", "difference_ci95"} <= set(signal)
        assert -1.0 <= signal["spearman"] <= 1.0
    entity = result.per_sample["G"]["attack_entity_spearman"]
    assert entity.shape == (4,) and np.all(np.abs(entity[~np.isnan(entity)]) <= 1.0)
    assert "shielded / unshielded" in result.markdown() and "Trust signals" in result.markdown()
    rand, seg, grad = (result.per_sample[k] for k in ("random", "segments", "G"))
    assert rand["randomised_spearman"] == pytest.approx(np.ones(6))
    assert rand["randomised_mass_drop"] == pytest.approx(np.zeros(6))
    assert np.nanmax(np.abs(seg["randomised_mass_drop"])) == 0.0
    assert np.nanmean(grad["randomised_entity_spearman"]) < 0.9
    assert {"randomised_entity_spearman", "randomised_mass_drop", "mprt/action_net"} <= set(result.table()[0])
    mprt = {row["method"]: row for row in result.mprt_table()}
    assert mprt["random"]["passes"] is False and mprt["segments"]["passes"] is False   # model-free: no fall
    assert mprt["random"]["passes_entity"] is False and mprt["segments"]["passes_entity"] is None   # flat on its support
    assert mprt["random"]["mass_falls"] is False and mprt["random"]["similarity"]["backbone.convs.0"] == 1.0
    assert list(mprt["G"]["similarity"]) == ["original", *result.mprt_layers] and result.mprt_layers[0] == "action_net"
    assert mprt["G"]["final"][0] == pytest.approx(np.nanmean(grad["randomised_spearman"]))
    markdown = result.markdown()
    assert "randomised_mass_drop" not in markdown.split("\n")[0]            # the MPRT has a table of its own
    assert "| random | 1.000 | 1.000 |" in markdown and "+ backbone.convs.0 (all random)" in markdown


def test_a_trust_signal_that_tracks_the_explanation_flags_the_worse_steps() -> None:
    from fgmf_marl.attribution.study import trust_signal

    rng = np.random.default_rng(0)
    episode = np.repeat(np.arange(8), 12)
    mass = rng.uniform(0.2, 1.0, episode.size)
    good = trust_signal(mass + rng.normal(0, 0.05, mass.size), mass, episode)
    assert good["spearman"] > 0.9 and good["difference_ci95"][0] > 0 and good["flagged_mass"] < good["rest_mass"]
    noise = trust_signal(rng.normal(size=mass.size), mass, episode)
    assert abs(noise["spearman"]) < 0.3 and noise["difference_ci95"][0] < 0 < noise["difference_ci95"][1]
    nan_signal = np.full(mass.size, np.nan)
    assert trust_signal(nan_signal, mass, episode) == {}   # e.g. evidence of a grid-P PGCA
