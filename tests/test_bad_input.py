"""Bad input to every command: one line on stderr naming the option, exit 2, nothing left behind.

Two halves: a table of bad command lines (each run in-process through the command's ``entry``), and
a property test over every field of every command's config, which must either build or raise a
one-line :class:`~fgmf_marl.config.ConfigError`, never any other exception.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Iterator, get_args, get_type_hints

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgmf_marl import config as cfglib
from fgmf_marl.agents.adversary import AdversaryConfig
from fgmf_marl.config import ConfigError
from fgmf_marl.jobs import adversary, evaluate, explain, replay, train
from fgmf_marl.oversight.replay import ReplayConfig
from fgmf_marl.teams.eval_config import EvalConfig
from fgmf_marl.teams.explanation import ExplainConfig
from fgmf_marl.teams.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_TRAIN = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "eval_episodes=2", "env.native.max_steps=10",
              "--no-progress"]
UNWRITABLE = "/proc/fgmf-no-such-dir/out"   # /proc takes no new folders, not even from root
NO_GPU = [] if torch.cuda.is_available() else [("train", "--device cuda", "device='cuda'")]

# (command, arguments, what the one error line must name); {out} is the output folder of the call,
# {file} an existing file, {latin1} a non-UTF-8 YAML file, {run} a trained run of the default env.
CASES: list[tuple[str, str, str]] = [
    ("train", "ppo.vf_coef=-1", "ppo.vf_coef=-1.0 must be >= 0"),
    ("train", "timesteps=1e30", "timesteps="),
    ("evaluate", "--eps 4,4", "eps repeats 4.0"),
    ("evaluate", "--seeds 0,0", "seeds repeats 0"),
    ("evaluate", "--attacks pgd pgd", "attacks repeats pgd"),
    ("train", "ppo.ent_coef=-0.5", "ppo.ent_coef"),
    ("train", "ppo.max_grad_norm=-1", "ppo.max_grad_norm"),
    ("train", "ppo.max_grad_norm=0", "ppo.max_grad_norm"),
    ("train", "ppo.clip_range=inf", "ppo.clip_range"),
    ("train", "ppo.clip_range=5", "ppo.clip_range"),
    ("train", "ppo.learning_rate=nan", "ppo.learning_rate"),
    ("train", "ppo.learning_rate=.inf", "ppo.learning_rate"),
    ("train", "ppo.learning_rate=1e400", "ppo.learning_rate"),
    ("train", "ppo.gamma=5", "ppo.gamma"),
    ("train", "ppo.gae_lambda=-0.1", "ppo.gae_lambda"),
    ("train", "ppo.n_steps=1e12", "ppo.n_steps"),
    ("train", "ppo.batch_size=1e12", "ppo.batch_size"),
    ("train", "ppo.n_epochs=1e9", "ppo.n_epochs"),
    ("train", "env.n_envs=1e7", "env.n_envs"),
    ("train", "env.native.size=1e6", "env.native.size"),
    ("train", "env.native.n_distractors=1e9", "env.native.n_distractors"),
    ("train", "env.native.max_steps=1e12", "env.native.max_steps"),
    ("train", "env.native.cover_radius=1e9", "env.native.cover_radius"),
    ("train", "env.native.shaping_coef=nan", "env.native.shaping_coef"),
    ("train", "env.adapter.size=1e6", "env.adapter.size"),
    ("train", "env.adapter.frame_stack=1000", "env.adapter.frame_stack"),
    ("train", "policy.vit_heads=0", "policy.vit_heads"),
    ("train", "policy.vit_dim=1e9", "policy.vit_dim"),
    ("train", "policy.vit_depth=1e6", "policy.vit_depth"),
    ("train", "policy.vit_stem=big", "policy.vit_stem"),
    ("train", "policy.features_dim=1e9", "policy.features_dim"),
    ("train", "policy.cnn_channels=[16,32,1e9]", "policy.cnn_channels[2]"),
    ("train", "policy.net_arch=[64]*40", "policy.net_arch"),
    ("train", "policy.cnn_layout=huge", "policy.cnn_layout"),
    ("train", "policy.cnn_layout=nature env.native.size=32", "policy.cnn_layout=nature needs images of at least 36 px"),
    ("train", "defense.kind=scorpio defense.scorpio.lambda1=nan", "defense.scorpio.lambda1"),
    ("train", "defense.scorpio.ig_steps=1e9", "defense.scorpio.ig_steps"),
    ("train", "defense.sgam.hidden=1e9", "defense.sgam.hidden"),
    ("train", "defense.sappo.kappa=-1", "defense.sappo.kappa"),
    ("train", "--seed -1", "seed=-1"),
    ("train", f"--seed {2**64}", "seed="),
    ("train", "--device cuda:abc", "device='cuda:abc'"),
    ("train", "--threads -1", "--threads=-1"),
    ("train", "--threads 100000", "--threads=100000"),
    ("train", "--config {latin1}", "latin1.yaml' is not UTF-8"),
    ("train", "--run-dir {file}", "a_file' is an existing file"),
    ("train", "--run-dir {file}/run", "lies under the file"),
    ("train", f"--run-dir {UNWRITABLE}", "is not writable"),
    *NO_GPU,
    ("evaluate", "--eps nan", "eps[0]"),
    ("evaluate", "--eps inf", "eps[0]"),
    ("evaluate", "--attacks pgd:random_start=maybe", "random_start must be true or false, got 'maybe'"),
    ("evaluate", "--attacks pgd:quantize=1", "quantize must be true or false"),
    ("evaluate", "--attacks pgd:steps=2.5", "steps=2.5"),
    ("evaluate", "--attacks pgd:steps=1000000000", "steps=1000000000 must be <="),
    ("evaluate", "--attacks pgd:restarts=0", "restarts=0 must be >= 1"),
    ("evaluate", "--attacks pgd:step_size=.nan", "step_size=nan"),
    ("evaluate", "--attacks pgd:targeted=true,target_action=-1", "target_action=-1"),
    ("evaluate", "--attacks pgd:targeted=yes_please", "targeted must be true or false"),
    ("evaluate", "--attacks square:queries=0", "queries=0"),
    ("evaluate", "--attacks square:p_init=.nan", "p_init=nan"),
    ("evaluate", "--budget-steps nan", "budget_steps"),
    ("evaluate", "--attacks eot:samples=1e9", "samples='1e9'"),
    ("evaluate", "--device cuda:abc", "device='cuda:abc'"),
    ("evaluate", "--config {latin1}", "latin1.yaml' is not UTF-8"),
    ("evaluate", "--out {file}", "a_file' is an existing file"),
    ("evaluate", "--out {file}/eval", "lies under the file"),
    ("evaluate", f"--out {UNWRITABLE}", "is not writable"),
    ("explain", "--eps nan", "'eps' must be a finite number"),
    ("explain", "--eps 300", "--eps=300.0 must be in [0, 255]"),
    ("explain", "--grid 1000", "--grid=1000"),
    ("explain", "--grid 100", "--grid=100 must be an integer in 1..48"),
    ("explain", "--episodes 0", "--episodes=0"),
    ("explain", "--episodes 1000000000", "--episodes=1000000000"),
    ("explain", "--n-envs 10000000", "--n-envs=10000000"),
    ("explain", "--ig-steps 1000000000", "--ig-steps"),
    ("explain", "--sensitivity-samples -1", "--sensitivity-samples=-1"),
    ("explain", "--seed -1", "seed=-1"),
    ("explain", "--config {latin1}", "latin1.yaml' is not UTF-8"),
    ("explain", "--out {file}", "--out '"),
    ("explain", "--out {file}/eval", "lies under the file"),
    ("explain", f"--out {UNWRITABLE}", "is not writable"),
    ("adversary", "--eps inf", "'eps' must be a finite number"),
    ("adversary", "--config {latin1}", "latin1.yaml' is not UTF-8"),
    ("adversary", "--run-dir {file}", "a_file' is an existing file"),
    ("adversary", f"--run-dir {UNWRITABLE}", "is not writable"),
    ("replay", "render {out}:0 --fps nan", "'fps' must be a finite number"),
    ("replay", "render {out}:0 --fps inf", "'fps' must be a finite number"),
    ("replay", "render {out}:0 --scale 0", "--scale"),
]

# each command's arguments that make the rest of the call valid; {out} is where it would write
BASE = {
    "train": "--timesteps 64 --run-dir {out} " + " ".join(FAST_TRAIN),
    "evaluate": "{run} --out {out} --attacks random --eps 2 --episodes 1 --n-envs 1 --no-progress",
    "explain": "--checkpoint {run} --out {out} --episodes 1 --n-envs 1 --no-progress",
    "adversary": "--victim {run} --run-dir {out} --timesteps 64 n_envs=1 n_steps=32 batch_size=32 --no-progress",
    "replay": "",
}
ENTRIES = {"train": train.entry, "evaluate": evaluate.entry, "explain": explain.entry,
           "adversary": adversary.entry, "replay": replay.entry}


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("victim") / "run"
    assert train.entry(["--timesteps", "64", "--run-dir", str(root), *FAST_TRAIN]) == 0
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command, args, names", CASES, ids=[f"{c}:{a}" for c, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(command: str, args: str, names: str, victim: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "latin1.yaml").write_bytes("seed: 0  # d\xe9faut\n".encode("latin-1"))
    before = _tree(tmp_path)
    paths = {"out": tmp_path / "out", "file": tmp_path / "a_file", "latin1": tmp_path / "latin1.yaml", "run": victim}
    # later options override earlier ones, so the case's own value wins over the base's
    argv = [a.format(**paths) for a in (args.split() if command == "replay" else BASE[command].split() + args.split())]
    capsys.readouterr()
    assert ENTRIES[command](argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert names in err, err
    assert _tree(tmp_path) == before            # no output folder, no half-written run


def test_the_base_command_lines_are_valid(victim: Path, tmp_path: Path) -> None:
    """Each table row fails because of its own argument, not because the rest of the call was bad."""
    for command in ("train", "evaluate"):
        out = tmp_path / command
        argv = BASE[command].format(out=out, run=victim).split()
        assert ENTRIES[command](argv) == 0, command
        assert out.is_dir()


# ------------------------------------------------------------------------------- property test
#: what each config needs to be valid at all (a checkpoint, a victim, a target); the rest stays default
REQUIRED: dict[type, dict[str, Any]] = {
    TrainConfig: {}, EvalConfig: {"checkpoints": ["run"]}, ExplainConfig: {"checkpoint": "run"},
    AdversaryConfig: {"victim": "run"}, ReplayConfig: {"target": "log"},
}


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + (f.name,))
        else:
            yield prefix + (f.name,)


FIELDS = [(cls, path) for cls in REQUIRED for path in _leaves(cls)]

NON_FINITE_TEXTS = ("nan", ".nan", ".inf", "-.inf", "1e400", "-1e400")
SPECIAL = [0, -1, 1, 2, 2**31, 2**63, 2**64, 10**12, -(10**12), 1e300, -1e300, 1e-300, 0.5, -0.5,
           float("nan"), float("inf"), float("-inf"), True, False, None, "", "maybe", "cuda:abc", [], {}]
VALUES = st.one_of(
    st.sampled_from(SPECIAL), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.one_of(st.integers(-5, 300), st.floats(), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
TEXTS = st.one_of(st.sampled_from([*NON_FINITE_TEXTS, "1e12", str(2**64), "-1",
                                   "maybe", "[1, 2]", "{a: 1}", "null", "''", "true", "2001-01-01", "!!binary x"]),
                  st.text(max_size=10))


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        data = {part: data}
    return data


def _numeric(tp: Any) -> bool:
    """True when the annotation ``tp`` is, or contains, int or float (``int | None``, ``list[float]``)."""
    return tp in (int, float) or any(_numeric(a) for a in get_args(tp))


def _builds_or_one_line_error(build: Any, must_fail: bool) -> None:
    try:
        build()
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
    else:
        assert not must_fail, "a non-finite number was accepted"


@pytest.mark.parametrize("cls, path", FIELDS, ids=[f"{c.__name__}.{'.'.join(p)}" for c, p in FIELDS])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES, text=TEXTS)
def test_every_field_builds_or_raises_a_one_line_config_error(cls: type, path: tuple[str, ...], value: Any,
                                                               text: str) -> None:
    base = REQUIRED[cls]
    owner = functools.reduce(lambda c, name: get_type_hints(c)[name], path[:-1], cls)
    numeric = _numeric(get_type_hints(owner)[path[-1]])
    non_finite = isinstance(value, float) and not math.isfinite(value)
    _builds_or_one_line_error(lambda: cfglib.from_dict(cls, {**base, **_nested(path, value)}), numeric and non_finite)
    _builds_or_one_line_error(lambda: cfglib.load(cls, overrides=[f"{'.'.join(path)}={text}"], base=base),
                              numeric and text in NON_FINITE_TEXTS)
