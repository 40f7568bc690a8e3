"""Loading a checkpoint never runs code from it: a planted pickle is refused on every load path.

The malicious checkpoints are real SB3 checkpoints of a trained run with one ``":serialized:"``
entry added to (or swapped into) the ``data`` JSON: a cloudpickle blob that, if SB3 unpickled it,
would create a marker file. Every command that loads a checkpoint must exit 2 with one line naming
the entry, and the marker must never appear; an allowed entry's blob is never unpickled either.
"""
from __future__ import annotations

import base64
import json
import pathlib
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from fgmf_marl.jobs import adversary, evaluate, explain, train
from fgmf_marl.teams.checkpoints import load_adversary, load_model

TINY = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2",
        "checkpoint_every=10000", "env.native.max_steps=10"]


class _Touch:
    """Unpickling this creates ``path``: the stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _plant(zip_path: Path, marker: Path, key: str) -> None:
    """Rewrite ``zip_path`` with ``data[key]`` replaced by (or added as) a serialized blob that touches ``marker``."""
    with zipfile.ZipFile(zip_path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(members["data"])
    data[key] = {":type:": "<class 'object'>", ":serialized:": base64.b64encode(pickle.dumps(_Touch(marker))).decode()}
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    victim = root / "victim"
    assert train.entry(["--timesteps", "192", "--run-dir", str(victim), "--no-progress", *TINY]) == 0
    director = root / "adv"
    assert adversary.entry(["--victim", str(victim), "--timesteps", "32", "--run-dir", str(director), "--no-progress",
                            "n_envs=2", "n_steps=16", "batch_size=32", "n_epochs=1", "actor_steps=1"]) == 0
    evil_victim, evil_director = root / "evil_victim", root / "evil_adv"
    shutil.copytree(victim, evil_victim)
    shutil.copytree(director, evil_director)
    marker = root / "PWNED"
    _plant(evil_victim / "checkpoints" / "final.zip", marker, "evil")
    _plant(evil_director / "checkpoints" / "final.zip", marker, "evil")
    return {"victim": victim, "director": director, "evil_victim": evil_victim, "evil_director": evil_director,
            "marker": marker, "root": root}


def _load_paths(r: dict[str, Path]) -> list[tuple[str, list[str], object]]:
    out = r["root"] / "out"
    return [
        ("evaluate CKPT", [str(r["evil_victim"] / "checkpoints" / "final.zip"), "--out", str(out / "a")], evaluate),
        ("evaluate RUN", [str(r["evil_victim"]), "--out", str(out / "b")], evaluate),
        ("transfer surrogate", [str(r["victim"]), "--attacks", f"transfer:surrogate={r['evil_victim']}",
                                "--out", str(out / "c")], evaluate),
        ("adversary path", [str(r["victim"]), "--attacks", f"adversary:path={r['evil_director']}",
                            "--out", str(out / "d")], evaluate),
        ("train --resume", ["--resume", "--run-dir", str(r["evil_victim"]), "--timesteps", "100000"], train),
        ("explain --checkpoint", ["--checkpoint", str(r["evil_victim"]), "--out", str(out / "e")], explain),
        ("train_adversary --victim", ["--victim", str(r["evil_victim"]), "--run-dir", str(out / "f")], adversary),
    ]


@pytest.mark.parametrize("index", range(7))
def test_a_planted_pickle_is_refused_on_every_load_path(runs: dict[str, Path], index: int, capsys) -> None:
    name, argv, command = _load_paths(runs)[index]
    assert command.entry([*argv, "--no-progress"]) == 2, name
    err = capsys.readouterr().err.strip()
    assert "pickled entry 'evil'" in err and len(err.splitlines()) == 1, (name, err)
    assert not runs["marker"].exists(), f"{name} ran code from the checkpoint"
    assert not (runs["root"] / "out").exists() or not any((runs["root"] / "out").iterdir()), f"{name} left output"


def test_the_planted_pickle_does_run_code_when_sb3_loads_it_plainly(runs: dict[str, Path], tmp_path: Path) -> None:
    """The control: the same file through plain ``PPO.load`` creates the marker, so the tests above can fail."""
    from stable_baselines3 import PPO

    run = tmp_path / "control"
    shutil.copytree(runs["victim"], run)
    marker = tmp_path / "PWNED"
    _plant(run / "checkpoints" / "final.zip", marker, "evil")
    PPO.load(str(run / "checkpoints" / "final.zip"), device="cpu")
    assert marker.exists()


def test_a_pickle_in_an_entry_we_rebuild_is_never_unpickled(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "swapped"
    shutil.copytree(runs["victim"], run)
    marker = tmp_path / "PWNED"
    for key in ("policy_kwargs", "observation_space", "learning_rate"):
        _plant(run / "checkpoints" / "final.zip", marker, key)
    model, cfg = load_model(run)
    assert not marker.exists()
    reference, _ = load_model(runs["victim"])
    for a, b in zip(model.policy.state_dict().values(), reference.policy.state_dict().values()):
        assert (a == b).all()
    assert model.observation_space == reference.observation_space and cfg.env.n_envs == 2


def test_the_learned_adversary_loads_without_unpickling(runs: dict[str, Path]) -> None:
    loaded = load_adversary(runs["director"])
    assert loaded.n_agents == 3 and loaded.director.action_space.nvec.tolist() == [8, 8, 8]


def test_a_checkpoint_of_another_image_size_is_a_one_line_error(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = tmp_path / "other"
    shutil.copytree(runs["victim"], run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("size: 48", "size: 32"))
    assert evaluate.entry([str(run), "--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not be loaded" in err and len(err.splitlines()) == 1 and not (tmp_path / "eval").exists()


def test_a_surrogate_or_director_of_another_image_size_is_a_one_line_error(runs: dict[str, Path], tmp_path: Path,
                                                                           capsys) -> None:
    small = tmp_path / "small"
    assert train.entry(["--timesteps", "192", "--run-dir", str(small), "--no-progress", *TINY,
                        "env.native.size=32"]) == 0
    capsys.readouterr()
    cases = ((runs["victim"], f"transfer:surrogate={small}", "transfer surrogate sees observations (3, 32, 32)"),
             (small, f"adversary:path={runs['director']}", "adversary director sees observations (9, 48, 48)"))
    for victim, attack, message in cases:
        out = tmp_path / "eval"
        assert evaluate.entry([str(victim), "--attacks", attack, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not out.exists(), err
