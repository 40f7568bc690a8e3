"""scripts/reproduce.py on a real two-node Ray cluster (both nodes on this machine, loopback addresses only).

A head (127.0.0.2, one CPU) and a second node (127.0.0.3, one CPU) are started with ``ray start
--block`` in sessions of their own, with their own temp dirs, ports and auth token, so the test
neither joins nor disturbs any other Ray instance on the machine; it ends them by killing their
process groups (``ray stop`` would stop every Ray process of the user). The tiny experiment then runs
with ``--address``: its two training tasks (one CPU each, two at a time) must land on both nodes, and
every number must equal a local run's. Why: ``--address`` was the one path of reproduce.py no test ran.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from test_reproduce import ROOT, _args, _numbers

# not slow-marked: the codebase issue asks for the two-node run in CI (about 90 s on 2 cores)
pytestmark = pytest.mark.usefixtures("one_thread")

RAY = Path(sys.executable).with_name("ray")
#: loopback addresses other than 127.0.0.1, which Ray replaces by the machine's routable address
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
STARTED = "Ray runtime started"
#: the ports of ``ray start`` that default to fixed numbers or are shared by a node's processes
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
HEAD_PORTS = ("--port", "--ray-client-server-port", "--dashboard-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(flags: tuple[str, ...]) -> list[str]:
    return [arg for flag in flags for arg in (flag, str(_free_port()))]


def _start(args: list[str], log: Path, env: dict[str, str], nodes: list[subprocess.Popen]) -> None:
    """``ray start --block ARGS`` in a new session (appended to ``nodes`` at once, for clean-up), until it is up."""
    with open(log, "w", encoding="utf-8") as out:
        nodes.append(subprocess.Popen([str(RAY), "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *args],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True))
    deadline = time.monotonic() + 180
    while STARTED not in log.read_text(encoding="utf-8"):
        assert nodes[-1].poll() is None and time.monotonic() < deadline, \
            f"ray start {' '.join(args)} failed:\n{log.read_text(encoding='utf-8')[-3000:]}"
        time.sleep(0.5)


@pytest.fixture
def cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A two-node cluster: its address and the environment a driver needs (PYTHONPATH, the cluster's token).

    Temp dirs are short paths under /tmp: Ray's Unix sockets live there and must fit 107 bytes.
    """
    base = Path(tempfile.mkdtemp(prefix="fgmf-ray-"))
    (base / "token").write_text(secrets.token_hex(32), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]), OMP_NUM_THREADS="1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(base / "token"), RAY_USAGE_STATS_ENABLED="0")
    head = _ports(HEAD_PORTS)
    address = f"{HEAD_IP}:{head[1]}"
    nodes: list[subprocess.Popen] = []
    try:
        _start(["--head", "--node-ip-address", HEAD_IP, "--temp-dir", str(base / "h"), "--include-dashboard",
                "false", *head, *_ports(NODE_PORTS)], base / "head.log", env, nodes)
        _start(["--address", address, "--node-ip-address", WORKER_IP, "--temp-dir", str(base / "w"),
                *_ports(NODE_PORTS)], base / "worker.log", env, nodes)
        yield address, env
    finally:
        for node in reversed(nodes):   # each node's processes share its session's process group
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
        shutil.rmtree(base, ignore_errors=True)


def _reproduce(folder: Path, env: dict[str, str], *extra: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), *_args(folder), *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"reproduce.py {' '.join(extra)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"


def test_tiny_experiment_on_a_two_node_cluster_runs_on_both_and_equals_a_local_run(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = cluster
    _reproduce(tmp_path / "cluster", env, "--address", address)
    records = [json.loads(p.read_text()) for p in (tmp_path / "cluster" / "root" / "tasks").glob("*/task.json")]
    assert len(records) == 4 and {r["status"] for r in records} == {"done"}
    assert len({r["node"] for r in records if r["kind"] == "train"}) == 2, [r["node"] for r in records]
    # Ray's switch for single-machine platforms keeps the local cluster on 127.0.0.1 too (else: the host's address)
    _reproduce(tmp_path / "local", {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert _numbers(tmp_path / "cluster" / "root") == _numbers(tmp_path / "local" / "root")
