"""The PA-AD-style adversary: PettingZoo API, decisions realised by the actor, reward sign, training
with SB3 PPO, and its checkpoint used as an attack in evaluate.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pettingzoo.test import parallel_api_test
from stable_baselines3 import PPO

from fgmf_marl.agents.adversary import (ADVERSARY, AdversaryConfig, AdversaryParallelEnv, AdversaryVecEnv, DirectorCore, director_policy_kwargs,
                              knowledge_size, warm_start)
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attacks import PGD
from fgmf_marl.attacks.budget import Budget
from fgmf_marl.attacks.registry import make_attack
from fgmf_marl.envs.batched import CoverageVecEnv
from fgmf_marl.envs.native import CoverageConfig
from fgmf_marl.envs.registry import EnvConfig, make_parallel_env
from fgmf_marl.jobs.adversary import entry as cli
from fgmf_marl.jobs.evaluate import entry as eval_cli
from fgmf_marl.jobs.train import entry as train_cli
from fgmf_marl.teams.checkpoints import load_adversary
from helpers import coverage_view

CFG = CoverageConfig(max_steps=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim() -> PolicyView:
    return coverage_view(CFG)


def test_wrapper_passes_the_pettingzoo_parallel_api_test(victim: PolicyView) -> None:
    env = AdversaryParallelEnv(make_parallel_env(EnvConfig(native=CFG)), victim, eps=8 / 255, actor_steps=1)
    parallel_api_test(env, num_cycles=20)
    assert env.possible_agents[-1] == ADVERSARY and env.possible_agents[:-1] == ["agent_0", "agent_1", "agent_2"]


def test_adversary_reward_is_minus_the_team_reward_and_victims_act_on_seen_obs(victim: PolicyView) -> None:
    env = AdversaryParallelEnv(make_parallel_env(EnvConfig(native=CFG)), victim, eps=8 / 255, actor_steps=2)
    obs, _ = env.reset(seed=3)
    assert obs[ADVERSARY]["image"].shape == (9, CFG.size, CFG.size)
    assert np.array_equal(obs[ADVERSARY]["image"][3:6], obs["agent_1"])
    assert obs[ADVERSARY]["victim"].shape == (knowledge_size(3, 5),)
    for t in range(CFG.max_steps):
        decision = np.array([t % 5, 5, 5])  # attack agent 0 only
        _, rewards, terms, truncs, infos = env.step({ADVERSARY: decision})
        team = np.mean([rewards[a] for a in env.victims])
        assert rewards[ADVERSARY] == pytest.approx(-team)
        assert infos["agent_0"]["attacked"] and not infos["agent_1"]["attacked"]
    assert truncs[ADVERSARY] and env.agents == []


def test_director_decisions_are_realised_within_eps(victim: PolicyView) -> None:
    core = DirectorCore(victim, eps=32 / 255, n_agents=3, actor_steps=20)
    obs = torch.as_tensor(CoverageVecEnv(CFG, n_envs=8, seed=1).reset()).float() / 255
    with torch.no_grad():
        worst = victim(obs).argmin(-1).reshape(8, 3)
    decisions = worst.clone()
    decisions[:, 2] = core.no_attack  # agent 2: leave alone
    seen = core.realise(obs, decisions.numpy())
    assert (seen - obs).abs().max() <= 32 / 255 + 1e-6
    assert torch.equal(seen.reshape(8, 3, *obs.shape[1:])[:, 2], obs.reshape(8, 3, *obs.shape[1:])[:, 2])
    reached = core.victim_actions(seen).reshape(8, 3)[:, :2] == worst[:, :2].numpy()
    assert reached.mean() >= 0.8


@pytest.mark.parametrize("option", ["untargeted", "least_likely"])
def test_policy_level_decisions_are_the_library_attacks(victim: PolicyView, option: str) -> None:
    """Untargeted = evaluate.py's PGD; least-likely = targeted PGD toward the clean argmin (same seed, same steps)."""
    core = DirectorCore(victim, eps=4 / 255, n_agents=3, actor_steps=5)
    obs = torch.as_tensor(CoverageVecEnv(CFG, n_envs=4, seed=2).reset()).float() / 255
    torch.manual_seed(7)
    seen = core.realise(obs, np.full((4, 3), getattr(core, option)))
    with torch.no_grad():
        worst = victim(obs).argmin(-1)
    torch.manual_seed(7)
    if option == "untargeted":
        expected = PGD(4 / 255, steps=5).perturb(victim, obs)
    else:
        expected = PGD(4 / 255, steps=5, targeted=True).perturb(victim, obs, target=worst)
    assert torch.equal(seen, expected)


@pytest.mark.parametrize("option", ["least_likely", "untargeted"])
def test_warm_start_puts_the_prior_on_its_option(victim: PolicyView, option: str) -> None:
    venv = AdversaryVecEnv(CoverageVecEnv(CFG, n_envs=2, seed=0), victim, eps=4 / 255, n_agents=3, actor_steps=1)
    director = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=8, device="cpu", seed=0,
                   policy_kwargs=director_policy_kwargs())
    warm_start(director.policy, venv.core, option, 0.9)
    index = getattr(venv.core, option)
    obs, _ = director.policy.obs_to_tensor(venv.reset())
    with torch.no_grad():
        dist = director.policy.get_distribution(obs)
    probs = torch.stack([d.probs for d in dist.distribution], dim=1)  # (envs, agents, options)
    assert probs[..., index].numpy() == pytest.approx(0.9, abs=0.02)
    assert (director.predict(venv.reset(), deterministic=True)[0] == index).all()
    # under a budget of one agent in three, it starts by asking for about one: the rest is "no attack"
    share = AdversaryConfig(victim="v", budget_agents=1).warm_share(3)
    assert share == pytest.approx(1 / 3)
    warm_start(director.policy, venv.core, option, 0.9, share)
    with torch.no_grad():
        probs = torch.stack([d.probs for d in director.policy.get_distribution(obs).distribution], dim=1)
    assert probs[..., index].numpy() == pytest.approx(0.3, abs=0.02)
    assert (1 - probs[..., venv.core.no_attack]).numpy() == pytest.approx(share * (1 - 0.1 / (venv.core.n_options - 1)),
                                                                          abs=0.02)
    assert AdversaryConfig(victim="v", budget_steps=0.25, warm_start_share="full").warm_share(3) == 1.0
    assert AdversaryConfig(victim="v", budget_agents=2, budget_steps=0.5).warm_share(3) == pytest.approx(1 / 3)


def test_train_adversary_cli_and_use_as_attack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    victim_dir = tmp_path / "victim"
    assert train_cli(["--timesteps", "192", "--run-dir", str(victim_dir), "--no-progress", "env.n_envs=2",
                      "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2",
                      "checkpoint_every=10000", "env.native.max_steps=10"]) == 0
    adv_dir = tmp_path / "adv"
    assert cli(["--victim", str(victim_dir), "--timesteps", "64", "--run-dir", str(adv_dir), "--no-progress",
                "n_envs=2", "n_steps=16", "batch_size=32", "n_epochs=1", "actor_steps=2"]) == 0
    loaded = load_adversary(adv_dir)
    assert loaded.n_agents == 3 and loaded.config.eps == 8.0
    # a mixed strategy: the director's decisions sampled
    assert make_attack("adversary", 8 / 255, path=loaded).deterministic
    assert not make_attack("adversary", 8 / 255, path=loaded, deterministic=False).deterministic
    out = tmp_path / "eval"
    assert eval_cli([str(victim_dir), "--attacks", f"adversary:path={adv_dir},steps=2", "--eps", "8", "--episodes", "2",
                     "--n-envs", "2", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert any(r["attack"].startswith("adversary") and r["episodes"] == 2 for r in rows)
    # a budgeted director: periodic checkpoints with progress lines, and a summary against the fixed attacks
    budgeted = tmp_path / "adv_k1"
    assert cli(["--victim", str(victim_dir), "--timesteps", "64", "--run-dir", str(budgeted), "--no-progress",
                "n_envs=2", "n_steps=16", "batch_size=32", "n_epochs=1", "actor_steps=2", "budget_agents=1",
                "budget_steps=0.5", "checkpoint_every=32", "eval_episodes=2"]) == 0
    assert "step 32/64" in capsys.readouterr().out and (budgeted / "checkpoints" / "step_32.zip").is_file()
    summary = json.loads((budgeted / "eval" / "summary.json").read_text())
    assert summary["budget"] == "k=1,p=0.5" and summary["director_steps_per_second"] > 0
    assert set(summary["fixed_attacks"]) == {f"{a}@{s}[k=1,p=0.5]" for s in ("random", "fixed", "timed", "value")
                                             for a in ("pgd[steps=2]", "pgd[targeted=true,target_action=least_likely,steps=2]")}
    assert summary["damage_beyond_best"] == pytest.approx(
        summary["fixed_attacks"][summary["best_fixed_attack"]] - summary["director"])
    behaviour = summary["behaviour"]   # what it learned: within the budget, shares that add up
    assert behaviour["episodes"] == 2 and 0 <= behaviour["granted_per_step"] <= 0.5 + 1e-9   # k = 1 on half the steps
    assert behaviour["asked_per_step"] >= behaviour["granted_per_step"]
    assert all(0 <= q <= 1 for q in behaviour["by_quarter"]) and len(behaviour["victims"]) == 3
    if behaviour["granted_per_step"] > 0:
        assert sum(behaviour["options"].values()) == pytest.approx(1, abs=2e-3)
        assert sum(behaviour["victims"]) == pytest.approx(1, abs=2e-3)
    versus = json.loads((budgeted / "eval" / "versus" / "results.json").read_text())["rows"]
    director_rows = [r for r in versus if r["selector"] == "learned"]
    assert len(director_rows) == 1 and director_rows[0]["attacked_agents_max"] <= 1
    assert director_rows[0]["attacked_steps_max"] <= 5      # floor(0.5 x 10 steps)
    # a joint director (one (victim, option) choice per env and step) trains, loads back and attacks one victim
    joint = tmp_path / "adv_joint"
    assert cli(["--victim", str(victim_dir), "--timesteps", "64", "--run-dir", str(joint), "--no-progress",
                "n_envs=2", "n_steps=16", "batch_size=32", "n_epochs=1", "actor_steps=2", "budget_agents=1",
                "decision=joint", "eval_episodes=2"]) == 0
    assert load_adversary(joint).director.action_space.n == 1 + 3 * 7
    joint_summary = json.loads((joint / "eval" / "summary.json").read_text())
    assert joint_summary["behaviour"]["granted_per_step"] <= 1 and joint_summary["behaviour"]["asked_per_step"] <= 1
    joint_rows = json.loads((joint / "eval" / "versus" / "results.json").read_text())["rows"]
    assert [r["attacked_agents_max"] for r in joint_rows if r["selector"] == "learned"] in ([0], [1])
    # bad input: missing victim, a victim that is not a run, a joint director without a one-victim budget
    assert cli(["--victim", str(victim_dir), "--run-dir", str(tmp_path / "y"), "--no-progress", "decision=joint"]) == 2
    assert not (tmp_path / "y").exists()
    assert cli(["--victim", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    assert not (tmp_path / "x").exists()


def test_vec_env_batches_all_copies(victim: PolicyView) -> None:
    venv = AdversaryVecEnv(CoverageVecEnv(CFG, n_envs=4, seed=0), victim, eps=4 / 255, n_agents=3, actor_steps=1)
    obs = venv.reset()
    assert obs["image"].shape == (4, 9, CFG.size, CFG.size) and obs["victim"].shape == (4, knowledge_size(3, 5))
    for _ in range(CFG.max_steps):
        obs, rewards, dones, infos = venv.step(np.full((4, 3), venv.core.no_attack))
    assert dones.all() and all("terminal_observation" in i for i in infos)
    assert all(r == pytest.approx(-i["team_reward"]) for r, i in zip(rewards, infos))


def test_the_director_knows_each_victims_policy_and_its_budget_and_cannot_exceed_it(victim: PolicyView) -> None:
    """k = 1, p = 0.25 of 8 steps: asking to attack everyone every step gets one victim on 2 steps per episode."""
    venv = AdversaryVecEnv(CoverageVecEnv(CFG, n_envs=4, seed=0), victim, eps=4 / 255, n_agents=3, actor_steps=1,
                           budget=Budget(1, 0.25), horizon=CFG.max_steps)
    obs = venv.reset()
    knowledge = obs["victim"].reshape(4, -1)
    per_victim = knowledge[:, :-2].reshape(4, 3, 6)
    assert np.allclose(per_victim[..., :5].sum(-1), 1.0, atol=1e-5)          # clean action distributions
    with torch.no_grad():
        values = victim.value(torch.as_tensor(CoverageVecEnv(CFG, n_envs=4, seed=0).reset()).float() / 255)
    assert np.allclose(per_victim[..., 5].reshape(-1), values.numpy(), atol=1e-5)   # clean values
    assert np.allclose(knowledge[:, -2:], [[1.0, 1 / 3]] * 4)                # all of the budget left, k / n
    attacked, left = [], []
    for _ in range(CFG.max_steps):
        obs, _, dones, infos = venv.step(np.full((4, 3), venv.core.least_likely))
        attacked.append([i["attacked_agents"] for i in infos])
        left.append(obs["victim"][:, -2])
    attacked = np.array(attacked)
    assert attacked.max() == 1 and (attacked.sum(0) == 2).all()               # first two steps, then spent
    assert np.allclose(left[0], 0.5) and np.allclose(left[1], 0.0) and dones.all()
    assert np.allclose(infos[0]["terminal_observation"]["victim"][-2], 0.0)   # the ended episode's last view


def test_joint_choices_decode_to_one_victim_and_option_each(victim: PolicyView) -> None:
    """0 = no attack; 1 + i * m + o = option o on victim i, m = 5 actions + untargeted + least likely = 7."""
    core = DirectorCore(victim, eps=4 / 255, n_agents=3, actor_steps=1, joint=True)
    assert core.n_attacking == 7
    choices = np.array([0, 1, 1 + 4, 1 + 5, 1 + 6, 1 + 7 + 2, 1 + 2 * 7 + 6])
    expected = np.full((7, 3), core.no_attack)
    expected[1, 0] = 0                       # victim 0 pushed toward action 0
    expected[2, 0] = 4                       # ... toward action 4
    expected[3, 0] = core.untargeted
    expected[4, 0] = core.least_likely
    expected[5, 1] = 2                       # victim 1 toward action 2
    expected[6, 2] = core.least_likely       # victim 2, least likely
    assert np.array_equal(core.to_decisions(choices), expected)
    for row, choice in enumerate(choices[1:], start=1):   # joint_index inverts it
        agent = int(np.flatnonzero(expected[row] != core.no_attack)[0])
        assert core.joint_index(agent, int(expected[row, agent])) == choice
    with pytest.raises(ValueError):
        core.joint_index(0, core.no_attack)
    per_victim = DirectorCore(victim, eps=4 / 255, n_agents=3, actor_steps=1)
    assert np.array_equal(per_victim.to_decisions(np.arange(6)), np.arange(6).reshape(2, 3))


def test_joint_director_attacks_one_victim_per_step_and_warm_starts_on_least_likely(victim: PolicyView) -> None:
    venv = AdversaryVecEnv(CoverageVecEnv(CFG, n_envs=2, seed=0), victim, eps=4 / 255, n_agents=3, actor_steps=1,
                           budget=Budget(1, None), horizon=CFG.max_steps, joint=True)
    assert venv.action_space.n == 1 + 3 * 7
    director = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=8, device="cpu", seed=0,
                   policy_kwargs=director_policy_kwargs())
    cfg = AdversaryConfig(victim="v", budget_agents=1, decision="joint")
    assert cfg.warm_share(3) == 1.0                                # one victim whenever it attacks: every step
    assert AdversaryConfig(victim="v", budget_agents=1, budget_steps=0.25, decision="joint").warm_share(3) == 0.25
    warm_start(director.policy, venv.core, "least_likely", 0.9, cfg.warm_share(3))
    obs, _ = director.policy.obs_to_tensor(venv.reset())
    with torch.no_grad():
        probs = director.policy.get_distribution(obs).distribution.probs          # (envs, 22)
    warm = [venv.core.joint_index(i, venv.core.least_likely) for i in range(3)]
    assert probs[:, warm].numpy() == pytest.approx(0.3, abs=0.01)               # 0.9 spread over the victims
    assert probs.sum(-1).numpy() == pytest.approx(1.0, abs=1e-5)
    assert (probs[:, 0] > 0).all()                                               # "no attack" stays explorable
    for step in range(CFG.max_steps):   # every joint choice attacks at most one victim, and that victim
        choice = np.array([1 + (step % 3) * 7 + 6, 0])
        _, _, _, infos = venv.step(choice)
        assert [i["attacked_agents"] for i in infos] == [1, 0]
        assert venv.last_granted[0].tolist() == [a == step % 3 for a in range(3)]


def test_joint_decision_needs_a_budget_of_one_victim() -> None:
    for budget in (None, 2):
        with pytest.raises(Exception, match="budget_agents=1"):
            AdversaryConfig(victim="v", budget_agents=budget, decision="joint").validate()
    with pytest.raises(Exception, match="per_victim, joint"):
        AdversaryConfig(victim="v", decision="both").validate()
    AdversaryConfig(victim="v", budget_agents=1, decision="joint").validate()
