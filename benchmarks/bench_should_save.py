"""Cost of ``should_save`` per call: the cross-rank agreement on preemption signals and the clock.

    python benchmarks/bench_should_save.py                 # 2 ranks (torchrun), 5000 calls each
    python benchmarks/bench_should_save.py --nproc 4 --calls 20000

Each row is a ``RunControl`` as ``CheckpointManager`` builds it, on a gloo group of its own,
called once per "training step" in a tight loop (the worst case: a real step takes longer, so
the ranks arrive together less often and a real collective is no faster than this). The raw
``all_reduce`` of the same four int64s is the floor. Prints a markdown table of microseconds
per call (median, p90, p99) measured on rank 0; the target is under 1 ms (issue 15).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def worker(calls: int, busy_us: float) -> None:
    import torch
    import torch.distributed as dist

    from ckptguard.core.policy import SavePolicy
    from ckptguard.runcontrol import RunControl

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo")

    def spin() -> None:  # a stand-in for the training step between two calls
        if busy_us:
            end = time.perf_counter() + busy_us / 1e6
            while time.perf_counter() < end:
                pass

    rows: list[tuple[str, list[float]]] = []

    def measure(name: str, call) -> None:
        for i in range(200):  # warm-up: connections, allocator
            call(i)
        dist.barrier(group)
        times = []
        for i in range(calls):
            spin()
            t0 = time.perf_counter()
            call(i + 1)
            times.append(time.perf_counter() - t0)
        rows.append((name, times))

    votes = torch.zeros(4, dtype=torch.int64)
    measure("raw all_reduce(MAX) of 4 int64 (the floor)",
            lambda i: dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group))
    controls = {  # built one at a time: each installs its handlers and restores them at close
        "save_every_steps only (no collective)": lambda: RunControl(
            SavePolicy(save_every_steps=10**9), group=group),
        "save_on_signals=(SIGUSR1,)": lambda: RunControl(
            SavePolicy(), signals=(signal.SIGUSR1,), group=group),
        "signals + save_every_seconds": lambda: RunControl(
            SavePolicy(save_every_seconds=10**6), signals=(signal.SIGUSR1,), group=group),
        "signals, agree_every=10": lambda: RunControl(
            SavePolicy(), signals=(signal.SIGUSR1,), group=group, agree_every=10),
    }
    for name, build in controls.items():
        control = build()
        measure(name, control.should_save)
        control.close()
    if rank == 0:
        world = dist.get_world_size()
        print(f"\n### should_save cost per call, {world} ranks, {calls} calls, "
              f"{busy_us:g} us of work between calls (rank 0)\n")
        print("| variant | median us | p90 us | p99 us |")
        print("|---|---:|---:|---:|")
        for name, times in rows:
            us = [t * 1e6 for t in times]
            print(f"| {name} | {statistics.median(us):.1f} | {_percentile(us, 0.9):.1f} | "
                  f"{_percentile(us, 0.99):.1f} |")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks [2]")
    p.add_argument("--calls", type=int, default=5000, help="timed calls per variant [5000]")
    p.add_argument("--busy-us", type=float, default=0.0,
                   help="microseconds of busy work between calls, a stand-in for a step [0]")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.calls, args.busy_us)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve()), "--worker",
           f"--calls={args.calls}", f"--busy-us={args.busy_us}"]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
