"""Attribution methods against independent references: closed forms, naive loops, Captum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attribution import GradCAMPlusPlus
from helpers import tiny_view


def make_view(backbone: str = "cnn", size: int = 24, seed: int = 0, net_arch=None, **kwargs) -> PolicyView:
    return tiny_view(backbone, size, seed, net_arch=net_arch, features_dim=16, **kwargs).eval()


def random_obs(n: int, size: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _closed_form_gradcampp(fmap: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ written out per sample, channel and pixel (float64)."""
    b, k, h, w = fmap.shape
    cams = np.zeros((b, h, w))
    for s in range(b):
        weights = np.zeros(k)
        for c in range(k):
            total = fmap[s, c].sum()
            for i in range(h):
                for j in range(w):
                    g = grads[s, c, i, j]
                    denom = 2 * g**2 + total * g**3
                    alpha = g**2 / denom if denom != 0 else 0.0
                    weights[c] += alpha * max(g, 0.0)
        cams[s] = np.maximum((weights[:, None, None] * fmap[s]).sum(0), 0.0)
    return cams


def _head_gradient(view: PolicyView, fmap: torch.Tensor, target: np.ndarray, token_major: bool) -> np.ndarray:
    """dS/dA in closed form for logits = W_a act(W_fc flatten(A) * scale + b_fc) + b_a (no hidden MLP layers;
    the CNN's act is ReLU and scale 1, the ViT's act is tanh and scale 1/sqrt(tokens))."""
    fc: nn.Linear = view.extractor.backbone.fc[1]
    scale = getattr(view.extractor.backbone, "token_scale", 1.0)
    wfc = fc.weight.detach().double().numpy()
    bfc = fc.bias.detach().double().numpy()
    wa = view.policy.action_net.weight.detach().double().numpy()
    a = fmap.detach().double().numpy()
    b, d, h, w = a.shape
    out = np.zeros_like(a)
    for s in range(b):
        flat = a[s].reshape(d, h * w).T.reshape(-1) if token_major else a[s].reshape(-1)
        pre = wfc @ flat * scale + bfc
        slope = 1 - np.tanh(pre) ** 2 if token_major else (pre > 0).astype(float)
        g_flat = scale * wfc.T @ (slope * wa[target[s]])
        out[s] = g_flat.reshape(h * w, d).T.reshape(d, h, w) if token_major else g_flat.reshape(d, h, w)
    return out


@pytest.mark.parametrize("backbone", ["cnn", "vit"])
def test_gradcampp_matches_closed_form(backbone: str) -> None:
    kwargs = dict(patch_size=6, dim=8, depth=1, heads=2) if backbone == "vit" else dict(channels=(4, 6, 5))
    view = make_view(backbone, net_arch=dict(pi=[], vf=[]), **kwargs)
    if backbone == "vit":  # drop the final LayerNorm so the head is affine + tanh (closed-form gradient)
        view.extractor.backbone.norm = nn.Identity()
    obs = random_obs(4)
    target = np.array([0, 3, 1, 4])
    cam = GradCAMPlusPlus(view).attribute(obs, target=target, raw=True)
    with torch.no_grad():
        fmap = view.spatial(obs)
    grads = _head_gradient(view, fmap, target, token_major=backbone == "vit")
    expected = _closed_form_gradcampp(fmap.double().numpy(), grads)
    assert cam.shape == fmap.shape[:1] + fmap.shape[2:]
    assert expected.max() > 0  # the test compares something non-trivial
    np.testing.assert_allclose(cam.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["cnn", "vit"])
def test_gradcampp_maps_are_image_sized_and_normalised(backbone: str) -> None:
    view = make_view(backbone, **(dict(patch_size=6, dim=8, depth=1, heads=2) if backbone == "vit" else {}))
    obs = random_obs(5)
    maps = GradCAMPlusPlus(view).attribute(obs, target=torch.tensor([0, 1, 2, 3, 4]))
    assert maps.shape == (5, 24, 24)
    assert maps.min() >= 0 and maps.max() <= 1
    peaks = maps.flatten(1).amax(1)
    assert torch.all((peaks == 0) | torch.isclose(peaks, torch.ones_like(peaks)))
    # batching agents x envs gives the same maps as one sample at a time
    single = torch.cat([GradCAMPlusPlus(view).attribute(obs[i:i + 1], target=[i]) for i in range(5)])
    torch.testing.assert_close(maps, single, rtol=1e-4, atol=1e-5)


def test_gradcampp_target_none_is_greedy_and_bad_target_rejected() -> None:
    view = make_view()
    obs = random_obs(3)
    greedy = view(obs).argmax(-1)
    method = GradCAMPlusPlus(view)
    torch.testing.assert_close(method.attribute(obs), method.attribute(obs, target=greedy))
    with pytest.raises(ValueError, match="target actions must be in"):
        method.attribute(obs, target=[0, 1, 9])
    with pytest.raises(ValueError, match="one action per sample"):
        method.attribute(obs, target=[0, 1])
    with pytest.raises(ValueError, match="float tensor"):
        method.attribute(obs[0], target=[0])


# ---------------------------------------------------------------- perturbation map P
from captum.attr import Occlusion  # noqa: E402
from scipy import ndimage, stats  # noqa: E402

from fgmf_marl.attribution import PGCA, IntegratedGradientsMap, OcclusionMap, PerturbationMap  # noqa: E402
from fgmf_marl.attribution.perturbation import cell_masks, cells_to_pixels  # noqa: E402
from fgmf_marl.attribution.pgca import gaussian_blur, percentile_stretch, spearman, topk_iou  # noqa: E402


@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_batched_perturbation_equals_naive_loop(kind: str) -> None:
    view = make_view()
    obs = random_obs(3)
    target = torch.tensor([2, 0, 4])
    method = PerturbationMap(view, grid=4, target_kind=kind, seed=7, chunk_size=10)  # chunks straddle samples
    parts = method.parts(obs, target)
    noise = method.noise_field(obs.shape[1:])
    masks = cell_masks(24, 24, 4)
    with torch.no_grad():
        for s in range(3):
            def score(x):
                out = view(x[None])[0]
                out = out if kind == "logit" else torch.softmax(out, -1)
                return out[target[s]]
            base = score(obs[s])
            for cell in range(16):
                m = masks[cell][None]
                zero = base - score(obs[s] * (1 - m))
                noisy = base - score(obs[s] * (1 - m) + noise * m)
                i, j = divmod(cell, 4)
                assert torch.isclose(parts.drop_zero[s, i, j], zero, atol=1e-5, rtol=1e-4)
                assert torch.isclose(parts.drop_noise[s, i, j], noisy, atol=1e-5, rtol=1e-4)
    maps = method.attribute(obs, target)
    expected = cells_to_pixels(torch.relu((parts.drop_zero + parts.drop_noise) / 2), 24, 24)
    expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(maps, expected)


def test_perturbation_equals_captum_occlusion() -> None:
    view = make_view()
    obs = random_obs(4)
    target = torch.tensor([1, 1, 3, 0])
    method = PerturbationMap(view, grid=8, seed=3)
    parts = method.parts(obs, target)
    occ = Occlusion(view)
    window = dict(sliding_window_shapes=(3, 3, 3), strides=(3, 3, 3), target=target)
    with torch.no_grad():
        captum_zero = occ.attribute(obs, baselines=0.0, **window)
        captum_noise = occ.attribute(obs, baselines=method.noise_field(obs.shape[1:])[None].expand_as(obs), **window)
    for c in range(3):
        torch.testing.assert_close(cells_to_pixels(parts.drop_zero, 24, 24), captum_zero[:, c], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cells_to_pixels(parts.drop_noise, 24, 24), captum_noise[:, c], atol=1e-5, rtol=1e-4)


def test_perturbation_rejects_bad_settings() -> None:
    view = make_view()
    with pytest.raises(ValueError, match="grid must be"):
        PerturbationMap(view, grid=0)
    with pytest.raises(ValueError, match="strategies"):
        PerturbationMap(view, strategies=("blur",))


# ---------------------------------------------------------------- PGCA
def test_pgca_stages_have_documented_ranges_and_are_deterministic() -> None:
    view = make_view()
    obs = random_obs(6)
    target = torch.arange(6) % 5
    res = PGCA(view, grid=4, seed=11, perturbation="grid", consensus="arithmetic").explain(obs, target)
    for name in ("P", "G", "consensus", "final"):
        m = getattr(res, name)
        assert m.shape == (6, 24, 24), name
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0 + 1e-6, name
    assert torch.all(res.agreement.abs() <= 1.0 + 1e-6)
    assert torch.all((res.topk_iou >= 0) & (res.topk_iou <= 1))
    # consensus is the weighted arithmetic mean (w = 0.75); the geometric one is zero where a part is
    torch.testing.assert_close(res.consensus, 0.75 * res.P + 0.25 * res.G)
    geo = PGCA(view, grid=4, seed=11, perturbation="grid", consensus="geometric", weight=0.5).explain(obs, target)
    torch.testing.assert_close(geo.consensus, (geo.P * geo.G).sqrt())
    assert torch.all(geo.consensus[(geo.P == 0) | (geo.G == 0)] == 0)
    # the final map is stretched: it reaches 1 for each non-flat sample
    assert torch.all(res.final.flatten(1).amax(1) > 0.99)
    again = PGCA(view, grid=4, seed=11, perturbation="grid", consensus="arithmetic").explain(obs, target)
    torch.testing.assert_close(res.final, again.final, rtol=0, atol=0)
    other = PGCA(view, grid=4, seed=12, perturbation="grid", consensus="arithmetic").explain(obs, target)
    assert not torch.equal(res.P, other.P)  # the seed drives the noise replacement


def test_pgca_target_probability_differs_from_logit() -> None:
    view = make_view()
    obs = random_obs(2)
    a = PGCA(view, grid=4, target_kind="logit").explain(obs, [0, 1])
    b = PGCA(view, grid=4, target_kind="prob").explain(obs, [0, 1])
    assert not torch.allclose(a.P, b.P)


def test_gaussian_blur_matches_scipy() -> None:
    maps = torch.rand(2, 17, 13, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(maps, 1.5)
    ref = np.stack([ndimage.gaussian_filter(m.double().numpy(), 1.5, mode="mirror", truncate=3.0) for m in maps])
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_percentile_stretch_and_rank_statistics_match_numpy_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 50)).astype(np.float32)
    x[1, :10] = x[1, 0]  # ties
    out = percentile_stretch(torch.from_numpy(x), 5, 90, gamma=2.0).numpy()
    lo, hi = np.percentile(x, 5, axis=1, keepdims=True), np.percentile(x, 90, axis=1, keepdims=True)
    np.testing.assert_allclose(out, np.clip((x - lo) / (hi - lo), 0, 1) ** 2, atol=1e-5)
    y = rng.random((3, 50)).astype(np.float32)
    rho = spearman(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(rho, [stats.spearmanr(a, b).statistic for a, b in zip(x, y)], atol=1e-5)
    a = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    b = torch.tensor([[5.0, 0, 4, 1, 2, 3]])
    assert float(topk_iou(a, b, 2)) == pytest.approx(1 / 3)  # {0,1} vs {0,2}


def test_captum_baselines_behind_the_interface() -> None:
    view = make_view()
    obs = random_obs(2)
    for method in (IntegratedGradientsMap(view, n_steps=8), OcclusionMap(view)):
        maps = method.attribute(obs, target=[1, 2])
        assert maps.shape == (2, 24, 24) and float(maps.min()) >= 0 and float(maps.max()) <= 1
        assert float(maps.max()) > 0


# ---------------------------------------------------------------- issue 20: entity-scale PGCA
from captum.attr import FeatureAblation, IntegratedGradients, Saliency  # noqa: E402

from fgmf_marl.attribution import GradientShapMap, PGCAStage, RandomMap, SegmentPerturbation, SmoothGradMap  # noqa: E402
from fgmf_marl.attribution import perturbation  # noqa: E402
from fgmf_marl.attribution.base import normalise_maps  # noqa: E402
from fgmf_marl.attribution.perturbation import background_colour, connected_components, segment_units  # noqa: E402
from fgmf_marl.attribution.pgca import rank_preserving_stretch  # noqa: E402


def sprite_obs(n: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Flat background with a few 2-4 px sprites (some touching), plus a large 'wall' block."""
    rng = np.random.default_rng(seed)
    obs = np.full((n, 3, size, size), 20 / 255, np.float32)
    for i in range(n):
        for _ in range(5):
            y, x, s = rng.integers(0, size - 4), rng.integers(0, size - 4), rng.integers(2, 5)
            obs[i, :, y:y + s, x:x + s] = rng.random(3)[:, None, None] * 0.6 + 0.4
        if i == 0:
            obs[i, :, :, :9] = 90 / 255  # a region larger than split_area
    return torch.from_numpy(obs)


def test_connected_components_match_scipy_label() -> None:
    fg = torch.rand(4, 17, 19, generator=torch.Generator().manual_seed(0)) > 0.6
    ours = connected_components(fg).numpy()
    for m, lab in zip(fg.numpy(), ours):
        ref, n = ndimage.label(m, structure=np.ones((3, 3)))
        assert len(np.unique(lab[m])) == n          # same number of components ...
        for k in range(1, n + 1):                  # ... and the same partition
            assert len(np.unique(lab[ref == k])) == 1
        assert np.all(lab[~m] == 0)
        assert sorted(np.unique(lab[m])) == list(range(1, n + 1))   # 1..n within each sample
    empty = fg.clone()
    empty[1] = False
    labels = connected_components(empty)
    assert labels[1].eq(0).all() and labels[2].max() == len(np.unique(ours[2][fg[2].numpy()]))


def test_segments_are_entities_and_large_regions_are_split() -> None:
    obs = sprite_obs()
    torch.testing.assert_close(background_colour(obs), torch.full((3, 3), 20 / 255))
    seg = segment_units(obs, grid=4)
    fg = ((obs - 20 / 255).abs().amax(1) > 12 / 255) & ((obs - 90 / 255).abs().amax(1) > 12 / 255)
    assert torch.equal(seg.unit >= 0, fg)
    assert torch.equal(seg.unit.unique()[1:], torch.arange(seg.n_units))   # compact global ids
    for u in range(seg.n_units):                                            # each unit lies in its sample
        assert torch.equal((seg.unit == u).flatten(1).any(1).nonzero()[:, 0], seg.sample[u:u + 1])
    assert torch.all(seg.unit[0, :, :9] == -1)   # the 24 x 9 'wall' is a second flat colour, never a unit
    # the baseline paints each unit with the flat colour around it and leaves flat pixels alone
    torch.testing.assert_close(seg.baseline[fg[:, None].expand_as(obs)], torch.full_like(obs, 20 / 255)[fg[:, None].expand_as(obs)])
    torch.testing.assert_close(seg.baseline[~fg[:, None].expand_as(obs)], obs[~fg[:, None].expand_as(obs)])
    textured = segment_units(torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)), grid=4)
    assert textured.n_units >= 8   # no flat background: one big component, cut along the 4 x 4 grid


def test_stacked_frames_segment_as_their_frame_and_sparse_colour_tables_equal_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frame-stacked images (9 channels: 16^9 colour bins, a 5 TB dense table) take the sparse path."""
    obs = sprite_obs(20)                                   # 20 > SPARSE_COLOUR_CHUNK: the chunks are exercised
    stacked = segment_units(obs.repeat(1, 3, 1, 1), grid=4)
    single = segment_units(obs, grid=4)                    # independent reference: 3 copies = the frame itself
    assert torch.equal(stacked.unit, single.unit) and torch.equal(stacked.sample, single.sample)
    torch.testing.assert_close(stacked.baseline, single.baseline.repeat(1, 3, 1, 1))
    # the sparse table equals the dense one where both fit (6 channels x 4 levels = 4,096 bins)
    rng = np.random.default_rng(0)
    palette = rng.random((5, 6)).astype(np.float32)
    counts = [30, 16, 10, 5, 3]                            # distinct counts: no ties in the top 4
    pixels = np.stack([rng.permutation(np.repeat(np.arange(5), counts)) for _ in range(40)])
    images = torch.from_numpy(palette[pixels].reshape(40, 8, 8, 6).transpose(0, 3, 1, 2).copy())
    dense = perturbation.flat_colours(images, bins=4, min_share=0.2)
    monkeypatch.setattr(perturbation, "DENSE_COLOUR_KEYS", 16)
    sparse = perturbation.flat_colours(images, bins=4, min_share=0.2)
    torch.testing.assert_close(sparse[0], dense[0])
    assert torch.equal(sparse[1], dense[1]) and sparse[1].sum(1).eq(2).all()   # 30 and 16 of 64 px >= 20 %


def test_segment_perturbation_equals_captum_feature_ablation() -> None:
    view = make_view()
    obs = sprite_obs(4)
    target = torch.tensor([1, 4, 0, 2])
    method = SegmentPerturbation(view, grid=4, chunk_size=5)   # chunks straddle samples
    drops, seg = method.drops(obs, target)
    bg = seg.baseline
    mask = torch.where(seg.unit >= 0, seg.unit + 1, 0)[:, None].expand_as(obs)
    with torch.no_grad():
        ref = FeatureAblation(view).attribute(obs, baselines=bg, target=target, feature_mask=mask)[:, 0]
    ref = torch.where(seg.unit >= 0, ref, torch.zeros_like(ref))
    torch.testing.assert_close(drops, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(method.attribute(obs, target), normalise_maps(torch.relu(ref)), atol=1e-5, rtol=1e-4)


def _naive_pgca(pgca: PGCA, view, obs, target):
    """Per agent, Captum only: FeatureAblation over the segments + |Saliency x (input - baseline)|."""
    ps, gs, evidence, units = [], [], [], []
    offset = 0
    for i in range(obs.shape[0]):
        x, t = obs[i:i + 1], target[i:i + 1]
        seg = pgca.segments.segments(x)
        units.append(torch.where(seg.unit >= 0, seg.unit + offset, -1))   # numbered over the batch
        offset += seg.n_units
        bg = seg.baseline
        mask = torch.where(seg.unit >= 0, seg.unit + 1, 0)[:, None].expand_as(x)
        with torch.no_grad():
            drop = FeatureAblation(view).attribute(x, baselines=bg, target=t, feature_mask=mask)[:, 0]
        drop = torch.relu(torch.where(seg.unit >= 0, drop, torch.zeros_like(drop)))
        ps.append(normalise_maps(drop))
        evidence.append(drop.amax())
        grad = Saliency(view).attribute(x, target=t, abs=False)
        gs.append(normalise_maps((grad * (x - bg)).sum(1).abs()))
    return pgca.from_parts(torch.cat(ps), torch.cat(gs), target, torch.stack(evidence), unit=torch.cat(units))


def test_batched_pgca_equals_naive_per_agent_composition() -> None:
    view = make_view()
    obs = sprite_obs(5)
    target = torch.tensor([0, 1, 2, 3, 4])
    pgca = PGCA(view, grid=4, chunk_size=7)
    fast, ref = pgca.explain(obs, target), _naive_pgca(pgca, view, obs, target)
    for name in ("P", "G", "consensus", "final", "agreement", "topk_iou", "evidence"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), atol=1e-5, rtol=1e-4, msg=name)
    for stage in ("P", "G", "final"):
        torch.testing.assert_close(PGCAStage(view, stage, grid=4).attribute(obs, target),
                                   normalise_maps(getattr(fast, stage)), atol=1e-6, rtol=1e-5)
    flat = pgca.segments.segments(obs).unit < 0
    assert torch.all(fast.final[flat] == 0)   # flat regions are never evidence: P and G are both 0 there


def test_gated_consensus_equals_a_loop_over_units() -> None:
    # the reference walks every unit of every sample in Python: the pixel of the unit's largest G gets P's
    # value, the others P * G / that largest G; pixels of units with P = 0 get fill * G; off units 0
    view = make_view()
    obs = sprite_obs(5)
    target = torch.tensor([0, 1, 2, 3, 4])
    pgca = PGCA(view, grid=4, fill=0.3)
    res = pgca.explain(obs, target)
    unit = pgca.segments.segments(obs).unit
    expected = torch.zeros_like(res.P)
    for b in range(obs.shape[0]):
        for u in unit[b].unique().tolist():
            if u < 0:
                continue
            px = unit[b] == u
            p, g = res.P[b][px], res.G[b][px]
            assert torch.all(p == p[0])                                     # P is constant on a unit
            expected[b][px] = p * g / g.max() if p[0] > 0 and g.max() > 0 else (0.3 * g if p[0] == 0 else 0 * g)
    torch.testing.assert_close(res.consensus, expected)
    assert bool((res.P > 0).any()) and bool(((res.P == 0) & (res.G > 0)).any())   # both branches ran
    # each unit with P > 0 keeps P's value at its most gradient-salient pixel, so P's order of units stays
    peaks = [res.consensus[b][unit[b] == u].max() for b in range(5) for u in unit[b].unique().tolist()
             if u >= 0 and res.P[b][unit[b] == u][0] > 0 and res.G[b][unit[b] == u].max() > 0]
    values = [res.P[b][unit[b] == u][0] for b in range(5) for u in unit[b].unique().tolist()
              if u >= 0 and res.P[b][unit[b] == u][0] > 0 and res.G[b][unit[b] == u].max() > 0]
    torch.testing.assert_close(torch.stack(peaks), torch.stack(values))


def test_pgca_rejects_unknown_variants() -> None:
    view = make_view()
    for kwargs in (dict(perturbation="sliding"), dict(gradient="deconv"), dict(consensus="max"), dict(weight=2.0),
                   dict(fill=-0.1), dict(perturbation="grid")):   # the gated default needs P's units
        with pytest.raises(ValueError):
            PGCA(view, **kwargs)
    with pytest.raises(ValueError, match="needs P's units"):
        PGCA(view).from_parts(torch.rand(1, 4, 4), torch.rand(1, 4, 4), torch.tensor([0]))


def test_rank_preserving_stretch_keeps_order_and_zero() -> None:
    x = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(0))
    x[0, :2] = 0.0
    x[2] = 0.0
    for low, gamma in ((0.0, 1.0), (50.0, 1.0), (90.0, 0.5)):
        y = rank_preserving_stretch(x, low, gamma)
        flat_x, flat_y = x[:2].flatten(1), y[:2].flatten(1)
        assert torch.equal(torch.sort(flat_x, dim=1, stable=True).indices, torch.sort(flat_y, dim=1, stable=True).indices)
        assert torch.all(flat_y.amax(1) == 1.0) and torch.all(y[x == 0] == 0)
        assert torch.all(y[2] == 0)
    # the argmax (pointing game) is unique after stretching, unlike a clipping stretch's ties
    assert int((y[1] == y[1].max()).sum()) == 1


def test_integrated_gradients_completeness() -> None:
    """IG's completeness axiom: attributions sum to score(x) - score(baseline), here via Captum."""
    view = make_view()
    obs = random_obs(2)
    target = torch.tensor([1, 3])
    ig = IntegratedGradients(lambda x: view(x))
    attr, delta = ig.attribute(obs, baselines=torch.zeros_like(obs), target=target, n_steps=128,
                               return_convergence_delta=True)
    with torch.no_grad():
        gap = view(obs).gather(1, target[:, None])[:, 0] - view(torch.zeros_like(obs)).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(attr.flatten(1).sum(1), gap, atol=5e-3 * float(gap.abs().max()) + 1e-4, rtol=1e-2)
    assert float(delta.abs().max()) < 5e-3 * float(gap.abs().max()) + 1e-4


def test_more_captum_baselines_and_random_behind_the_interface() -> None:
    view = make_view()
    obs = random_obs(2)
    for method in (GradientShapMap(view, n_samples=4), SmoothGradMap(view, nt_samples=4), RandomMap(view)):
        maps = method.attribute(obs, target=[1, 2])
        assert maps.shape == (2, 24, 24) and float(maps.min()) >= 0 and float(maps.max()) <= 1
        again = method.attribute(obs, target=[1, 2])
        torch.testing.assert_close(maps, again)   # seeded: deterministic


def test_rankdata_is_scipys_average_rank_with_ties_and_on_whole_maps() -> None:
    from fgmf_marl.attribution.pgca import rankdata

    rng = np.random.default_rng(5)
    rows = np.concatenate([rng.integers(0, 4, (3, 50)),                 # many ties
                           np.zeros((1, 50)),                           # one run of ties
                           rng.random((2, 50))], 0)                     # none
    ours = rankdata(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(ours, np.stack([stats.rankdata(r) for r in rows]))
    whole = np.round(rng.random((2, 84 * 84)), 2)                       # an 84 x 84 map, ties included
    np.testing.assert_allclose(rankdata(torch.from_numpy(whole)).numpy(), np.stack([stats.rankdata(r) for r in whole]))


from fgmf_marl.agents.policies import LOCAL_COST_LIMIT, ablated_crop, conv_output_size, pack_for_crops, window_indices  # noqa: E402


def _receptive_field_features(net, ablations, clean: torch.Tensor) -> torch.Tensor:
    """The former ``CnnBackbone.features_of_ablations`` (commit 975ad26), the reference of the layer-by-layer one:
    every convolution of a group runs on the crop the last window's whole receptive field reads."""
    sample, box = ablations.sample, ablations.box.long()
    _, linear, activation = net.fc
    pre = linear(clean.flatten(1))[sample]
    convs = [m for m in net.convs if isinstance(m, nn.Conv2d)]
    sizes = [tuple(ablations.obs.shape[-2:])]
    for conv in convs:
        sizes.append(tuple(conv_output_size(n, conv.kernel_size[d], conv.stride[d], conv.padding[d]) for d, n in enumerate(sizes[-1])))
    macs = [conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] for conv in convs]
    full_cost = sum(m * h * w for m, (h, w) in zip(macs, sizes[1:]))
    lo, hi = box[:, 0::2], box[:, 1::2]
    for conv, size in zip(convs, sizes[1:]):
        k, st, p = (torch.tensor(v) for v in (conv.kernel_size, conv.stride, conv.padding))
        lo = (-((k - 1 - p - lo) // st)).clamp_min(0)
        hi = torch.minimum((hi - 1 + p) // st + 1, torch.tensor(size))
    reach = (hi - lo).amax(1)
    side = reach + reach % 2
    (depth, height, width), last = clean.shape[1:], torch.tensor(sizes[-1])
    first, end = [0, 0], [sizes[-1][0], sizes[-1][1]]
    for conv in reversed(convs):
        first = [f * conv.stride[d] - conv.padding[d] for d, f in enumerate(first)]
        end = [(e - 1) * conv.stride[d] - conv.padding[d] + conv.kernel_size[d] for d, e in enumerate(end)]
    margin = max(0, -min(first), *(e - s for e, s in zip(end, sizes[0])))
    packed, clean_rows = pack_for_crops(ablations, margin), clean.permute(0, 2, 3, 1).reshape(-1, depth)
    for value in torch.unique(side[reach > 0]).tolist():
        members = (side == value).nonzero()[:, 0]
        extents = [[min(value, height), min(value, width)]]
        starts = [torch.minimum(lo[members], last - torch.tensor(extents[0]))]
        for conv in reversed(convs):
            starts.append(starts[-1] * torch.tensor(conv.stride) - torch.tensor(conv.padding))
            extents.append([(e - 1) * conv.stride[d] + conv.kernel_size[d] for d, e in enumerate(extents[-1])])
        starts, extents = starts[::-1], extents[::-1]
        if sum(m * e[0] * e[1] for m, e in zip(macs, extents[1:])) > LOCAL_COST_LIMIT * full_cost:
            pre[members] = linear(net.spatial(ablations.images(members)).flatten(1))
            continue
        x = ablated_crop(packed, ablations, members, starts[0] + margin, extents[0])
        for i, conv in enumerate(convs, start=1):
            x = torch.relu(F.conv2d(x, conv.weight, conv.bias, conv.stride))
            if i < len(convs):
                rows, cols = window_indices(starts[i], extents[i])
                x = x * (((rows >= 0) & (rows < sizes[i][0]))[:, :, None] & ((cols >= 0) & (cols < sizes[i][1]))[:, None, :])[:, None]
        rows, cols = window_indices(starts[-1], extents[-1])
        position = rows[:, :, None] * width + cols[:, None, :]
        flat = (sample[members][:, None, None] * (height * width) + position).flatten()
        change = x.permute(0, 2, 3, 1).reshape(-1, depth) - clean_rows.index_select(0, flat)
        column = position[..., None] + torch.arange(depth) * (height * width)
        pre[members] += F.embedding_bag(column.reshape(members.numel(), -1), net.linear_columns(),
                                        per_sample_weights=change.reshape(members.numel(), -1), mode="sum")
    return activation(pre)


def test_pgca_with_layerwise_ablations_equals_the_receptive_field_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """P's ablations recomputed window by window, layer by layer (``CnnBackbone.features_of_ablations``) against
    the former recompute of each last window's whole receptive field, on native observations (2-4 px entities,
    walls, four env steps of four env copies): every PGCA stage within 1e-5."""
    from fgmf_marl.envs.batched import CoverageVecEnv
    from fgmf_marl.envs.native import CoverageConfig
    from helpers import coverage_view
    cfg = CoverageConfig()
    view = coverage_view(cfg)
    venv = CoverageVecEnv(cfg, n_envs=4, seed=5)
    rng = np.random.default_rng(0)
    frames = [torch.as_tensor(venv.reset())]
    for _ in range(3):
        frames.append(torch.as_tensor(venv.step(rng.integers(0, 5, venv.num_envs))[0]))
    obs = torch.cat(frames).float() / 255
    target = torch.arange(obs.shape[0]) % view.n_actions
    pgca = PGCA(view)
    layerwise = pgca.explain(obs, target)
    net = view.extractor.backbone
    monkeypatch.setattr(net, "features_of_ablations", lambda ablations, clean: _receptive_field_features(net, ablations, clean))
    former = pgca.explain(obs, target)
    assert bool((former.P > 0).any())
    for name in ("P", "G", "consensus", "final", "agreement", "topk_iou", "evidence"):
        torch.testing.assert_close(getattr(layerwise, name), getattr(former, name), atol=1e-5, rtol=0, msg=name)
