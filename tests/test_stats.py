"""``fgmf_marl.stats`` against independent references (scipy's trim_mean and Mann-Whitney U, brute-force pair
counts, the normal-theory interval), and the rollout's canonical episode order that pairs episodes across attacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from fgmf_marl import stats
from fgmf_marl.rollout import rollout


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    values = np.array([100.0, 1, 2, 3, 4, 5, 6, -100])      # 8 values: drop 2 at each end
    assert stats.iqm(values) == pytest.approx(np.mean([2, 3, 4, 5]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 41))
    assert stats.iqm(x) == pytest.approx(sps.trim_mean(x, 0.25, axis=-1))


@pytest.mark.parametrize("ties", [False, True])
def test_probability_of_improvement_counts_pairs_with_half_credit_for_ties(ties: bool) -> None:
    rng = np.random.default_rng(1)
    x = [rng.integers(0, 5, 7).astype(float) if ties else rng.normal(0.3, 1, 7) for _ in range(3)]
    y = [rng.integers(0, 5, 9).astype(float) if ties else rng.normal(0.0, 1, 9) for _ in range(2)]
    xs, ys = np.concatenate(x), np.concatenate(y)
    brute = ((xs[:, None] > ys[None]) + 0.5 * (xs[:, None] == ys[None])).mean()
    est = stats.probability_of_improvement(x, y)
    assert est.value == pytest.approx(brute)
    assert est.value == pytest.approx(sps.mannwhitneyu(xs, ys).statistic / (xs.size * ys.size))
    assert 0 <= est.low <= est.value <= est.high <= 1 and est.strata == 5 and est.n == xs.size + ys.size


def test_probability_of_improvement_of_separated_and_identical_teams() -> None:
    rng = np.random.default_rng(2)
    better = [rng.normal(1.0, 0.1, 48) for _ in range(5)]
    worse = [rng.normal(0.0, 0.1, 48) for _ in range(5)]
    assert stats.probability_of_improvement(better, worse).value == 1.0
    same = stats.probability_of_improvement(worse, [rng.normal(0.0, 0.1, 48) for _ in range(5)])
    assert same.low < 0.5 < same.high and not same.excludes(0.5)


def test_the_mean_interval_agrees_with_normal_theory_on_a_large_sample() -> None:
    values = np.random.default_rng(3).normal(0.5, 1.0, 2000)
    est = stats.estimate([values], stats.mean)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert est.value == pytest.approx(values.mean())
    assert est.low == pytest.approx(values.mean() - half, abs=0.2 * half)
    assert est.high == pytest.approx(values.mean() + half, abs=0.2 * half)


def test_the_bootstrap_is_stratified_by_seed() -> None:
    """Two seeds whose episodes do not vary: resampling within each seed cannot move the pooled mean, whereas an
    unstratified bootstrap of the 10 values would (its replicates change the seeds' shares)."""
    strata = [np.zeros(4), np.ones(6)]
    est = stats.estimate(strata, stats.mean)
    assert est.value == est.low == est.high == pytest.approx(0.6)
    pooled = sps.bootstrap((np.concatenate(strata),), np.mean, rng=np.random.default_rng(0), method="percentile")
    assert pooled.confidence_interval.high - pooled.confidence_interval.low > 0.3


def test_single_episode_strata_are_held_fixed_and_a_lone_value_is_a_point() -> None:
    assert stats.estimate([np.array([0.3])]).low == 0.3 == stats.estimate([np.array([0.3])]).high
    assert stats.bootstrap_ci(np.array([0.3])) == (0.3, 0.3)
    est = stats.estimate([np.array([5.0]), np.array([0.0, 1.0])], stats.mean)
    assert est.value == pytest.approx(2.0) and 5 / 3 <= est.low <= est.high <= 2 + 1 / 3


def test_the_difference_interval_separates_a_real_gap_from_noise() -> None:
    rng = np.random.default_rng(4)
    a = [rng.normal(0.7, 0.2, 48) for _ in range(5)]
    b = [rng.normal(0.5, 0.2, 48) for _ in range(5)]
    gap = stats.difference(a, b)
    assert gap.excludes_zero() and gap.low <= gap.value <= gap.high
    assert gap.value == pytest.approx(stats.iqm(np.concatenate(a)) - stats.iqm(np.concatenate(b)))
    noise = stats.difference(b, [rng.normal(0.5, 0.2, 48) for _ in range(5)])
    assert not noise.excludes_zero()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        stats.estimate([np.array([])])
    with pytest.raises(ValueError, match="finite"):
        stats.estimate([np.array([0.1, np.nan])])
    with pytest.raises(ValueError, match="method"):
        stats.estimate([np.array([0.1, 0.2])], method="jackknife")
    with pytest.raises(ValueError, match="same episodes"):
        stats.episode_worst({"pgd": np.zeros(3), "mad": np.zeros(4)})


def test_episode_worst_takes_the_minimum_episode_by_episode() -> None:
    worst, which = stats.episode_worst({"pgd": np.array([0.0, 1.0, 0.5]), "mad": np.array([1.0, 0.0, 0.5])})
    assert worst.tolist() == [0.0, 0.0, 0.5] and which == ["pgd", "mad", "pgd"]


def test_resampled_units_counts_a_unit_drawn_twice_twice() -> None:
    sums, counts = np.array([0.0, 10.0, 5.0]), np.array([1.0, 1.0, 1.0])
    low, high = stats.resampled_units(3, lambda idx: sums[idx].sum(-1) / counts[idx].sum(-1))
    assert 0.0 <= low < 5.0 < high <= 10.0


class _EpisodesOfKnownLength:
    """A VecEnv of ``n`` copies (one agent each) whose copy ``b``'s ``k``-th episode lasts ``lengths[b][k]`` steps
    and pays ``100 b + k`` on its last step, so a return names its (copy, episode)."""

    def __init__(self, lengths: list[list[int]]) -> None:
        self.lengths, self.num_envs, self.n_agents = lengths, len(lengths), 1
        self.k = [0] * self.num_envs
        self.t = [0] * self.num_envs

    def reset(self) -> np.ndarray:
        return np.zeros((self.num_envs, 1, 2, 2), dtype=np.uint8)

    def step(self, actions: np.ndarray) -> tuple:
        rewards, dones = np.zeros(self.num_envs), np.zeros(self.num_envs, dtype=bool)
        for b in range(self.num_envs):
            self.t[b] += 1
            if self.t[b] == self.lengths[b][self.k[b] % len(self.lengths[b])]:
                rewards[b], dones[b] = 100 * b + self.k[b], True
                self.k[b] += 1
                self.t[b] = 0
        return self.reset(), rewards, dones, [{} for _ in range(self.num_envs)]


class _ConstantPolicy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def logits_and_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(obs.shape[0], 2) + self.w, torch.zeros(obs.shape[0])


def test_rollout_returns_episodes_in_canonical_order_whatever_order_they_ended_in() -> None:
    """Copy 0's episodes are long, copy 1's short: copy 1 finishes both of its episodes before copy 0 finishes one.
    The result lists (copy 0, ep 0), (copy 1, ep 0), (copy 0, ep 1), (copy 1, ep 1): the same order under any attack."""
    env = _EpisodesOfKnownLength([[5, 5, 5], [1, 1, 1]])
    result = rollout(_ConstantPolicy(), env, 4)   # type: ignore[arg-type]
    assert result.team_returns.tolist() == [0.0, 100.0, 1.0, 101.0]
    assert result.lengths.tolist() == [5, 1, 5, 1]
