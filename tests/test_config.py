"""The config type: strict keys and types, overrides, YAML round trip, run directory staging."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fgmf_marl import config as cfglib
from fgmf_marl.config import ConfigError
from fgmf_marl.runs import RunDir, resolve_checkpoint, staged_run_dir


@dataclass
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    method: Literal["a", "b"] = "a"
    limit: int | None = None

    def validate(self) -> None:
        if self.rate < 0:
            raise ConfigError(f"inner.rate must be >= 0, got {self.rate}")


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    steps: int = 3
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_overrides() -> None:
    cfg = cfglib.load(Outer, overrides=["inner.rate=2", "inner.sizes=[4, 5]", "flag=true", "inner.limit=null"])
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.sizes == (4, 5) and cfg.flag is True and cfg.inner.limit is None
    assert cfglib.load(Outer, overrides=["inner.rate=1e-3"]).inner.rate == 1e-3  # YAML 1.1 reads this as a string


@pytest.mark.parametrize("override, fragment", [
    ("inner.rat=1", "unknown config key 'inner.rat'"),
    ("steps=1.5", "'steps' must be an integer"),
    ("inner.rate=fast", "'inner.rate' must be a number"),
    ("steps=true", "'steps' must be an integer"),
    ("flag=3", "'flag' must be true or false"),
    ("inner.method=c", "accepted: 'a' | 'b'"),
    ("inner.rate=-1", "inner.rate must be >= 0"),
    ("inner=3", "must be a mapping"),
    ("novalue", "not of the form"),
])
def test_bad_values_give_one_line_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.load(Outer, overrides=[override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_yaml_round_trip_and_file_errors(tmp_path: Path) -> None:
    cfg = cfglib.load(Outer, overrides=["inner.sizes=[7]", "name=run"])
    path = tmp_path / "c.yaml"
    cfglib.save_yaml(cfg, path)
    assert cfglib.load(Outer, path) == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        cfglib.load(Outer, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfglib.load(Outer, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        cfglib.load(Outer, tmp_path / "list.yaml")


def test_staged_run_dir_removed_on_early_failure_kept_after_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with staged_run_dir(root) as run:
            run.config.write_text("x")
            raise RuntimeError("boom")
    assert not root.exists()
    with pytest.raises(KeyboardInterrupt):
        with staged_run_dir(root) as run:
            run.checkpoints.mkdir()
            run.checkpoint_at(100).write_bytes(b"zip")
            raise KeyboardInterrupt
    assert RunDir(root).latest_checkpoint() == RunDir(root).checkpoint_at(100)
    with pytest.raises(ConfigError, match="already exists"):
        with staged_run_dir(root):
            pass


def test_latest_checkpoint_prefers_final_then_most_steps(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    for steps in (900, 10000, 2000):
        run.checkpoint_at(steps).write_bytes(b"")
    assert run.latest_checkpoint() == run.checkpoint_at(10000)
    run.final_checkpoint.write_bytes(b"")
    assert resolve_checkpoint(tmp_path)[0] == run.final_checkpoint
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("value", ["nan", ".inf", "-inf", "1e400", "1.0e400", str(2**1100)])
def test_floats_must_be_finite(value: str) -> None:
    with pytest.raises(ConfigError, match=r"config key 'inner.rate' must be a finite number") as info:
        cfglib.load(Outer, overrides=[f"inner.rate={value}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["nan", ".inf", "1e400"])
def test_integers_are_never_non_finite(value: str) -> None:
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        cfglib.load(Outer, overrides=[f"steps={value}"])


def test_non_utf8_yaml_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml' is not UTF-8 text") as info:
        cfglib.load(Outer, path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (("k", -1.0, 0), "k=-1.0 must be >= 0"), (("k", 0.0, 0, None), "k=0.0 must be > 0"),
    (("k", float("nan"), 0, 1), "k=nan must be in [0, 1]"), (("k", 5, 1, 4), "k=5 must be an integer in 1..4"),
    (("k", 2.0, None, 1), "k=2.0 must be <= 1"),
])
def test_check_range_names_the_key_and_the_accepted_range(args: tuple, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.check_range(*args, low_open=args[1] == 0.0)
    assert str(info.value) == message
    cfglib.check_range("k", 1, 1, 4)


def test_check_device_refuses_a_cuda_device_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfglib.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available here; accepted: cpu, auto"):
        cfglib.check_device("cuda")
    cfglib.check_device("auto")
    monkeypatch.setattr(cfglib.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cfglib.torch.cuda, "device_count", lambda: 2)
    cfglib.check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"CUDA devices 0..1; accepted: cpu, auto, cuda, cuda:0..1"):
        cfglib.check_device("cuda:2")


def test_output_folder_that_is_or_lies_under_a_file_or_is_unwritable_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for path, fragment in [(afile, "is an existing file"), (afile / "run", "lies under the file"),
                           (Path("/proc/fgmf-no-such/run"), "is not writable")]:
        with pytest.raises(ConfigError, match=fragment):
            with staged_run_dir(path):
                pytest.fail("the body must not run")
    assert afile.read_text() == "x" and sorted(tmp_path.iterdir()) == [afile]


def test_a_run_killed_before_its_first_checkpoint_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run = RunDir(root)
    (run.tensorboard / "ppo_1").mkdir(parents=True)
    run.config.write_text("old")
    (root / ".config.yaml.k3j9x.tmp").write_text("half")  # an atomic write kill -9 interrupted
    with pytest.raises(ConfigError, match="holds no checkpoint or finished cell .*rerun without --resume"):
        with staged_run_dir(root, resume=True):
            pass
    with staged_run_dir(root) as taken:
        assert not any(taken.root.iterdir())   # the leftovers are gone before the new run writes
        taken.config.write_text("new")
    assert run.config.read_text() == "new"
    (root / "notes.txt").write_text("mine")      # anything a run does not write: refused, kept
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        with staged_run_dir(root):
            pass
    assert (root / "notes.txt").exists() and run.config.exists()


@dataclass
class WithPresets(Outer):
    """A config whose presets depend on a choice it makes (``name``), as TrainConfig's do."""

    @classmethod
    def presets(cls, data: dict) -> dict:
        return {"steps": 9, "inner": {"rate": 0.25}} if data.get("name") == "tuned" else {}


def test_presets_sit_beneath_everything_a_user_writes(tmp_path: Path) -> None:
    assert cfglib.load(WithPresets).steps == 3                                     # no choice, no preset
    tuned = cfglib.load(WithPresets, overrides=["name=tuned"])
    assert (tuned.steps, tuned.inner.rate, tuned.inner.sizes) == (9, 0.25, (1, 2))  # preset, other defaults kept
    assert cfglib.load(WithPresets, overrides=["name=tuned", "inner.rate=2"]).inner.rate == 2.0
    path = tmp_path / "c.yaml"
    path.write_text("name: tuned\nsteps: 4\n")
    assert cfglib.load(WithPresets, path).steps == 4                               # the file wins over the preset
    resumed = cfglib.to_dict(cfglib.load(Outer, overrides=["name=tuned"]))          # a full config, as a run records
    assert cfglib.load(WithPresets, base=resumed).steps == 3                       # a recorded config is never re-tuned


def test_train_config_presets_follow_env_and_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    from fgmf_marl.teams import train_config
    from fgmf_marl.teams.train_config import TrainConfig
    table = {"env.name": {"pistonball": {"ppo": {"gamma": 0.95, "learning_rate": 5e-4}}},
             "policy.backbone": {"vit": {"ppo": {"learning_rate": 2e-4}}}}
    monkeypatch.setattr(train_config, "_preset_table", lambda: table)
    assert cfglib.load(TrainConfig).ppo == cfglib.load(TrainConfig, overrides=["policy.backbone=cnn"]).ppo
    vit = cfglib.load(TrainConfig, overrides=["policy.backbone=vit"]).ppo
    assert (vit.learning_rate, vit.gamma) == (2e-4, TrainConfig().ppo.gamma)
    both = cfglib.load(TrainConfig, overrides=["policy.backbone=vit", "env.name=pistonball"]).ppo
    assert (both.learning_rate, both.gamma) == (2e-4, 0.95)                        # backbone merged after env
    assert cfglib.load(TrainConfig, overrides=["policy.backbone=vit", "ppo.learning_rate=1e-3"]).ppo.learning_rate == 1e-3


def test_shipped_presets_are_valid_configs() -> None:
    from fgmf_marl.teams.train_config import PRESET_KEYS, TrainConfig, _preset_table
    table = _preset_table()
    assert set(table) <= set(PRESET_KEYS)
    for key, choices in table.items():
        for choice in choices:
            cfg = cfglib.load(TrainConfig, overrides=[f"{key}={choice}"])
            assert cfglib.to_dict(cfg) == cfglib.to_dict(cfglib.from_dict(TrainConfig, cfglib.to_dict(cfg)))


@dataclass
class Knobs:
    size: int = 3
    method: str = cfglib.added_field("new", legacy="old")      # added later; its default is not the old behaviour
    strict: bool = cfglib.added_field(True, legacy=False)


@dataclass
class Recorded:
    name: str = "x"
    knobs: Knobs = field(default_factory=Knobs)


def test_a_config_recorded_before_a_field_existed_keeps_its_legacy_value(tmp_path: Path) -> None:
    # a whole section written before `method` and `strict` existed means what it ran: the legacy values
    assert cfglib.fill_legacy(Recorded, {"name": "y", "knobs": {"size": 5}}) == {
        "name": "y", "knobs": {"size": 5, "method": "old", "strict": False}}
    record = tmp_path / "config.yaml"
    record.write_text("name: y\nknobs:\n  size: 5\n  strict: true\n")
    cfg = cfglib.load(Recorded, record)
    assert (cfg.knobs.method, cfg.knobs.strict) == ("old", True)                    # what it spells is kept
    assert cfglib.load(Recorded, record, ["knobs.method=new"]).knobs.method == "new"
    # a partial section (a user's: it leaves out a field that has no legacy value) takes today's defaults
    assert cfglib.fill_legacy(Recorded, {"knobs": {"strict": True}}) == {"knobs": {"strict": True}}
    partial = cfglib.load(Recorded, overrides=["name=z"])
    assert (partial.knobs.method, partial.knobs.strict) == ("new", True)
    whole = cfglib.to_dict(Recorded())                                              # written today: nothing to fill
    assert cfglib.fill_legacy(Recorded, whole) == whole


def test_scorpio_fields_added_after_the_first_records_carry_their_legacy_values() -> None:
    from fgmf_marl.defenses.config import ScorpioConfig
    section = cfglib.to_dict(ScorpioConfig())
    for name in ("saliency", "zero_candidate"):
        del section[name]
    filled = cfglib.fill_legacy(ScorpioConfig, section)
    assert (filled["saliency"], filled["zero_candidate"]) == ("ig", False)
