"""scripts/reproduce.py: the tiny experiment end to end on a local 2-CPU Ray cluster, caching, kill and
rerun, resume, failures, and one-line errors for bad experiment files before anything starts."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fgmf_marl import config as cfglib
from fgmf_marl import stats
from fgmf_marl.experiments import cache, plan, runner, schema, tables
from fgmf_marl.jobs import reproduce
from fgmf_marl.jobs.train import entry as train_cli
from tests.conftest import grid_stopped_at_cell

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(folder: Path, experiment: Path = TINY) -> list[str]:
    return [str(experiment), "--results-root", str(folder / "root"), "--results", str(folder / "RESULTS.md"),
            "--figures", str(folder / "figures"), "--max-parallel", "2", "--no-progress"]


def _numbers(root: Path) -> dict[str, object]:
    """Every task's headline numbers: the trainer's evaluation and the attack grid's rows."""
    out: dict[str, object] = {}
    for summary in sorted(root.glob("tasks/train__*/out/eval/summary.json")):
        data = json.loads(summary.read_text())
        out[summary.parts[-4]] = (data["timesteps"], data["normalised_mean"], data["team_return_mean"])
    for results in sorted(root.glob("tasks/evaluate__*/out/results.json")):
        data = json.loads(results.read_text())
        out[results.parts[-3]] = [(r["attack"], r["eps255"], r["normalised_mean"]) for r in data["rows"]]
    return out


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    assert reproduce.entry(_args(folder)) == 0
    return folder


def test_tiny_experiment_end_to_end_on_a_local_ray_cluster(clean_run: Path) -> None:
    folder = clean_run
    text = (folder / "RESULTS.md").read_text()
    assert "<!-- reproduce:begin tiny -->" in text and "<!-- reproduce:end tiny -->" in text
    table = [line for line in text.splitlines() if line.startswith("| none |")]
    # the return columns: IQM over seeds x episodes [interval]; the wall time: mean ± std over 2 seeds
    assert len(table) == 1 and table[0].count("[") == 3 and table[0].count("±") == 1
    assert "IQM over seeds × episodes [95 % stratified-bootstrap interval" in text
    assert "Per-seed means of the attacked columns:" in text and "(min " in text
    assert "| none seed 0 | 1 |" in text and "| none seed 1 | 1 |" in text
    assert "python scripts/train_marl.py --config tasks/train__none__s0/config.yaml" in text
    assert "torch 2" in text and "ray 2" in text and "QUICK" not in text
    assert (folder / "figures" / "tiny__tiny.png").stat().st_size > 1000
    records = [json.loads(p.read_text()) for p in (folder / "root").glob("tasks/*/task.json")]
    assert sorted(r["id"] for r in records) == ["evaluate/pgd/none/s0", "evaluate/pgd/none/s1",
                                                "train/none/s0", "train/none/s1"]
    assert all(r["status"] == "done" and r["threads"] == 1 and Path(r["log"]).is_file() for r in records)
    assert {r["code_version"] for r in records} == {cache.code_version()}   # read by each task as it started
    assert _numbers(folder / "root")["train__none__s0"][0] == 768


def test_the_section_releases_its_scores_and_they_give_back_every_interval(clean_run: Path) -> None:
    """The scores file beside RESULTS.md holds each cell's per-seed values and episodes: each seed's value is its
    output's own figure, and the IQM and stratified-bootstrap interval recomputed from the file's episodes by
    ``fgmf_marl.stats`` are the section's cells, digit for digit."""
    text = (clean_run / "RESULTS.md").read_text()
    assert "- scores: [scores/tiny.json](scores/tiny.json)" in text
    scores = json.loads((clean_run / "scores" / "tiny.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert scores["experiment"] == "tiny" and scores["code_version"] == cache.code_version()
    table = scores["tables"]["tiny"]
    assert [c["label"] for c in table["columns"]] == ["clean", "PGD-2 ε = 2/255", "worst ε = 2/255", "wall"]
    cells = table["rows"]["none"]
    root = clean_run / "root"
    for seed in (0, 1):
        summary = json.loads((root / "tasks" / f"train__none__s{seed}" / "out" / "eval" / "summary.json").read_text())
        clean = cells["clean"]["seeds"][seed]
        record = json.loads((root / "tasks" / f"train__none__s{seed}" / "task.json").read_text())
        assert clean["tasks"] == {record["id"]: record["key"]} and clean["code_versions"] == {
            record["id"]: record["code_version"]}
        assert clean["value"] == summary["normalised_mean"] and clean["n_episodes"] == summary["episodes"]
        assert clean["episodes"] == summary["normalised_episodes"]
        results = json.loads((root / "tasks" / f"evaluate__pgd__none__s{seed}" / "out" / "results.json").read_text())
        pgd_row = next(r for r in results["rows"] if r["attack"] == "pgd[steps=2]" and r["eps255"] == 2)
        assert cells["PGD-2 ε = 2/255"]["seeds"][seed]["episodes"] == pgd_row["normalised_episodes"]
        assert cells["wall"]["seeds"][seed]["episodes"] is None               # a wall time has no episodes
    row = next(line for line in text.splitlines() if line.startswith("| none | 2 |")).split(" | ")

    def shown(x: float) -> str:
        return f"{x:.3f}".replace("-", "−")

    for column, label in enumerate(("clean", "PGD-2 ε = 2/255", "worst ε = 2/255"), start=2):
        est = stats.estimate([np.asarray(s["episodes"]) for s in cells[label]["seeds"]], stats.iqm)
        assert row[column] == f"{shown(est.value)} [{shown(est.low)}, {shown(est.high)}]"


def test_a_fresh_results_root_keeps_the_cells_the_scores_file_holds(clean_run: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A section regenerated where the results root is gone (another machine) reads the seeds it does not compute
    from the scores file, under the same task keys only: the cells come back digit for digit and say where from."""
    shutil.copy(clean_run / "RESULTS.md", tmp_path / "RESULTS.md")
    shutil.copytree(clean_run / "scores", tmp_path / "scores")
    assert reproduce.entry([*_args(tmp_path), "--only", "train/none/s0"]) == 0
    assert "1/1 tasks done (0 cached)" in capsys.readouterr().out            # only s0 trained here
    text = (tmp_path / "RESULTS.md").read_text()

    def table(lines: str) -> list[str]:
        return [line for line in lines.splitlines() if line.startswith("| none")]

    assert "missing" not in text and table(text) == table((clean_run / "RESULTS.md").read_text())
    assert "3 task(s) are not in this results root" in text
    for task in ("train/none/s1", "evaluate/pgd/none/s0", "evaluate/pgd/none/s1"):
        cells_row = next(line for line in text.splitlines() if line.startswith(f"| `{task}` |"))
        assert cells_row.count("| scores file |") == 1
    before, after = (json.loads((folder / "scores" / "tiny.json").read_text()) for folder in (clean_run, tmp_path))
    assert after["tables"]["tiny"]["rows"]["none"]["PGD-2 ε = 2/255"] == before["tables"]["tiny"]["rows"]["none"][
        "PGD-2 ε = 2/255"]

    # an entry made under another key (another config) is not this task's: its cells are missing
    after["tables"]["tiny"]["rows"]["none"]["clean"]["seeds"][1]["tasks"]["train/none/s1"] = "0123456789abcdef"
    (tmp_path / "scores" / "tiny.json").write_text(json.dumps(after))
    assert reproduce.entry([*_args(tmp_path), "--only", "train/none/s0"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| none seed 1 | 1 | missing (train/none/s1) |" in text


def test_a_damaged_scores_file_is_a_one_line_error_before_anything_runs(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "tiny.json").write_text("{not json")
    assert reproduce.entry(_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny.json: cannot be read as a scores file" in err
    assert not (tmp_path / "root").exists() and not (tmp_path / "RESULTS.md").exists()
    (tmp_path / "scores" / "tiny.json").write_text(json.dumps({"experiment": "other", "tables": {}}))
    assert reproduce.entry(_args(tmp_path)) == 2
    assert "is not the scores file of experiment 'tiny'" in capsys.readouterr().err
    entry = {"seed": 0, "tasks": {"train/none/s0": "k"}, "code_versions": {"train/none/s0": "v"}, "value": "0.5",
             "n_episodes": 4, "note": "", "episodes": [0.1, "0.2"]}              # a number written as a string
    (tmp_path / "scores" / "tiny.json").write_text(json.dumps(
        {"experiment": "tiny", "tables": {"tiny": {"rows": {"none": {"clean": {"seeds": [entry]}}}}}}))
    assert reproduce.entry(_args(tmp_path)) == 2
    assert "table 'tiny' is not as reproduce.py writes it" in capsys.readouterr().err
    assert not (tmp_path / "root").exists() and not (tmp_path / "RESULTS.md").exists()


def test_legacy_training_records_are_upgraded_not_retrained(clean_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Records from before run ids: a training whose recorded config keys to today's key is kept (and
    upgraded), and so is its evaluation; a training whose config disagrees reruns, and its evaluation with it."""
    shutil.copytree(clean_run / "root", tmp_path / "root")
    for path in (tmp_path / "root").glob("tasks/*/task.json"):
        record = json.loads(path.read_text())
        record.pop("run_id"), record.pop("dep_runs")
        record["key"] = "0123456789abcdef"                       # the old key format
        if record["id"] == "train/none/s1":
            record["config"]["timesteps"] = 512                 # not what the experiment asks for
        path.write_text(json.dumps(record))
    before = (tmp_path / "root" / "tasks" / "train__none__s0" / "out" / "eval" / "summary.json").read_text()
    assert reproduce.entry(_args(tmp_path)) == 0
    assert "4/4 tasks done (2 cached)" in capsys.readouterr().out
    kept = json.loads((tmp_path / "root" / "tasks" / "train__none__s0" / "task.json").read_text())
    assert kept["legacy_key"] == "0123456789abcdef" and kept["key"] != kept["legacy_key"] and kept["run_id"]
    assert (tmp_path / "root" / "tasks" / "train__none__s0" / "out" / "eval" / "summary.json").read_text() == before
    redone = json.loads((tmp_path / "root" / "tasks" / "train__none__s1" / "task.json").read_text())
    assert "legacy_key" not in redone and redone["config"]["timesteps"] == 768
    evaluation = json.loads((tmp_path / "root" / "tasks" / "evaluate__pgd__none__s0" / "task.json").read_text())
    assert evaluation["legacy_key"] and evaluation["dep_runs"] == {"train/none/s0": kept["run_id"]}
    assert sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "root" / "stale").iterdir()) == [
        "evaluate__pgd__none__s1", "train__none__s1"]                  # what disagreed, and what read it
    assert _numbers(tmp_path / "root") == _numbers(clean_run / "root")


def test_only_keeps_every_cached_cell_in_the_tables(clean_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(clean_run / "root", tmp_path / "root")
    assert reproduce.entry([*_args(tmp_path), "--only", "train/none/s0"]) == 0
    assert "1/1 tasks done (1 cached)" in capsys.readouterr().out              # only s0 was asked for
    text = (tmp_path / "RESULTS.md").read_text()
    assert "missing" not in text and "| none seed 1 | 1 |" in text              # ... the table keeps seed 1's cells
    assert "| `evaluate/pgd/none/s1` |" in text                                    # and its cell's command


def test_cached_tasks_are_skipped_on_a_rerun(clean_run: Path, capsys: pytest.CaptureFixture) -> None:
    folder = clean_run
    records = {p: p.stat().st_mtime_ns for p in (folder / "root").glob("tasks/*/task.json")}
    before = (folder / "RESULTS.md").read_text()
    assert reproduce.entry(_args(folder)) == 0
    assert "4/4 tasks done (4 cached)" in capsys.readouterr().out               # no training, no Ray cluster
    assert {p: p.stat().st_mtime_ns for p in records} == records
    after = (folder / "RESULTS.md").read_text()
    strip = [line for line in after.splitlines() if "wall time of this invocation" not in line]
    assert strip == [line for line in before.splitlines() if "wall time of this invocation" not in line]


def test_rerun_flag_reruns_the_matching_tasks_and_their_dependents() -> None:
    tasks = plan.expand(schema.load_experiment(TINY), reproduce.JOBS, quick=False)
    ids = {t.id for t in tasks}
    rerun: set[str] = set()
    for task in tasks:   # the rule main() applies
        if task.id.startswith("train/none/s1") or rerun.intersection(task.deps):
            rerun.add(task.id)
    assert rerun == {"train/none/s1", "evaluate/pgd/none/s1"} and rerun < ids


def test_the_cache_survives_a_new_option_at_its_default_but_not_a_changed_default(clean_run: Path) -> None:
    root = clean_run / "root"
    tasks = plan.expand(schema.load_experiment(TINY), reproduce.JOBS, quick=False)
    train = next(t for t in tasks if t.id == "train/none/s0")
    record = cache.read_record(root, train.id)
    assert cache.is_cached(root, train, record, {})
    # the record as code without defense.scorpio.pgd_steps (added later, default 0) would have written it
    older = copy.deepcopy(record["config"])
    del older["defense"]["scorpio"]["pgd_steps"]
    assert plan.task_key(reproduce.JOBS["train"], "train", older, ()) == train.key
    assert cache.is_cached(root, train, {**record, "config": older}, {})
    # a default that changed since the cell was computed, or a value the experiment sets, is another cell
    changed = copy.deepcopy(record["config"])
    changed["ppo"]["learning_rate"] *= 2
    assert not cache.is_cached(root, train, {**record, "config": changed}, {})
    assert plan.task_key(reproduce.JOBS["train"], "train", {**train.config, "timesteps": 999}, ()) != train.key
    # a dependent is cached only on the very run of its dependency it read
    evaluation = next(t for t in tasks if t.id == "evaluate/pgd/none/s0")
    ev_record = cache.read_record(root, evaluation.id)
    assert cache.dep_runs(root, evaluation) == {train.id: record["run_id"]}
    assert cache.is_cached(root, evaluation, ev_record, cache.dep_runs(root, evaluation))
    assert not cache.is_cached(root, evaluation, ev_record, {train.id: "a rerun of the training"})
    assert not cache.is_cached(root, evaluation, ev_record, {train.id: None})   # the training reruns now


def kill_and_rerun(experiment: Path, folder: Path) -> None:
    """Run reproduce.py, SIGKILL it once the first training task wrote a checkpoint, rerun it to the end."""
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *_args(folder, experiment)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a guard against a hang, not a speed check
    while not list((folder / "root").glob("tasks/train__*/out/checkpoints/*.zip")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "RESULTS.md").exists()                                 # killed before its tables
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kill_and_rerun_equals_a_clean_run(clean_run: Path, tmp_path: Path) -> None:
    """One training task of the tiny experiment, checkpointed halfway (which changes nothing it learns), so
    the kill usually lands mid-training and only an exact resume gives the clean run's numbers."""
    data = yaml.safe_load(TINY.read_text())
    data["runs"][0]["seeds"] = [0]
    data["runs"][0]["overrides"] = [o for o in data["runs"][0]["overrides"] if not o.startswith("checkpoint_every")] \
        + ["checkpoint_every=384"]
    data["evaluations"] = []
    data["tables"][0]["columns"] = [data["tables"][0]["columns"][0]]
    experiment = tmp_path / "one.yaml"
    experiment.write_text(yaml.safe_dump(data, allow_unicode=True))
    kill_and_rerun(experiment, tmp_path)
    numbers = _numbers(tmp_path / "root")
    assert numbers == {"train__none__s0": _numbers(clean_run / "root")["train__none__s0"]}


def test_an_interrupted_training_task_resumes_from_its_latest_checkpoint(tmp_path: Path) -> None:
    exp = schema.load_experiment(TINY)
    exp.runs[0].overrides = [o for o in exp.runs[0].overrides if not o.startswith("checkpoint_every")] + \
        ["checkpoint_every=384"]
    task = plan.expand(exp, reproduce.JOBS, quick=False)[0]
    out = tmp_path / task.out
    # what a kill after the first checkpoint leaves: step_384.zip, no final.zip, no evaluation
    assert train_cli(["--timesteps", "384", "--run-dir", str(out), "--no-progress",
                      *[o for o in task.overrides if not o.startswith("timesteps")]]) == 0
    (out / "checkpoints" / "final.zip").unlink()
    assert (out / "checkpoints" / "step_384.zip").is_file()
    for p in (out / "eval").iterdir():
        p.unlink()
    (out / "eval").rmdir()
    (tmp_path / task.folder / "task.json").write_text(json.dumps({"id": task.id, "key": task.key, "status": "running",
                                                                  "config": task.config, "run_id": "killed"}))
    record = runner.execute(str(tmp_path), task)
    assert record["status"] == "done" and record["resumed_from"] == "step_384.zip"
    assert "--resume" in (tmp_path / task.folder / "log.txt").read_text()
    assert json.loads((out / "eval" / "summary.json").read_text())["timesteps"] == 768
    # the same folder under another config is set aside, never deleted, and the task starts from zero
    other = dataclasses.replace(task, key="0" * 16)
    record = runner.execute(str(tmp_path), other)
    assert record["status"] == "done" and record["resumed_from"] is None
    assert len(list((tmp_path / "stale").glob("train__none__s0-*/out/checkpoints/step_384.zip"))) == 1


def test_a_failed_task_is_reported_with_its_log_and_blocks_only_its_dependents(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["runs"].append({**data["runs"][0], "name": "broken", "seeds": [0],
                         "overrides": data["runs"][0]["overrides"] + ["ppo.batch_size=100000"]})  # fails in the job
    data["evaluations"][0]["runs"] = ["broken"]
    data["tables"][0]["rows"] = ["none", "broken"]
    data["tables"][0]["columns"] = [data["tables"][0]["columns"][0]]
    data["runs"][0]["seeds"] = [0]
    experiment = tmp_path / "broken.yaml"
    experiment.write_text(yaml.safe_dump(data))
    assert reproduce.entry(_args(tmp_path, experiment)) == 1
    err = capsys.readouterr().err
    log = tmp_path / "root" / "tasks" / "train__broken__s0" / "log.txt"
    assert f"train/broken/s0 failed: log {log}" in err and "exceeds the rollout size" in log.read_text()
    assert "evaluate/pgd/broken/s0 blocked" in err and "depends on train/broken/s0" in err
    text = (tmp_path / "RESULTS.md").read_text()
    assert "missing (train/broken/s0)" in text and "`train/broken/s0`: failed, log `tasks/train__broken__s0/log.txt`" in text   # in the results root


def _write(folder: Path, edit: dict) -> Path:
    data = yaml.safe_load(TINY.read_text())
    for dotted, value in edit.items():
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    path = folder / "bad.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.parametrize("edit, message", [
    ({"runs.0.overides": []}, "unknown config key 'runs[0].overides'"),
    ({"evaluations.0.overrides": ["attacks=[nosuch]"]}, "unknown attack 'nosuch'"),
    ({"tables.0.rows": ["none", "fgmf"]}, "tables[0] (tiny).rows names 'fgmf', which is not a run"),
    ({"tables.0.columns.1.eps": 4}, "eps 4 is not among the eps of evaluation 'pgd'; accepted: 2"),
    ({"runs.0.overrides": ["ppo.n_stepz=3"]}, "unknown config key 'ppo.n_stepz'"),
    ({"evaluations.0.kind": "attack"}, "'evaluations[0].kind' is 'attack'; accepted: 'evaluate' | 'explain'"),
    ({"tables.0.columns.0.source": "nosuch"}, "source='nosuch' is not an evaluation"),
    ({"tables.0.columns.1.budget": "k=one"}, "budget='k=one'; accepted: all, k=INT, p=FRACTION or k=INT,p=FRACTION"),
    ({"tables.0.columns.0.budget": "k=1"}, "budget is for evaluate sources, not 'train'"),
    ({"tables.0.columns.2.attack": "heuristic"}, "attack 'heuristic' needs a budget, e.g. budget: k=1"),
    ({"tables.0.columns.2.budget": "k=1"}, "budget k=1 is not run by evaluation 'pgd'; accepted: all"),
    ({"evaluations.0.overrides": ["attacks=[pgd:steps=2]", "eps=[2]", "budget_agents=[1]"],
      "tables.0.columns.2.budget": "k=1", "tables.0.columns.2.attack": "learned"},
     "attack 'learned' needs a director: evaluation 'pgd' names no adversary"),
])
def test_a_bad_experiment_file_is_one_line_and_exit_2_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture, edit: dict, message: str) -> None:
    assert reproduce.entry(_args(tmp_path, _write(tmp_path, edit))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("reproduce.py: error: ")
    assert not (tmp_path / "root").exists() and not (tmp_path / "RESULTS.md").exists()


@pytest.mark.parametrize("metric, message", [
    ("PGCA", "accepted for an explain source: METHOD/METRIC or trust/SIGNAL"),
    ("pgca/relevance_mass", "unknown method 'pgca'; accepted: trust, PGCA, PGCA arithmetic (old), P (segments)"),
    ("PGCA/relevance_mas", "unknown metric 'relevance_mas'; accepted: relevance_mass"),
    ("trust/agreemnt", "unknown trust signal 'agreemnt'; accepted: agreement, evidence, confidence"),
])
def test_an_explain_column_naming_no_method_metric_or_signal_fails_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture, metric: str, message: str) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["evaluations"].append({"name": "explain", "kind": "explain", "runs": ["none"], "overrides": ["episodes=2"]})
    data["tables"][0]["columns"].append({"label": "explained", "source": "explain", "metric": metric})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert reproduce.entry(_args(tmp_path, path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "root").exists()
    for good in ("PGCA/relevance_mass", "Integrated Gradients/deletion_auc", "trust/evidence"):
        data["tables"][0]["columns"][-1]["metric"] = good
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        schema.load_experiment(path)   # accepted


def test_budget_columns_read_the_strongest_heuristic_the_director_and_the_worst_within_a_budget() -> None:
    def row(attack: str, budget: str, selector: str | None, value: float) -> dict:
        return {"attack": attack, "eps255": 4.0, "budget": budget, "selector": selector, "normalised_mean": value,
                "episodes": 16}
    data = {"rows": [row("pgd[steps=10]", "all", None, -0.1), row("pgd[steps=10]@random[k=1]", "k=1", "random", 0.6),
                     row("pgd[steps=10]@timed[k=1]", "k=1", "timed", 0.5), row("pgd[steps=10]@value[p=0.25]", "p=0.25",
                                                                             "value", 0.4),
                     row("adversary@learned[k=1]", "k=1", "learned", 0.55)],
            "worst": [{"eps255": 4.0, "budget": "k=1", "metric": "normalised", "normalised_mean": 0.5, "episodes": 16,
                       "per_seed": [{"attack": "pgd[steps=10]@timed[k=1]"}]},
                      {"eps255": 4.0, "budget": "all", "metric": "normalised", "normalised_mean": -0.1, "episodes": 16,
                       "per_seed": [{"attack": "pgd[steps=10]"}]}]}
    col = functools.partial(schema.ColumnSpec, label="c", source="s", metric="normalised", eps=4.0)
    assert tables._value(data, col(attack="heuristic", budget="k=1"), "evaluate")[:3] == (0.5, 16, "pgd[steps=10]@timed[k=1]")
    assert tables._value(data, col(attack="learned", budget="k=1"), "evaluate")[:3] == (0.55, 16, "adversary@learned[k=1]")
    assert tables._value(data, col(attack="worst", budget="k=1"), "evaluate")[0] == 0.5
    assert tables._value(data, col(attack="worst"), "evaluate")[0] == -0.1
    assert tables._value(data, col(attack="pgd[steps=10]"), "evaluate")[0] == -0.1  # the unbudgeted row
    with pytest.raises(reproduce.ConfigError, match="no learned attacker within budget p=0.25"):
        tables._value(data, col(attack="learned", budget="p=0.25"), "evaluate")


def test_episode_counts_name_each_explain_study_once_beside_the_return_columns() -> None:
    spec = functools.partial(schema.ColumnSpec, source="explain")
    table = schema.TableSpec(name="t", rows=["ppo"], columns=[
        schema.ColumnSpec(label="clean", source="train", metric="normalised_mean"),
        spec(label="PGCA", metric="PGCA/relevance_mass"), spec(label="shielded", metric="PGCA/shielded_relevance_mass")])
    cells = {("ppo", "clean"): tables.Cell([0.8], 768, [0]), ("ppo", "PGCA"): tables.Cell([0.9], 48, [0]),
             ("ppo", "shielded"): tables.Cell([math.nan], 0, [0])}
    counts = tables._episode_counts(table, cells, "ppo", {"explain": "explain"})
    assert counts == ["clean 768", "explain 48"]


def test_a_masked_gradient_column_reads_n_a_for_a_policy_without_a_gate() -> None:
    gated = {"settings": {"episodes": 16}, "table": [{"method": "PGCA", "relevance_mass": {"mean": 0.9},
                                                     "shielded_relevance_mass": {"mean": 0.8}}]}
    plain = {"settings": {"episodes": 16}, "table": [{"method": "PGCA", "relevance_mass": {"mean": 0.9}}]}
    col = schema.ColumnSpec(label="PGCA", source="explain", metric="PGCA/shielded_relevance_mass")
    assert tables._value(gated, col, "explain") == (0.8, 16, "", None)
    value = tables._value(plain, col, "explain")[0]
    assert tables.format_cell(tables.Cell([value, value], 0, [0, 1]), col) == "n/a (no gate)"
    with pytest.raises(reproduce.ConfigError, match="has no 'PGCA/deletion_auc'"):   # other rows stay required
        tables._value(plain, dataclasses.replace(col, metric="PGCA/deletion_auc"), "explain")
    trusted = {**plain, "trust": {"evidence": {"spearman": 0.25}}}
    assert tables._value(trusted, dataclasses.replace(col, metric="trust/evidence"), "explain") == (0.25, 16, "", None)
    with pytest.raises(reproduce.ConfigError, match="no trust signal 'margin'"):
        tables._value(trusted, dataclasses.replace(col, metric="trust/margin"), "explain")


def test_only_runs_the_matching_tasks_and_what_they_depend_on() -> None:
    tasks = plan.expand(schema.load_experiment(ROOT / "experiments" / "budget_adversary.yaml"), reproduce.JOBS, quick=False)
    chosen = {t.id for t in plan.select(tasks, "evaluate/budget_k1/ppo/*")}
    assert chosen == {f"{kind}/s{s}" for s in (0, 1, 2) for kind in ("train/ppo", "adversary/director_k1/ppo",
                                                                       "evaluate/budget_k1/ppo")}
    assert plan.select(tasks, None) == tasks
    with pytest.raises(reproduce.ConfigError, match="--only 'train/nothing' matches no task"):
        plan.select(tasks, "train/nothing")


def test_quick_needs_toy_budgets_and_is_written_apart() -> None:
    exp = schema.load_experiment(ROOT / "experiments" / "default_job.yaml")
    full, quick = plan.expand(exp, reproduce.JOBS, quick=False), plan.expand(exp, reproduce.JOBS, quick=True)
    assert [t.config["timesteps"] for t in full] == [1_000_000] * 5 and all(t.config["timesteps"] < 50_000 for t in quick)
    assert {t.key for t in full}.isdisjoint(t.key for t in quick)
    with pytest.raises(reproduce.ConfigError, match="--quick needs the experiment's 'quick' overrides"):
        plan.expand(dataclasses.replace(exp, quick=[]), reproduce.JOBS, quick=True)


@pytest.mark.parametrize("name, victim", [("budget_adversary", "none"), ("budget_defended", "fgmf")])
def test_the_budget_experiments_train_a_director_per_victim_and_budget(name: str, victim: str) -> None:
    exp = schema.load_experiment(ROOT / "experiments" / f"{name}.yaml")
    tasks = plan.expand(exp, reproduce.JOBS, quick=False)
    plan.check_tables(exp, tasks)
    assert {t.config["defense"]["kind"] for t in tasks if t.kind == "train"} == {victim}
    directors = [t for t in tasks if t.kind == "adversary"]
    assert len(directors) == (9 if name == "budget_adversary" else 6) and all(t.config["eps"] == 4.0 and t.config["timesteps"] == 40_000 for t in directors)
    assert {(t.config["budget_agents"], t.config["budget_steps"], t.config.get("decision", "per_victim"))
            for t in directors} == {(1, None, "per_victim"), (None, 0.25, "per_victim")} | (
                {(1, None, "joint")} if name == "budget_adversary" else set())
    for t in (t for t in tasks if t.kind == "evaluate"):
        director = f"adversary/director_{t.source.removeprefix('budget_')}/{t.run}/s{t.seed}"
        assert t.config["attacks"] == ["budgeted"] and t.deps == (f"train/{t.run}/s{t.seed}", director)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_file_loads_expands_and_its_tables_name_real_tasks(path: Path) -> None:
    exp = schema.load_experiment(path)
    for quick in (False, True) if exp.quick else (False,):   # tiny.yaml is toy already: it has no quick form
        tasks = plan.expand(exp, reproduce.JOBS, quick=quick)
        plan.check_tables(exp, tasks)
        assert tasks and len({t.id for t in tasks}) == len(tasks)


def test_the_readme_experiments_are_valid_and_expand_as_described() -> None:
    defense = schema.load_experiment(ROOT / "experiments" / "defense_table.yaml")
    tasks = plan.expand(defense, reproduce.JOBS, quick=False)
    plan.check_tables(defense, tasks)
    trains = [t for t in tasks if t.kind == "train"]
    assert sorted((t.config["defense"]["kind"], t.seed) for t in trains) == sorted(
        (d, s) for d in ("none", "sappo", "fgmf") for s in (0, 1, 2))
    evals = [t for t in tasks if t.kind == "evaluate"]
    assert len(evals) == 9 and all(t.config["attacks"] == ["strong"] and t.config["eps"] == [4.0, 8.0]
                                   and t.config["audit"] for t in evals)
    assert all(t.deps == (f"train/{t.run}/s{t.seed}", f"train/ppo/s{(t.seed + 1) % 3}") for t in evals)
    # the vanilla rows are robust_team's own tasks (same ids and keys): one results root shares them
    robust = {t.id: t.key for t in plan.expand(schema.load_experiment(ROOT / "experiments" / "robust_team.yaml"), reproduce.JOBS,
                                                    quick=False)}
    vanilla = [t for t in tasks if t.run == "ppo"]
    assert len(vanilla) == 6 and all(robust[t.id] == t.key for t in vanilla)


def test_comparisons_say_beats_only_where_the_interval_of_the_difference_excludes_zero() -> None:
    table = schema.TableSpec(name="t", rows=["a", "b"], compare=["a"], against=["b"],
                                columns=[schema.ColumnSpec(label="clean", metric="normalised_mean")])
    # outputs without recorded episodes: means over seeds, never a verdict
    legacy = {("a", "clean"): tables.Cell([0.70, 0.72, 0.74], 768, [0, 1, 2]),
              ("b", "clean"): tables.Cell([0.50, 0.52, 0.54], 768, [0, 1, 2])}
    (line,) = tables.comparisons(table, legacy)
    assert "beats" not in line and "no verdict" in line

    rng = np.random.default_rng(0)

    def cell(centre: float) -> tables.Cell:
        strata = [rng.normal(centre, 0.1, 48) for _ in range(5)]
        return tables.Cell([float(s.mean()) for s in strata], 240, list(range(5)), strata=strata)

    apart = {("a", "clean"): cell(0.7), ("b", "clean"): cell(0.5)}
    (line,) = tables.comparisons(table, apart)
    assert "a beats b: IQM 0.69" in line and "vs 0.49" in line and "P(a > b) = 0.9" in line
    (line,) = tables.comparisons(dataclasses.replace(table, compare=["b"], against=["a"]), apart)
    assert "b **is beaten by** a" in line
    # several candidates: each is compared with each baseline, in the order given
    three = {**apart, ("c", "clean"): cell(0.5)}
    first, second = tables.comparisons(dataclasses.replace(table, rows=["a", "b", "c"], compare=["a", "b"],
                                                           against=["c"]), three)
    assert first.startswith("- clean: a beats c") and second.startswith("- clean: b ") and "P(b > c)" in second
    close = {("a", "clean"): cell(0.5), ("b", "clean"): cell(0.5)}
    (line,) = tables.comparisons(table, close)
    assert "**does not beat** (the interval of the difference includes 0)" in line
    gap = stats.difference(close["a", "clean"].strata, close["b", "clean"].strata)
    assert gap.low < 0 < gap.high and f"[{gap.low:.3f}".replace("-", "−") in line


def test_an_experiments_own_overrides_apply_to_every_run_and_a_runs_own_win() -> None:
    # fgmf_retune was measured before fgmf_dense's configuration became SCOR-PIO's default: it pins the
    # earlier defaults for every run, and its fgmf run's own pgd_steps=3 wins over the pinned 0
    exp = schema.load_experiment(ROOT / "experiments" / "fgmf_retune.yaml")
    trains = {t.run: t.config for t in plan.expand(exp, reproduce.JOBS, quick=False) if t.kind == "train"}
    pinned = dict(eps=4.0, subsample=0.125, every=8, lambda1=1.0, lambda2=1.0, curvature="gradient")
    for config in trains.values():
        assert {k: config["defense"]["scorpio"][k] for k in pinned} == pinned
    assert {run: c["defense"]["scorpio"]["pgd_steps"] for run, c in trains.items()} == {
        run: 3 if c["defense"]["kind"] == "fgmf" else 0 for run, c in trains.items()}
    # without the pin the same file would train today's defaults
    bare = plan.expand(dataclasses.replace(exp, overrides=[]), reproduce.JOBS, quick=False)
    assert all(t.config["defense"]["scorpio"]["eps"] == 8.0 for t in bare if t.kind == "train")


@dataclasses.dataclass
class _Knobs:
    size: int = 3
    method: str = cfglib.added_field("new", legacy="old")   # added after the record below; default not the old behaviour


@dataclasses.dataclass
class _Job:
    seed: int = 0
    knobs: _Knobs = dataclasses.field(default_factory=_Knobs)


def test_a_record_from_before_a_field_existed_keys_as_its_legacy_value_not_todays_default() -> None:
    job = plan.JobInfo("m", "scripts/m.py", "out.json", _Job)
    record = {"seed": 1, "knobs": {"size": 3}}                  # written whole, before `method` existed
    key = plan.task_key(job, "train", record, ())
    assert key == plan.task_key(job, "train", {"seed": 1, "knobs": {"size": 3, "method": "old"}}, ())
    assert key != plan.task_key(job, "train", cfglib.to_dict(_Job(seed=1)), ())


def test_a_moved_default_reruns_what_reads_it_and_nothing_else(clean_run: Path) -> None:
    # a record written when SCOR-PIO's eps default was 4: a vanilla run never reads it, so it stays cached;
    # an fgmf run at the default reads it and reruns; an fgmf run that spelled eps out stays cached
    root = clean_run / "root"
    tasks = plan.expand(schema.load_experiment(TINY), reproduce.JOBS, quick=False)
    vanilla = next(t for t in tasks if t.id == "train/none/s0")
    record = cache.read_record(root, vanilla.id)
    older = copy.deepcopy(record["config"])
    older["defense"]["scorpio"]["eps"] = 4.0
    stored = {**record, "config": older, "key": "written-by-older-code"}
    assert cache.is_cached(root, vanilla, stored, {})
    fgmf = dataclasses.replace(vanilla, config={**vanilla.config, "defense": {**vanilla.config["defense"], "kind": "fgmf"}})
    fgmf = dataclasses.replace(fgmf, key=plan.task_key(reproduce.JOBS["train"], "train", fgmf.config, ()))
    at_default = {**stored, "config": {**older, "defense": {**older["defense"], "kind": "fgmf"}}}
    assert not cache.is_cached(root, fgmf, at_default, {})
    spelled = copy.deepcopy(fgmf.config)
    spelled["defense"]["scorpio"]["eps"] = 4.0
    spelled_task = dataclasses.replace(fgmf, config=spelled, key=plan.task_key(reproduce.JOBS["train"], "train", spelled, ()))
    assert cache.is_cached(root, spelled_task, at_default, {})
    assert reproduce.without_unused_defenses(vanilla.config)["defense"] == {
        k: v for k, v in vanilla.config["defense"].items() if k not in ("scorpio", "sgam", "sappo", "smooth")}


def test_a_results_root_holds_toy_runs_or_measured_ones_never_both(tmp_path: Path) -> None:
    measured = tmp_path / "measured"
    (measured / "tasks" / "train__ppo__s0").mkdir(parents=True)
    (measured / "tasks" / "train__ppo__s0" / "task.json").write_text("{}")
    with pytest.raises(reproduce.ConfigError, match="holds measured runs; --quick writes toy runs only"):
        cache.check_root_kind(measured, quick=True)
    cache.check_root_kind(measured, quick=False)                        # a measured run may continue there
    toy = tmp_path / "toy"
    cache.check_root_kind(toy, quick=True)                              # an empty folder becomes a quick root
    assert (toy / cache.QUICK_MARKER).is_file()
    with pytest.raises(reproduce.ConfigError, match="holds --quick \\(toy\\) runs"):
        cache.check_root_kind(toy, quick=False)
    legacy = tmp_path / "default_job-quick"                                 # the default layout, written before the marker
    (legacy / "tasks" / "train__ppo__s0").mkdir(parents=True)
    (legacy / "tasks" / "train__ppo__s0" / "task.json").write_text("{}")
    cache.check_root_kind(legacy, quick=True)
    out = tmp_path / "cli"
    code = reproduce.entry([str(ROOT / "experiments" / "default_job.yaml"), "--quick", "--results-root", str(measured),
                            "--results", str(out / "R.md"), "--figures", str(out / "f"), "--no-progress"])
    assert code == 2 and not (out / "R.md").exists()


def test_an_interrupted_evaluation_task_resumes_from_its_finished_cells(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a kill after an evaluation's first cell leaves (config.yaml and cells/) is continued with --resume, and
    the record says from what; a finished evaluation's folder is never resumed."""
    from fgmf_marl import config as cfglib
    from fgmf_marl.teams import grid
    from fgmf_marl.teams.eval_config import EvalConfig
    tasks = plan.expand(schema.load_experiment(TINY), reproduce.JOBS, quick=False)
    train = next(t for t in tasks if t.id == "train/none/s0")
    evaluation = next(t for t in tasks if t.id == "evaluate/pgd/none/s0")
    assert runner.execute(str(tmp_path), train)["status"] == "done"
    monkeypatch.chdir(tmp_path)
    with grid_stopped_at_cell(2), pytest.raises(KeyboardInterrupt):
        grid.evaluate(cfglib.from_dict(EvalConfig, evaluation.config), evaluation.out, progress=False, echo=lambda _: None)
    assert len(list((tmp_path / evaluation.out / "cells").glob("*.json"))) == 1
    (tmp_path / evaluation.folder / "task.json").write_text(json.dumps(
        {"id": evaluation.id, "key": evaluation.key, "status": "running", "config": evaluation.config, "run_id": "killed"}))
    record = runner.execute(str(tmp_path), evaluation)
    assert record["status"] == "done" and record["resumed_from"] == "1 finished cells"
    assert "--resume" in (tmp_path / evaluation.folder / "log.txt").read_text()
    assert json.loads((tmp_path / evaluation.out / "results.json").read_text())["resumed_cells"] == 1
    record = runner.execute(str(tmp_path), evaluation, rerun=True)
    assert record["status"] == "done" and record["resumed_from"] is None
