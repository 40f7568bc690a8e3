"""Every option of every command has help text, and every option that takes a value states its default."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from types import ModuleType

import pytest

from fgmf_marl.jobs import adversary, evaluate, explain, replay, train

JOBS = (train, evaluate, explain, adversary, replay)


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser and, recursively, its subcommands' parsers."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {sub}")


@pytest.mark.parametrize("job", JOBS, ids=lambda job: job.PROG)
def test_every_option_has_help_stating_its_default(job: ModuleType) -> None:
    for name, parser in _parsers(job.build_parser(), job.PROG):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            option = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {option}: no help"
            takes_value, required_positional = action.nargs != 0, not action.option_strings and action.required
            if takes_value and not required_positional:
                assert "default" in action.help or "required" in action.help, f"{name} {option}: no default"


def test_train_adversary_has_the_runtime_flags() -> None:
    options = {opt for action in adversary.build_parser()._actions for opt in action.option_strings}
    assert {"--seed", "--device", "--threads"} <= options
