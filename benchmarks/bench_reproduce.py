"""Throughput of the same short training tasks (a) one after another at 2 threads, (b) two at a time at
1 thread each through reproduce.py's Ray executor; and Ray's own overhead per task.

Both arms run each task exactly as reproduce.py does (a subprocess of the train job, its own log), so
the ratio isolates what two 1-thread tasks side by side buy over one 2-thread task. Goal: (b) >= 1.6x
(a), Ray's overhead (submit-to-result minus the task's own wall time) <= 2 s per task. Usage:
    python benchmarks/bench_reproduce.py [--tasks 4] [--timesteps 12288]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fgmf_marl.experiments import plan, runner, schema
from fgmf_marl.jobs import reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4, help="training tasks in the toy experiment (default 4)")
    parser.add_argument("--timesteps", type=int, default=12_288, help="agent-steps per task (default 12,288)")
    args = parser.parse_args()
    exp = schema.Experiment(runs=[schema.RunSpec(
        name="bench", seeds=list(range(args.tasks)),
        overrides=[f"timesteps={args.timesteps}", f"checkpoint_every={args.timesteps}", "eval_episodes=16"])])
    tasks = plan.expand(exp, reproduce.JOBS, quick=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        walls = [runner.execute(f"{tmp}/a", task, threads=2)["wall_seconds"] for task in tasks]
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        records = runner.run_tasks(Path(tmp) / "b", tasks, max_parallel=2, address=None, threads=1, progress=False)
        parallel = time.perf_counter() - start
    bad = [r["id"] for r in records.values() if r["status"] != "done"]
    if bad:
        raise SystemExit(f"tasks failed: {bad}")
    overhead = [r["ray_overhead_seconds"] for r in records.values()]
    print(f"{args.tasks} training tasks of {args.timesteps} agent-steps (subprocess + job each)")
    print(f"(a) one after another, 2 threads: {sequential:6.1f} s  ({args.tasks / sequential * 60:.2f} tasks/min; "
          f"per task {min(walls):.1f}-{max(walls):.1f} s)")
    print(f"(b) two at a time via Ray, 1 thread each: {parallel:6.1f} s  ({args.tasks / parallel * 60:.2f} tasks/min; "
          "includes starting the local Ray cluster)")
    print(f"throughput ratio (b)/(a): {sequential / parallel:.2f}x  (goal >= 1.6x)")
    print(f"Ray overhead per task (submit-to-result minus the task's wall): mean {sum(overhead) / len(overhead):.2f} s, "
          f"max {max(overhead):.2f} s  (goal <= 2 s)")


if __name__ == "__main__":
    main()
