"""reproduce.py refuses, in one line and before any task runs, what would misattribute results or lose work:
an evaluation override naming another model or an outside path, another experiment's task in a shared root,
a bad --results file, an unreachable Ray address; damaged records are errors, not tracebacks; SIGTERM is 143, and
SIGUSR1 stops the jobs where a rerun loses nothing."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fgmf_marl.config import ConfigError
from fgmf_marl import stats
from fgmf_marl.experiments import cache, plan, schema, tables
from fgmf_marl.jobs import reproduce
from fgmf_marl.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "tiny.yaml"


def _args(folder: Path, experiment: Path = TINY) -> list[str]:
    return [str(experiment), "--results-root", str(folder / "root"), "--results", str(folder / "RESULTS.md"),
            "--figures", str(folder / "figures"), "--max-parallel", "1", "--no-progress"]


def _tiny_with(tmp_path: Path, **evaluation: object) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["evaluations"][0].update(evaluation)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.parametrize("override", ["checkpoints=['/elsewhere/final.zip']", "out=/tmp/outside",
                                      "log_explanations=logs", "surrogate=/elsewhere/run"])
def test_an_evaluation_override_of_a_placed_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           override: str) -> None:
    exp = _tiny_with(tmp_path, overrides=["attacks=[pgd:steps=2]", "eps=[2]", "episodes=2", override])
    assert reproduce.entry(_args(tmp_path, exp)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"override {override.partition('=')[0]!r} is set by the experiment" in err[0]
    assert not (tmp_path / "root" / "tasks").exists()


def test_another_experiments_task_of_another_config_is_not_set_aside(tmp_path: Path) -> None:
    exp = schema.load_experiment(TINY)
    task = plan.expand(exp, reproduce.JOBS, quick=False)[0]
    folder = tmp_path / "root" / task.folder
    folder.mkdir(parents=True)
    theirs = {"id": task.id, "kind": "train", "key": "0" * 16, "experiment": "other", "status": "done", "run_id": "x",
              "config": {**task.config, "timesteps": 999_424}}
    (folder / "task.json").write_text(json.dumps(theirs))
    with pytest.raises(ConfigError, match="belongs to experiment 'other'"):
        cache.check_foreign_tasks(tmp_path / "root", [task], "tiny")
    cache.check_foreign_tasks(tmp_path / "root", [task], "other")          # its own experiment may rerun it
    same = {**theirs, "config": task.config, "key": task.key}
    (folder / "task.json").write_text(json.dumps(same))
    cache.check_foreign_tasks(tmp_path / "root", [task], "tiny")           # same config: shared on purpose


@pytest.mark.parametrize("kind", ["directory", "binary", "device"])
def test_a_bad_results_file_is_refused_before_any_task(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       kind: str) -> None:
    target = {"directory": tmp_path, "binary": tmp_path / "r.md", "device": Path("/dev/null")}[kind]
    if kind == "binary":
        target.write_bytes(b"\xff\xfe\x00results")
    args = _args(tmp_path)
    args[args.index("--results") + 1] = str(target)
    assert reproduce.entry(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--results" in err[0]
    assert not (tmp_path / "root" / "tasks").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:notaport", "LOCAL"])
def test_a_malformed_or_unreachable_ray_address_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              address: str) -> None:
    address = f"127.0.0.1:{_closed_port()}" if address == "LOCAL" else address
    start = time.monotonic()
    assert reproduce.entry(_args(tmp_path) + ["--address", address]) == 2
    assert time.monotonic() - start < 30          # a guard against the minutes-long hang, not a speed check
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--address" in err[0]


def test_damaged_records_and_outputs_are_one_line_errors(tmp_path: Path) -> None:
    task = plan.expand(schema.load_experiment(TINY), reproduce.JOBS, quick=False)[0]
    folder = tmp_path / task.folder
    (folder / "out" / "eval").mkdir(parents=True)
    (folder / "task.json").write_text("[1, 2, 3]")
    assert cache.read_record(tmp_path, task.id) is None
    (folder / "out" / "eval" / "summary.json").write_text('{"normalised_mean": 0.')   # truncated
    with pytest.raises(ConfigError, match="cannot be read as JSON.*--rerun 'train/none/s0'"):
        tables._read_output(tmp_path, task)
    (folder / "out" / "eval" / "summary.json").write_text("[0.5]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        tables._read_output(tmp_path, task)


def test_sigterm_stops_the_driver_with_143_and_leaves_no_job_running(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *_args(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300   # a guard against a hang, not a speed check
    record = tmp_path / "root" / "tasks" / "train__none__s0" / "task.json"
    while not (record.is_file() and json.loads(record.read_text() or "{}").get("status") == "running"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received" not in err and "terminated" in err
    time.sleep(2)
    jobs = subprocess.run(["pgrep", "-f", "--", f"--run-dir {tmp_path}|train__none__s0/config.yaml"], capture_output=True,
                          text=True)
    running = [line for line in jobs.stdout.split() if line]
    assert not running, f"a job outlived its driver: {running}"


def test_sigusr1_stops_the_driver_once_its_jobs_stopped_at_a_checkpoint(tmp_path: Path) -> None:
    """A stop request to the driver reaches its jobs: the training in flight saves a checkpoint at its next rollout
    boundary (none is due for 100,000 steps) and exits 143, nothing else starts, the driver exits 143."""
    data = yaml.safe_load(TINY.read_text())
    run = data["runs"][0]
    run["seeds"] = [0]
    run["overrides"] = [o for o in run["overrides"] if not o.startswith(("timesteps", "checkpoint_every"))] + [
        "timesteps=100000", "checkpoint_every=100000"]
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(data, allow_unicode=True))
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *_args(tmp_path, exp)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300   # a guard against a hang, not a speed check
    task = tmp_path / "root" / "tasks" / "train__none__s0"
    while not ((task / "out" / "config.yaml").is_file() and "job_pid" in json.loads(
            (task / "task.json").read_text() or "{}")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    time.sleep(0.5)                                        # into learning
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stop requested" in out and "task train/none/s0 stopped on request" in out, out[-2000:]
    record = json.loads((task / "task.json").read_text())
    assert record["status"] == "failed" and record["returncode"] == 143
    checkpoint = RunDir(task / "out").latest_checkpoint()
    assert checkpoint is not None and 0 < int(checkpoint.stem[len("step_"):]) < 100000
    assert "stopped on request at step" in (task / "log.txt").read_text()
    assert not (tmp_path / "root" / "tasks" / "evaluate__pgd__none__s0" / "out").exists()   # nothing else started


def test_every_experiment_file_expands_to_the_recorded_tasks_and_cache_keys() -> None:
    """The cache keys of every experiment file (measured and --quick), recorded in tests/data/experiment_keys.json:
    a refactor of the experiment machinery or of the files' spelling must not change one (no cached result is
    recomputed). A deliberate change of a job's defaults or of an experiment updates the record in the same
    commit, and says why."""
    recorded = json.loads((ROOT / "tests" / "data" / "experiment_keys.json").read_text())
    today: dict[str, dict[str, str]] = {}
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        exp = schema.load_experiment(path)
        for quick in (False, True) if exp.quick else (False,):
            today[path.stem + ("-quick" if quick else "")] = {t.id: t.key for t in plan.expand(exp, reproduce.JOBS, quick=quick)}
    assert today == recorded


def test_a_knob_a_runs_kind_ignores_is_refused_when_the_plan_is_made(tmp_path: Path) -> None:
    """A train override that a run's adversary kind ignores fails the whole experiment before any task starts,
    naming the run, in its measured and its --quick form (as ``train_marl.py`` refuses it for a new run)."""
    data = yaml.safe_load(TINY.read_text())
    for quick in (False, True):
        data["quick"], data["runs"][0]["quick"] = ["timesteps=512"], []
        (data["runs"][0]["quick"] if quick else data["runs"][0]["overrides"]).append("adversary.director_steps=64")
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        with pytest.raises(ConfigError, match=r"runs\[0\] \(none\): adversary.director_steps=64 has no effect with "
                                              r"adversary.kind=none"):
            plan.expand(schema.load_experiment(path), reproduce.JOBS, quick=quick)
        data["runs"][0]["overrides"] = [o for o in data["runs"][0]["overrides"] if "director" not in o]
    data["runs"][0]["overrides"] += ["adversary.kind=director", "adversary.director_steps=64"]
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert len(plan.expand(schema.load_experiment(path), reproduce.JOBS, quick=False)) == 4   # where it applies


def test_named_configurations_expand_in_place_and_bad_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.yaml").write_text("- timesteps=1024\n- checkpoint_every=512\n")
    (tmp_path / "configs" / "broken.yaml").write_text("timesteps: 1024\n")
    data = yaml.safe_load(TINY.read_text())
    data["runs"][0]["configs"] = ["small"]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    exp = schema.load_experiment(path)
    assert exp.runs[0].configs == [] and exp.runs[0].overrides[:2] == ["timesteps=1024", "checkpoint_every=512"]
    (train,) = [t for t in plan.expand(exp, reproduce.JOBS, quick=False) if t.id == "train/none/s0"]
    assert train.config["timesteps"] == 768        # the run's own override comes after the configuration
    for name, message in (("missing", "unknown configuration 'missing'; known .*: broken, small"),
                          ("../configs/small", "unknown configuration"),
                          ("broken", "a named configuration is a YAML list of KEY=VALUE strings")):
        data["runs"][0]["configs"] = [name]
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        with pytest.raises(ConfigError, match=message):
            schema.load_experiment(path)


def test_certify_evaluations_place_their_outputs_and_table_their_certificates(tmp_path: Path) -> None:
    exp = schema.load_experiment(ROOT / "experiments" / "certified.yaml")
    tasks = plan.expand(exp, reproduce.JOBS, quick=True)
    task = next(t for t in tasks if t.kind == "certify")
    assert task.config["checkpoint"] == "tasks/train__ppo__s0/out" and task.config["out"] == task.out
    assert task.argv(1) == ["--config", f"{task.folder}/config.yaml", "--threads", "1", "--no-progress"]
    data = {"settings": {"episodes": 16}, "certified_rate": {"0.25": 0.75}, "return_bound": {"0.5": 0.3},
            "smoothed_return_mean": 0.6, "smoothed_returns": [0.5, 0.7]}
    assert tables._value(data, schema.ColumnSpec(metric="certified_rate/0.25"), "certify") == (0.75, 16, "", None)
    value, _, _, per_episode = tables._value(data, schema.ColumnSpec(metric="smoothed_return_mean"), "certify")
    assert value == 0.6 and per_episode.tolist() == [0.5, 0.7]   # the smoothed team's episodes: an IQM with its CI
    cell = tables.Cell([0.6], 2, [0], strata=[per_episode])
    est = stats.estimate([per_episode], stats.iqm)
    assert tables.format_cell(cell, schema.ColumnSpec(metric="smoothed_return_mean")) == (
        f"{est.value:.3f} [{est.low:.3f}, {est.high:.3f}]")
    with pytest.raises(ConfigError, match="certify.json has no 'return_bound/9'"):
        tables._value(data, schema.ColumnSpec(metric="return_bound/9"), "certify")
    bad = yaml.safe_load((ROOT / "experiments" / "certified.yaml").read_text())
    bad["tables"][0]["columns"][0]["metric"] = "certified_rates"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad, allow_unicode=True))
    (tmp_path / "configs").mkdir()
    for config in (ROOT / "experiments" / "configs").glob("*.yaml"):
        (tmp_path / "configs" / config.name).write_text(config.read_text())
    with pytest.raises(ConfigError, match="accepted for a certify source"):
        schema.load_experiment(path)


def test_profile_columns_read_the_robustness_profile() -> None:
    data = {"rows": [], "worst": [], "profile": [
        {"eps255": 4.0, "threat_model": "L2", "episode_worst_mean": 0.25, "episodes": 3, "weakest": ["pgd_l2"],
         "episode_worst_values": [0.0, 0.25, 0.5]}]}
    col = schema.ColumnSpec(source="all", attack="profile:L2", eps=4, metric="normalised")
    value, episodes, note, per_episode = tables._value(data, col, "evaluate")
    assert (value, episodes, note) == (0.25, 3, "pgd_l2") and per_episode.tolist() == [0.0, 0.25, 0.5]
    with pytest.raises(ConfigError, match="no robustness-profile row for faults"):
        tables._value(data, schema.ColumnSpec(source="all", attack="profile:faults", eps=4, metric="normalised"),
                      "evaluate")


def test_a_worst_case_column_joins_another_evaluations_attackers_episode_by_episode(tmp_path: Path) -> None:
    strong = {"rows": [], "worst": [{"eps255": 8.0, "budget": "all", "metric": "normalised", "episodes": 3,
                                     "episode_worst_mean": 0.5, "episode_worst_values": [0.5, 0.2, 0.8],
                                     "episode_worst_attacks": {"pgd": 3}}]}
    learned = {"rows": [
        {"attack": "none", "eps255": 0, "budget": "all", "normalised_episodes": [0.0, 0.0, 0.0]},       # clean: not an attacker
        {"attack": "adversary[d]", "eps255": 4.0, "budget": "all", "normalised_episodes": [0.0, 0.0, 0.0]},   # another eps
        {"attack": "adversary[d]", "eps255": 8.0, "budget": "all", "normalised_episodes": [0.4, 0.3, 0.9]}]}
    col = schema.ColumnSpec(source="strong", attack="worst_episode", eps=8, metric="normalised", also=["learned"])
    value, note, worst = tables.joined_worst(strong, [learned], col)
    assert worst.tolist() == [0.4, 0.2, 0.8] and value == pytest.approx(1.4 / 3)
    assert note == "pgd 3; adversary[d] 1"   # the director made one episode strictly worse
    learned["rows"][2]["normalised_episodes"] = [0.4, 0.3]
    with pytest.raises(ConfigError, match="the joined evaluations must run the same episodes"):
        tables.joined_worst(strong, [learned], col)
    # the experiment file: `also` only on a per-episode worst case, naming evaluations that pair episodes with it
    data = yaml.safe_load((ROOT / "experiments" / "learned_worst.yaml").read_text())
    (tmp_path / "configs").mkdir()
    for config in (ROOT / "experiments" / "configs").glob("*.yaml"):
        (tmp_path / "configs" / config.name).write_text(config.read_text())

    def load(mutate) -> None:
        bad = copy.deepcopy(data)
        mutate(bad)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad, allow_unicode=True))
        exp = schema.load_experiment(path)
        plan.check_tables(exp, plan.expand(exp, reproduce.JOBS, quick=False))

    load(lambda d: None)
    with pytest.raises(ConfigError, match="also joins other evaluations' attackers .* attack: worst_episode"):
        load(lambda d: d["tables"][0]["columns"][2].update(attack="worst"))
    with pytest.raises(ConfigError, match="also names 'director4', which is not an evaluate source"):
        load(lambda d: d["tables"][0]["columns"][2].update(also=["director4"]))
    with pytest.raises(ConfigError, match="eps 4 is not among the eps of evaluation 'learned8' \\(also\\)"):
        load(lambda d: d["tables"][0]["columns"][2].update(also=["learned8"]))
    with pytest.raises(ConfigError, match="runs other episodes than 'strong', so their episodes do not pair"):
        load(lambda d: d["evaluations"][3]["overrides"].__setitem__(3, "episodes=16"))
