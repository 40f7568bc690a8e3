"""Shared fixtures."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny batches: one intra-op thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def grid_stopped_at_cell(n: int) -> Iterator[None]:
    """Inside it, the evaluation grid is interrupted (KeyboardInterrupt, as Ctrl-C or a SIGTERM unwinds) when it
    starts its ``n``-th cell: what a killed evaluation leaves, for the resume tests."""
    from fgmf_marl.teams import grid
    real_run_cell, calls = grid.run_cell, []

    def run_cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    grid.run_cell = run_cell
    try:
        yield
    finally:
        grid.run_cell = real_run_cell
