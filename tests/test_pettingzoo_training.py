"""Every registered PettingZoo env goes through the same commands as the native env: it trains, is
evaluated under attack with the audit and an oversight log, and refuses what it cannot do in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fgmf_marl.envs.registry import MASKED_ENVS, PETTINGZOO_ENVS
from fgmf_marl.jobs.evaluate import entry as eval_cli
from fgmf_marl.jobs.explain import entry as explain_cli
from fgmf_marl.jobs.train import entry as train_cli
from fgmf_marl.oversight.store import verify

pytestmark = pytest.mark.usefixtures("one_thread")

#: a few hundred agent-steps: one or a few PPO updates on 20-cycle episodes of one env copy
TINY = ["--timesteps", "256", "--no-progress", "env.n_envs=1", "ppo.n_steps=16", "ppo.batch_size=32",
        "ppo.n_epochs=1", "eval_episodes=1", "env.adapter.max_cycles=20"]


def _train(run: Path, name: str, *extra: str) -> None:
    assert train_cli(["--env", name, "--run-dir", str(run), *TINY, *extra]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["timesteps"] >= 256 and summary["episodes"] == 1
    assert "normalised_mean" not in summary  # no oracle outside the native env


@pytest.fixture(scope="module", params=list(PETTINGZOO_ENVS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(request.param) / "run"
    _train(root, request.param)
    return root


def test_trained_policy_is_evaluated_under_attack_with_audit_and_oversight_log(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert eval_cli([str(run), "--attacks", "pgd:steps=1", "--eps", "4", "--episodes", "1", "--n-envs", "1",
                     "--audit", "--audit-obs", "8", "--log-explanations", str(tmp_path / "log"), "--log-every", "10",
                     "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {row["attack"] for row in results["rows"]} == {"none", "pgd[steps=1]"}
    assert (out / "audit.md").is_file() and len(results["audits"]) == 1
    assert results["oversight_logs"] and all(verify(entry["dir"]).ok for entry in results["oversight_logs"])


def test_explanation_metrics_run_where_the_env_gives_masks_and_refuse_in_one_line_elsewhere(
        run: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    args = ["--checkpoint", str(run), "--episodes", "1", "--n-envs", "1", "--every", "10", "--ig-steps", "2",
            "--deletion-steps", "2", "--eps", "0", "--sensitivity-samples", "0", "--randomisation-samples", "0",
            "--no-progress"]
    if request.node.callspec.params["run"] not in MASKED_ENVS:
        assert explain_cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert "relevance masks" in err and "pistonball" in err and "\n" not in err
        return
    assert explain_cli(args) == 0
    study = json.loads((run / "eval" / "explain_eval.json").read_text())
    rows = {row["method"]: row for row in study["table"]}
    # 20 pistons x the steps 0 and 10 of the one 20-cycle episode, each scored against pistonball's masks
    assert study["settings"]["n_samples"] == 40 and study["settings"]["n_episodes"] == 1
    for metric in ("relevance_mass", "target_mass", "pointing_game"):
        assert 0.0 <= rows["PGCA"][metric]["mean"] <= 1.0 and rows["PGCA"][metric]["n"] > 0


def test_a_defended_policy_trains_on_a_pettingzoo_env(tmp_path: Path) -> None:
    _train(tmp_path / "fgmf", "cooperative_pong", "--defense", "fgmf", "--log-explanations", "log_every=10")
    assert verify(tmp_path / "fgmf" / "eval" / "oversight").ok
