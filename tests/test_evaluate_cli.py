"""scripts/evaluate.py end to end on a short run: outputs, agent subsets, the audit, and every CLI error."""
from __future__ import annotations

import csv
import functools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fgmf_marl import config as cfglib
from fgmf_marl.attacks.registry import expand_presets
from fgmf_marl.jobs.evaluate import entry as cli
from fgmf_marl.jobs.train import entry as train_cli
from fgmf_marl.teams.eval_config import EvalConfig
from tests.conftest import grid_stopped_at_cell

FAST_TRAIN = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2",
              "checkpoint_every=10000", "env.native.max_steps=10"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "victim"
    assert train_cli(["--timesteps", "192", "--run-dir", str(root), "--no-progress", *FAST_TRAIN]) == 0
    return root


def _eval(run_dir: Path, out: Path, *extra: str) -> int:
    return cli([str(run_dir), "--out", str(out), "--episodes", "2", "--n-envs", "2", "--no-progress", *extra])


def test_grid_writes_csv_table_curves_and_config(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert _eval(run_dir, out, "--attacks", "random", "pgd:steps=2", "--eps", "2,8", "--seeds", "0,1") == 0
    rows = list(csv.DictReader((out / "episodes.csv").open()))
    # clean + 2 attacks x 2 eps, x 2 seeds, x 2 episodes
    assert len(rows) == (1 + 2 * 2) * 2 * 2
    assert {r["attack"] for r in rows} == {"none", "random", "pgd[steps=2]"}
    assert all(r["normalised_return"] != "" for r in rows)
    table = (out / "results.md").read_text()
    assert "| victim | pgd[steps=2] | 8 |" in table and "±" in table
    assert (out / "curves_victim.png").stat().st_size > 1000
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("victim/pgd[steps=2]/normalised")] == [
        (2, round(r["normalised_mean"], 4)) for r in json.loads((out / "results.json").read_text())["rows"]
        if r["attack"] == "pgd[steps=2]" and r["eps255"] == 2] + [
        (8, round(r["normalised_mean"], 4)) for r in json.loads((out / "results.json").read_text())["rows"]
        if r["attack"] == "pgd[steps=2]" and r["eps255"] == 8]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["eps"] == [2.0, 8.0] and cfg["seeds"] == [0, 1]
    summary = json.loads((out / "results.json").read_text())["rows"]
    clean = [r for r in summary if r["attack"] == "none"][0]
    assert clean["flip_rate"] == 0.0
    strong = [r for r in summary if r["attack"] == "pgd[steps=2]" and r["eps255"] == 8][0]
    assert strong["flip_rate"] > 0.2
    # per-episode flip rates in the CSV, weighted by episode length, give the cell's rate
    eps8 = [r for r in rows if r["attack"] == "pgd[steps=2]" and r["eps255"] == "8"]
    weighted = sum(float(r["flip_rate"]) * int(r["length"]) for r in eps8) / sum(int(r["length"]) for r in eps8)
    assert weighted == pytest.approx(strong["flip_rate"], abs=1e-5)
    assert strong["flip_rate_std"] >= 0.0 and f"{strong['flip_rate']:.3f} ± " in table


def test_attacking_one_agent_caps_the_flip_rate(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert _eval(run_dir, out, "--attacks", "pgd:steps=3", "--eps", "64", "--agents", "1") == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    attacked = [r for r in rows if r["attack"] != "none"][0]
    assert 0 < attacked["flip_rate"] <= 1 / 3 + 1e-9


def test_log_explanations_writes_a_verifiable_log_with_frames(run_dir: Path, tmp_path: Path) -> None:
    from fgmf_marl.oversight import list_episodes, load_episode, verify

    log_root = tmp_path / "log"
    assert _eval(run_dir, tmp_path / "eval", "--attacks", "pgd:steps=2", "--eps", "8", "--log-explanations", str(log_root),
                 "--log-every", "5") == 0
    logs = sorted(p.parent for p in log_root.rglob("manifest.jsonl"))
    assert logs and all(verify(folder).ok for folder in logs)
    assert [p.name for p in logs] == ["victim__none__eps0__s0", "victim__pgd-steps-2__eps8__s0"]   # shell-safe
    episode = load_episode(list_episodes(logs[-1])[0])
    assert "frames" in episode.arrays and episode.arrays["frames"].shape[-1] == 3
    recorded = json.loads((tmp_path / "eval" / "results.json").read_text())["oversight_logs"]
    assert sorted(Path(r["dir"]) for r in recorded) == logs
    for r in recorded:  # every log was sealed, and its head is the one results.json keeps
        result = verify(r["dir"], expect_head=r["head"])
        assert result.ok and result.sealed and r["episodes"] == 2


def test_a_log_folder_belongs_to_one_run_unless_append(run_dir: Path, tmp_path: Path, capsys) -> None:
    log_root = tmp_path / "log"
    args = ("--attacks", "random", "--eps", "8", "--log-explanations", str(log_root), "--log-every", "20")
    assert _eval(run_dir, tmp_path / "first", *args) == 0
    capsys.readouterr()
    assert _eval(run_dir, tmp_path / "second", *args) == 2          # refused before any episode runs
    err = capsys.readouterr().err.strip()
    assert "already holds a log; give --append" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "second").exists()
    assert _eval(run_dir, tmp_path / "third", *args, "--append") == 0
    recorded = json.loads((tmp_path / "third" / "results.json").read_text())["oversight_logs"]
    assert all(r["episodes"] == 4 for r in recorded)                # two runs of 2 episodes, one chain


def test_audit_writes_verdict_and_table(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    config = tmp_path / "fast_audit.yaml"
    config.write_text("audit_queries: 30\n")
    assert _eval(run_dir, out, "--attacks", "fgsm", "--eps", "8", "--audit", "--audit-obs", "16", "--config", str(config)) == 0
    text = (out / "audit.md").read_text()
    assert "Verdict:" in text and "| pgd-10 |" in text and "gradient_mismatch" in text
    assert "| transfer |" not in text
    # a transfer attack in the grid lends its surrogate to the audit's black-box-beats-white-box check
    assert _eval(run_dir, tmp_path / "eval2", "--attacks", f"transfer:surrogate={run_dir}", "--eps", "8", "--audit",
                 "--audit-obs", "16", "--config", str(config)) == 0
    assert "| transfer |" in (tmp_path / "eval2" / "audit.md").read_text()
    assert "audit verdict:" in capsys.readouterr().out


def test_a_gated_victims_audit_comes_with_its_gradient_shield_control(tmp_path: Path, capsys) -> None:
    gated = tmp_path / "gated"
    assert train_cli(["--timesteps", "192", "--run-dir", str(gated), "--no-progress", "--defense", "sgam",
                      *FAST_TRAIN]) == 0
    out = tmp_path / "eval"
    config = tmp_path / "fast_audit.yaml"
    config.write_text("audit_queries: 30\n")
    assert _eval(gated, out, "--attacks", "fgsm", "--eps", "8", "--audit", "--audit-obs", "32", "--config",
                 str(config)) == 0
    results = json.loads((out / "results.json").read_text())
    control = results["audit_controls"]["gated"]
    assert control["verdict"].startswith("FAIL") and results["audits"]["gated"]["verdict"].startswith("PASS")
    assert "Verdict: FAIL" in (out / "audit_control.md").read_text()
    assert "gradient_shield control (must FAIL): FAIL" in capsys.readouterr().out


def test_an_eps_free_attack_runs_once_per_seed_and_joins_the_worst_case_at_every_eps(
        run_dir: Path, tmp_path: Path, capsys) -> None:
    from fgmf_marl.experiments import tables
    from fgmf_marl.experiments.schema import ColumnSpec
    from fgmf_marl.oversight import list_episodes, load_episode, verify

    out, logs = tmp_path / "eval", tmp_path / "log"
    blackout, jpeg = "fault[kind=blackout]", "corruption[kind=jpeg]"
    args = [str(run_dir), "--episodes", "2", "--n-envs", "2", "--attacks", "pgd:steps=2", "fault:kind=blackout",
            "corruption:kind=jpeg", "--eps", "4,8", "--seeds", "0,1", "--log-explanations", str(logs), "--log-every", "5"]
    assert cli([*args, "--out", str(out)]) == 0                   # with the progress bar
    assert "| 10/10 [" in capsys.readouterr().err                 # 2 seeds x (clean, pgd at 2 eps, 2 eps-free cells)
    rows = list(csv.DictReader((out / "episodes.csv").open()))
    for attack in (blackout, jpeg):                                # once per seed: 2 seeds x 2 episodes
        mine = [r for r in rows if r["attack"] == attack]
        assert sorted(r["seed"] for r in mine) == ["0", "0", "1", "1"]
        assert {(r["eps255"], r["eps_free"]) for r in mine} == {("", "1")}
    assert sorted((r["eps255"], r["eps_free"]) for r in rows if r["attack"] == "pgd[steps=2]") == \
        [("4", "0")] * 4 + [("8", "0")] * 4
    results = json.loads((out / "results.json").read_text())
    assert [r["eps255"] for r in results["rows"] if r["attack"] in (blackout, jpeg)] == [None, None]
    table = (out / "results.md").read_text()
    assert table.count(f"| victim | {blackout} | own budget |") == 1 and table.count("| own budget | faults |") == 1
    profile = {(r["threat_model"], r["eps255"]): r for r in results["profile"]}
    assert list(profile) == [("corruptions", None), ("faults", None), ("L-inf", 4.0), ("all", 4.0), ("L-inf", 8.0),
                             ("all", 8.0)]
    for eps in (4.0, 8.0):                                         # the eps-free attacks join every eps's worst case
        every = profile["all", eps]
        assert every["attacks"] == sorted(["pgd[steps=2]", blackout, jpeg])
        parts = [profile[m, e]["episode_worst_values"] for m, e in (("corruptions", None), ("faults", None),
                                                                     ("L-inf", eps))]
        assert every["episode_worst_values"] == pytest.approx(list(map(min, zip(*parts))))
        (worst,) = [w for w in results["worst"] if w["eps255"] == eps]
        assert worst["episode_worst_values"] == every["episode_worst_values"]
        column = functools.partial(ColumnSpec, label="c", source="s", eps=eps, metric="normalised")
        assert tables._value(results, column(attack="profile:faults"), "evaluate")[0] == \
            profile["faults", None]["episode_worst_mean"]
        assert tables._value(results, column(attack=blackout), "evaluate")[0] == \
            next(r["normalised_mean"] for r in results["rows"] if r["attack"] == blackout)
        assert tables._value(results, column(attack="worst"), "evaluate")[0] == worst["normalised_mean"]
    folders = sorted(p.name for p in logs.iterdir())
    assert [f for f in folders if "fault" in f] == ["victim__fault-kind-blackout__eps-free__s0",
                                                    "victim__fault-kind-blackout__eps-free__s1"]
    assert len(folders) == 10 and all(verify(logs / f).ok for f in folders)
    assert load_episode(list_episodes(logs / folders[0])[0]).meta["run"]["eps255"] is None
    summary = load_episode(list_episodes(logs / "victim__fault-kind-blackout__eps-free__s0")[0]).meta["summary"]
    assert "relevance_mass_accuracy" not in summary   # a blacked-out view has no map to score: no NaN, no key
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    assert cli([*args, "--out", str(tmp_path / "again"), "--append", "--no-progress"]) == 0   # a second run appends
    recorded = json.loads((tmp_path / "again" / "results.json").read_text())["oversight_logs"]
    assert len(recorded) == 10 and all(r["episodes"] == 4 and verify(r["dir"], expect_head=r["head"]).ok
                                       for r in recorded)


def test_strong_preset_runs_end_to_end_with_worst_rows(run_dir: Path, tmp_path: Path) -> None:
    second = tmp_path / "victim2"                   # a second checkpoint: the worst case across checkpoints
    shutil.copytree(run_dir, second)
    out = tmp_path / "eval"
    assert cli([str(run_dir), str(second), "--out", str(out), "--episodes", "2", "--n-envs", "2", "--no-progress",
                "--attacks", "strong:steps=2,restarts=1", "fgsm", "--surrogate", str(run_dir), "--eps", "8",
                "--seeds", "0,1"]) == 0
    expanded = ["pgd:steps=2,restarts=1", "pgd:targeted=true,target_action=least_likely,steps=2", "mad", "critic",
                "square", f"transfer:surrogate={run_dir}", "fgsm"]     # no gate, deterministic forward: no bpda/eot
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["attacks"] == expanded and cfg["surrogate"] is None
    results = json.loads((out / "results.json").read_text())
    worst = results["worst"]
    assert [(r["checkpoint"], r["eps255"]) for r in worst] == [("victim", 8.0), ("victim2", 8.0)]
    rows = {(r["checkpoint"], r["attack"]): r for r in results["rows"] if r["eps255"] == 8}
    for r in worst:
        assert r["attack"] == "worst" and r["seeds"] == 2 and r["episodes"] == 4
        assert r["normalised_mean"] <= min(rows[r["checkpoint"], a]["normalised_mean"] for a in
                                           [_label(s) for s in expanded]) + 1e-9
        assert {m["attack"] for m in r["per_seed"]} <= {_label(s) for s in expanded}
    (across,) = results["worst_across_checkpoints"]
    assert across["checkpoints"] == 2 and across["normalised_std"] == pytest.approx(0.0)   # same weights
    table = (out / "results.md").read_text()
    assert "## Worst case over attacks" in table and "| victim | worst | 8 |" in table
    assert "## Worst case across checkpoints" in table
    assert len(list(csv.DictReader((out / "episodes.csv").open()))) == 2 * 2 * 2 * (1 + len(expanded))
    assert (out / "comparison.png").stat().st_size > 1000       # both checkpoints on one axis
    for r in results["rows"] + worst:                            # bootstrap bands never leave the episodes' range
        low, high = r["normalised_ci95"]
        assert low <= r["normalised_mean"] + 1e-9 and high >= r["normalised_mean"] - 1e-9
    recorded = cfglib.load(EvalConfig, out / "config.yaml")   # the recorded config loads (and reruns) as it is
    assert recorded.attacks == expanded and expand_presets(recorded.attacks) == expanded


def _label(spec: str) -> str:
    return spec.replace(":", "[", 1) + "]" if ":" in spec else spec


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "nosuch"], "unknown attack 'nosuch'; known: random, fgsm, pgd"),
    (["--eps", "0"], "eps 0 is out of range"),
    (["--eps", "300"], "eps 300 is out of range"),
    (["--eps", "a,b"], "not a comma-separated list of numbers"),
    (["--attacks", "pgd:stepz=3"], "has no option 'stepz'"),
    (["--agents", "7"], "out of range"),
    (["--threads", "0"], "--threads=0 must be an integer >= 1"),
    (["--device", "gpu"], "device='gpu' is not a device"),
    (["--log-explanations", "logdir", "--log-key-file", "/nonexistent/key"], "does not exist"),
    (["--attacks", "pgd:targeted=true,target_action=99"],
     "attack 'pgd': target_action=99 is out of range; accepted: 0..4 or least_likely"),
    (["--attacks", "strong:steps=0"], "preset 'strong' option steps=0 must be an integer >= 1"),
    (["--seeds", "0,-1"], "seeds=-1 is out of range; accepted: integers 0.."),
    (["--surrogate", "runs/x"], "surrogate/adversary feed a preset (--attacks strong)"),
    (["--attacks", "learned"], "--attacks learned expands to no attack here (the preset 'learned' is the director"),
    (["--attacks", "pgd:steps=1", "fault:kind=frozen", "--budget-agents", "1"],   # before the pgd cells run
     "attack 'fault' keeps state over an episode and cannot be budgeted"),
])
def test_cli_errors_exit_2_with_one_line_and_no_output(run_dir: Path, tmp_path: Path, capsys, extra, message) -> None:
    out = tmp_path / "eval"
    assert _eval(run_dir, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_checkpoint_is_a_clean_error(tmp_path: Path, capsys) -> None:
    assert cli([str(tmp_path / "nope"), "--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and not (tmp_path / "eval").exists()
    assert cli(["--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    assert "at least one checkpoint" in capsys.readouterr().err


def test_an_interrupted_evaluation_resumes_to_what_an_uninterrupted_run_writes(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The independent reference is the same evaluation run without interruption: a run stopped after its third
    cell keeps those cells (and nothing else of its outputs), is refused without --resume, and with --resume
    (config.yaml of the folder as its config) runs the other cells and writes the same episodes and tables."""
    args = ("--attacks", "random", "pgd:steps=2", "--eps", "4", "--seeds", "0,1")
    assert _eval(run_dir, tmp_path / "whole", *args) == 0
    stopped = tmp_path / "stopped"
    with grid_stopped_at_cell(4):
        assert _eval(run_dir, stopped, *args) != 0
    assert sorted(p.name for p in stopped.iterdir()) == ["cells", "config.yaml"]
    assert len(list((stopped / "cells").glob("*.json"))) == 3
    capsys.readouterr()
    assert _eval(run_dir, stopped, *args) == 2                 # not silently restarted, not overwritten
    assert "use --resume or another --out" in capsys.readouterr().err
    assert cli(["--out", str(stopped), "--resume", "--no-progress"]) == 0
    assert not (stopped / "cells").exists()
    assert (stopped / "episodes.csv").read_text() == (tmp_path / "whole" / "episodes.csv").read_text()
    whole, resumed = (json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "whole", stopped))
    assert resumed["resumed_cells"] == 3 and whole["resumed_cells"] == 0
    for key in ("rows", "worst", "profile"):
        assert resumed[key] == whole[key]


def test_resume_refuses_another_config_a_finished_evaluation_and_oversight_logs(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stopped = tmp_path / "stopped"
    with grid_stopped_at_cell(2):
        assert _eval(run_dir, stopped, "--attacks", "random", "--eps", "4") != 0
    assert _eval(run_dir, tmp_path / "done", "--attacks", "random", "--eps", "4") == 0
    capsys.readouterr()
    for argv, message in (
            ([str(run_dir), "--out", str(stopped), "--attacks", "random", "--eps", "8"], "records another evaluation "
             r"\(config.yaml differs in eps\)"),
            (["--out", str(tmp_path / "done")], "holds a finished evaluation"),
            (["--out", str(tmp_path / "nothing")], "is not an evaluation's output folder"),
            ([str(run_dir), "--attacks", "random"], "--resume needs --out"),
            (["--out", str(stopped), "--log-explanations", str(tmp_path / "logs")], "cannot continue an evaluation "
             "that writes oversight logs")):
        assert cli([*argv, "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in stopped.iterdir()) == ["cells", "config.yaml"]   # refusals leave it as it was
    assert not (tmp_path / "logs").exists()


def test_two_evaluations_of_one_policy_pair_their_episodes_so_a_table_can_join_their_attackers(
        run_dir: Path, tmp_path: Path) -> None:
    # the same attack in two evaluations of other attack lists scores every episode alike (env seeds follow the
    # episode, not the grid): what lets a worst-case column join an evaluation run later (tables.joined_worst)
    from fgmf_marl.experiments import tables
    from fgmf_marl.experiments.schema import ColumnSpec
    first, second = tmp_path / "first", tmp_path / "second"
    assert _eval(run_dir, first, "--attacks", "random", "pgd:steps=2", "--eps", "8", "--seeds", "0,1") == 0
    assert _eval(run_dir, second, "--attacks", "pgd:steps=2", "--eps", "8", "--seeds", "0,1") == 0
    a, b = (json.loads((out / "results.json").read_text()) for out in (first, second))
    pgd_a, pgd_b = ([r for r in d["rows"] if r["attack"] == "pgd[steps=2]"][0] for d in (a, b))
    assert pgd_a["normalised_episodes"] == pgd_b["normalised_episodes"]
    col = ColumnSpec(source="strong", attack="worst_episode", eps=8, metric="normalised", also=["learned"])
    value, note, worst = tables.joined_worst(a, [b], col)   # the joined attacker is already in: nothing changes
    row = [r for r in a["worst"] if r["eps255"] == 8][0]
    assert worst.tolist() == row["episode_worst_values"] and value == pytest.approx(row["episode_worst_mean"])
    assert note.endswith("pgd[steps=2] 0")
