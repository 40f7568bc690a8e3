"""Threat models beyond L-inf against independent references: the L2 projection's closed form, corruptions against
their published formulas (scipy's Gaussian filter, PIL's JPEG, colorsys' HSV, the contrast formula), patches confined
to their square, faults against their definitions over an episode; and each one hurts a policy that reads the pixels
it changes."""
from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from fgmf_marl.attacks.budget import Budget, BudgetedAttack, make_selector
from fgmf_marl.attacks.registry import ATTACKS, PRESETS, expand_presets, make_attack, parse_spec
from fgmf_marl.attacks.threats import CORRUPTIONS, Corruption, Fault, L2PGD, Patch, corrupt, project_l2
from fgmf_marl.config import ConfigError


class _Reader(nn.Module):
    """Two actions from the mean brightness of the top-left 8x8 corner: a policy every threat model can move."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, :, :8, :8].mean(dim=(1, 2, 3)) - 0.5) * 40
        return torch.stack([s, -s], dim=1)


def test_the_l2_projection_is_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(5, 3, 6, 6, generator=gen) * 0.5 + 0.25
    delta = torch.randn(5, 3, 6, 6, generator=gen) * 0.05
    delta[0] *= 100                                                   # far outside the ball
    out = project_l2(clean + delta, clean, 0.3)
    norms = delta.flatten(1).norm(dim=1)
    expected = (clean + delta * torch.clamp(0.3 / norms, max=1).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert ((out - clean).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()


def test_l2_pgd_stays_in_its_ball_and_hurts_more_than_its_start() -> None:
    clean = torch.full((4, 3, 16, 16), 0.52)
    attack = L2PGD(8 / 255, steps=10)
    radius = attack.ball(clean)
    assert radius == pytest.approx(8 / 255 * 16)         # the corner's mean can move by radius / sqrt(192) > 0.02
    adv = attack.perturb(_Reader(), clean)
    assert ((adv - clean).flatten(1).norm(dim=1) <= radius + 1e-5).all()
    assert (_Reader()(adv).argmax(1) == 1).all() and (_Reader()(clean).argmax(1) == 0).all()


def test_a_patch_changes_one_square_of_its_size_and_refuses_a_larger_one() -> None:
    clean = torch.full((3, 3, 20, 20), 0.55)
    adv = Patch(0.0, size=6, locations=16, steps=5).perturb(_Reader(), clean)
    for i in range(3):
        rows, cols = torch.nonzero((adv[i] != clean[i]).any(0), as_tuple=True)
        assert rows.numel() and int(rows.max() - rows.min()) < 6 and int(cols.max() - cols.min()) < 6
    assert (_Reader()(adv).argmax(1) == 1).any()                     # the corner was found at least once
    with pytest.raises(ValueError, match="larger than the 20x20 frame"):
        Patch(0.0, size=21).check_shape((3, 20, 20))


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_gaussian_blur_is_scipys_gaussian_filter(image: torch.Tensor) -> None:
    sigma = CORRUPTIONS["gaussian_blur"][4]
    out = corrupt(image, "gaussian_blur", 5, torch.Generator())
    ref = np.stack([ndimage.gaussian_filter(image[i, c].numpy(), sigma, mode="reflect", truncate=3.0)
                    for i in range(2) for c in range(3)]).reshape(out.shape)
    # scipy's "reflect" repeats the edge pixel, torch's does not: compare away from the border
    np.testing.assert_allclose(out[..., 3:-3, 3:-3].numpy(), ref[..., 3:-3, 3:-3], atol=1e-5)


def test_contrast_brightness_and_jpeg_follow_their_formulas(image: torch.Tensor) -> None:
    gen = torch.Generator()
    c = CORRUPTIONS["contrast"][1]
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(corrupt(image, "contrast", 2, gen), ((image - mean) * c + mean).clamp(0, 1), atol=1e-6)
    b = CORRUPTIONS["brightness"][2]
    bright = corrupt(image, "brightness", 3, gen)
    for (y, x) in ((0, 0), (5, 9), (15, 15)):
        h, s, v = colorsys.rgb_to_hsv(*image[0, :, y, x].tolist())
        assert bright[0, :, y, x].tolist() == pytest.approx(list(colorsys.hsv_to_rgb(h, s, min(v + b, 1.0))), abs=1e-5)
    quality = CORRUPTIONS["jpeg"][0]
    array = (image[0] * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(corrupt(image, "jpeg", 1, gen)[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_noise_corruptions_have_their_published_strength() -> None:
    flat = torch.full((64, 1, 32, 32), 0.5)
    gen = torch.Generator().manual_seed(0)
    std = float((corrupt(flat, "gaussian_noise", 5, gen) - flat).std())
    assert std == pytest.approx(CORRUPTIONS["gaussian_noise"][4], rel=0.05)
    share = float(((corrupt(flat, "impulse_noise", 5, gen) - flat).abs() > 0.4).float().mean())
    assert share == pytest.approx(CORRUPTIONS["impulse_noise"][4], rel=0.1)
    for kind in CORRUPTIONS:
        out = Corruption(0.0, kind=kind, severity=5).perturb(_Reader(), flat)
        assert out.shape == flat.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_corruptions_hurt_a_policy_that_reads_the_pixels_they_change() -> None:
    clean = torch.full((2, 3, 16, 16), 0.3)
    clean[:, :, :8, :8] = 0.6                                          # a bright corner: action 0
    low_contrast = Corruption(0.0, kind="contrast", severity=5).perturb(_Reader(), clean)
    assert (_Reader()(clean).argmax(1) == 0).all() and (_Reader()(low_contrast).argmax(1) == 1).all()


def test_faults_over_an_episode() -> None:
    frames = [torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(t)) for t in range(4)]  # 2 envs x 2 agents
    blackout = Fault(0.0, kind="blackout").as_perturb(_Reader(), n_agents=2, agents=[1])
    out = blackout(frames[0])
    assert (out[[1, 3]] == 0).all() and torch.equal(out[[0, 2]], frames[0][[0, 2]])
    frozen = Fault(0.0, kind="frozen").as_perturb(_Reader(), n_agents=2)
    first = frozen(frames[0])
    assert torch.equal(first, frames[0]) and torch.equal(frozen(frames[1]), frames[0])
    frozen.end_episodes(np.array([True, False]))                      # env 0 restarts: its agents see again
    third = frozen(frames[2])
    assert torch.equal(third[:2], frames[2][:2]) and torch.equal(third[2:], frames[0][2:])
    swap = Fault(0.0, kind="swap").as_perturb(_Reader(), n_agents=2)
    swapped = swap(frames[0])
    assert torch.equal(swapped[0], frames[0][1]) and torch.equal(swapped[1], frames[0][0])
    dropped = Fault(0.0, kind="dropped", rate=1.0).as_perturb(_Reader(), n_agents=2)
    dropped(frames[0])
    assert torch.equal(dropped(frames[1]), frames[0])                 # every frame lost: the last one repeats


def test_presets_and_budgets() -> None:
    specs = expand_presets(["all"], surrogate="RUN")
    assert len(specs) == len(set(specs)) and "transfer:surrogate=RUN" in specs
    assert {s.partition(":")[0] for s in specs} >= {"pgd", "pgd_l2", "patch_attack", "corruption", "fault", "square"}
    assert set(ATTACKS).isdisjoint(PRESETS)                          # a kind named like a preset could not be used
    name, options = parse_spec("pgd_l2:radius=0.5")
    l2 = make_attack(name, 4 / 255, **options)
    budgeted = BudgetedAttack(l2, make_selector("random"), Budget(agents=1), n_agents=2, horizon=10)
    clean = torch.full((2, 3, 16, 16), 0.52)
    assert ((budgeted.perturb(_Reader(), clean) - clean).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    with pytest.raises(ConfigError, match="cannot be budgeted"):
        BudgetedAttack(Fault(0.0, kind="frozen"), make_selector("random"), Budget(agents=1), n_agents=2, horizon=10)
    with pytest.raises(ConfigError, match="severity"):
        make_attack("corruption", 0.0, kind="jpeg", severity=6)


def test_evaluate_refuses_a_patch_larger_than_the_frame_before_any_episode(tmp_path, capsys) -> None:
    from fgmf_marl.jobs.evaluate import entry as evaluate_cli
    from fgmf_marl.jobs.train import entry as train_cli

    run = tmp_path / "run"
    assert train_cli(["--timesteps", "64", "--run-dir", str(run), "--no-progress", "env.n_envs=2", "ppo.n_steps=32",
                      "ppo.batch_size=64", "eval_episodes=2", "env.native.max_steps=10"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    assert evaluate_cli([str(run), "--attacks", "patch_attack:size=99", "--eps", "4", "--episodes", "1",
                         "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "larger than the 48x48 frame" in err[0] and not out.exists()
    assert evaluate_cli([str(run), "--attacks", "faults", "patch", "--eps", "4", "--episodes", "1", "--n-envs", "1",
                         "--out", str(out), "--no-progress"]) == 0
    rows = (out / "results.md").read_text()
    assert "fault[kind=frozen]" in rows and "patch_attack[size=6]" in rows
    assert "## Robustness profile" in rows and "**worst over all**" in rows
    assert (out / "profile_run.png").stat().st_size > 1000


def test_the_profile_takes_the_worst_within_each_threat_model_and_over_all() -> None:
    from fgmf_marl.teams.cells import Cell, profile_rows, threat_model
    from fgmf_marl.teams.report import profile_markdown

    def cell(attack: str, values: list[float]) -> Cell:
        n = len(values)
        return Cell("ckpt", attack, 4.0, 0, np.array(values) * 10, np.array(values), np.full(n, 10), 0.0, 10 * n,
                    np.zeros(n))

    cells = [cell("none", [0.9, 0.9]), cell("pgd[steps=20]", [0.5, 0.7]), cell("mad", [0.6, 0.4]),
             cell("pgd_l2[steps=20]", [0.2, 0.9]), cell("fault[kind=frozen]", [0.8, 0.1])]
    assert [threat_model(c.attack) for c in cells[1:]] == ["L-inf", "L-inf", "L2", "faults"]
    rows = {r["threat_model"]: r for r in profile_rows(cells)}
    assert list(rows) == ["L-inf", "L2", "faults", "all"]
    assert rows["L-inf"]["mean"] == pytest.approx(0.5) and rows["L-inf"]["episode_worst_mean"] == pytest.approx(0.45)
    assert rows["all"]["mean"] == pytest.approx(0.45)                  # the fault's mean is the weakest attack
    assert rows["all"]["episode_worst_mean"] == pytest.approx(0.15)    # min(0.5,0.6,0.2,0.8), min(0.7,0.4,0.9,0.1)
    assert "**worst over all**" in profile_markdown(list(rows.values()))
