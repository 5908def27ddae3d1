"""Checkpoint benchmark: what a ckptguard user gets (retention on) vs raw DCP, torch.save and
the disk, side by side, in one run.

    python benchmarks/bench_checkpoint.py                 # 0.0625, 0.5 and 2 GiB, 1 and 2 ranks
    python benchmarks/bench_checkpoint.py --full          # adds 4 GiB
    python benchmarks/bench_checkpoint.py --sizes 0.5 --nproc 1 --repeats 7

Writes ``benchmarks/out/results.md`` and ``results.json`` (or ``--out``); the headline table at
the top is the user's view. See benchmarks/README.md for what each method and column means.

The driver runs one worker per rank count: a plain process for 1 rank, ``torchrun`` for 2+
(FSDP2 ``fully_shard`` on a gloo CPU mesh). Each worker builds every size in turn and runs every
method on the same live state, saving steps in sequence into one root per method (so ckptguard's
retention deletes inside the timed save, as in a training run), interleaving methods within each
repeat in an alternating order (forward, reversed) so that drifting load and the disk's state
spread over all of them."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GiB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.0625,0.5,2",
                   help="comma-separated GiB of model + AdamW state (params x3) [0.0625,0.5,2]")
    p.add_argument("--full", action="store_true", help="add 4 GiB to --sizes")
    p.add_argument("--nproc", default="1,2", help="comma-separated rank counts [1,2]")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats per method, interleaved, order alternating [5]")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds of every method first (first-call costs) [1]")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: disk, torch.save, dcp, dcp.async_save, "
                        "ckptguard, ckptguard keep_last=1, ckptguard keep_last=None, "
                        "ckptguard async [all]")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model and optimizer state live; cuda: one GPU per rank, "
                        "async saves stage into pinned host memory [cpu]")
    p.add_argument("--threads", type=int, default=None,
                   help="DCP writer threads for ckptguard and raw DCP [ckptguard's default]")
    p.add_argument("--cache-drop", choices=["fadvise", "global", "none"], default="fadvise",
                   help="how to empty the page cache before cold loads: per-file "
                        "posix_fadvise(DONTNEED), /proc/sys/vm/drop_caches (root), or not [fadvise]")
    p.add_argument("--workdir", default=None,
                   help="where checkpoints are written (deleted afterwards) [a new dir in $TMPDIR]")
    p.add_argument("--out", default=str(HERE / "out"), help="results directory [benchmarks/out]")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sizes(args: argparse.Namespace) -> list[float]:
    sizes = [float(x) for x in args.sizes.split(",") if x.strip()]
    if args.full and 4.0 not in sizes:
        sizes.append(4.0)
    return sizes


# ------------------------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> None:
    """Runs on every rank: build each size, run every method ``repeats`` times, gather."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo")
    import _methods
    from _measure import Probes

    rank = dist.get_rank() if dist.is_initialized() else 0
    methods = _methods_arg(args)
    threads = args.threads or _methods.default_thread_count()
    probes = Probes(_methods.EXTRA_PROBES)
    probes.install()
    configs = []
    try:
        for size in _sizes(args):
            state = _methods.build_state(size, world, args.device)
            workdir = Path(args.workdir) / f"size{size:g}-np{world}"
            ctx = _methods.Context(state, workdir, threads, args.cache_drop, probes)
            # every root holds what it would mid-run before anything is timed: keep_last
            # checkpoints for the ckptguard rows, so each timed save deletes one
            _methods.prefill(ctx, methods)
            for rep in range(-args.warmup, 0):  # results thrown away
                for name in methods:
                    _methods.METHODS[name](ctx, rep)
            repeats: list[dict[str, Any]] = []
            orders = []
            for rep in range(args.repeats):
                row = {}
                # alternate the order (forward, reversed, ...) so that on average every method
                # runs at the same place in the round, after the same writes and deletions
                order = methods if rep % 2 == 0 else methods[::-1]
                for name in order:
                    row[name] = _methods.METHODS[name](ctx, rep)
                repeats.append(row)
                orders.append(list(order))
            _methods.MANAGERS.close()
            gathered = _gather(repeats)
            local_bytes = max(_gather(state.local_bytes))
            if rank == 0:
                configs.append({
                    "size_gib": size, "nproc": world, "total_bytes": state.total_bytes,
                    "local_bytes": local_bytes,
                    "thread_count": threads, "repeats": args.repeats, "methods": methods,
                    "order": orders,
                    "keep_last": {m: k for m, k in _methods.KEEP_LAST.items() if m in methods},
                    "device": args.device,
                    "parallelism": (f"FSDP2 fully_shard, {args.device} mesh" if world > 1
                                    else "single process"),
                    "per_rank": gathered, "probes_present": probes.present,
                })
            del ctx, state
            if rank == 0:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        probes.uninstall()
    if rank == 0:
        Path(args.result_file).write_text(json.dumps(configs))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _gather(obj: Any) -> list[Any]:
    """One ``obj`` per rank, in rank order (e.g. [rank][repeat] -> {method: result})."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------ driver


def _check_disk(workdir: Path, sizes: list[float], methods: list[str]) -> None:
    """Refuse to start without room for the checkpoints every row keeps (retention is on:
    ``keep_last`` per ckptguard row, the previous step per raw DCP row) + one being written."""
    import _methods

    held = sum(_methods.checkpoints_held(m) for m in methods)
    need = (held + 1) * max(sizes) * GiB + 1 * GiB
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(
            f"--workdir {workdir}: {free / GiB:.1f} GiB free, the benchmark needs about "
            f"{need / GiB:.1f} GiB for --sizes {sizes} ({held} checkpoints kept across the rows "
            "+ one being written). Pick a smaller size, fewer --methods or another --workdir."
        )


def _methods_arg(args: argparse.Namespace) -> list[str]:
    import _methods

    if not args.methods:
        return list(_methods.METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(_methods.METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {list(_methods.METHODS)}")
    return methods


def run_config(args: argparse.Namespace, nproc: int, workdir: Path, raw_file: Path) -> list[dict]:
    script = str(Path(__file__).resolve())
    passthrough = ["--worker", "--sizes", ",".join(f"{s:g}" for s in _sizes(args)),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--cache-drop", args.cache_drop,
                   "--device", args.device,
                   "--workdir", str(workdir), "--result-file", str(raw_file)]
    if args.methods:
        passthrough += ["--methods", args.methods]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    if nproc == 1:
        cmd = [sys.executable, script, *passthrough]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, *passthrough]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1" if nproc > 1 else str(os.cpu_count() or 1))
    print(f"[bench] {nproc} rank(s): {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=HERE)
    return json.loads(raw_file.read_text())


def aggregate(raw_configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import _report

    out = []
    for cfg in raw_configs:
        per_rank = cfg.pop("per_rank")
        summary = {}
        for method in cfg["methods"]:
            reps = [
                _report.reduce_ranks([per_rank[r][i][method] for r in range(len(per_rank))])
                for i in range(len(per_rank[0]))
            ]
            summary[method] = _report.summarize(reps)
            summary[method]["repeats"] = reps
        cfg["summary"] = summary
        cfg["targets"] = _report.targets(summary, cfg["size_gib"], cfg["local_bytes"])
        out.append(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.worker:
        worker(args)
        return 0
    import _measure
    import _report

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckptguard-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        _check_disk(workdir, _sizes(args), _methods_arg(args))
        machine = _measure.machine_info(workdir)
        configs: list[dict[str, Any]] = []
        for nproc in [int(x) for x in args.nproc.split(",") if x.strip()]:
            raw_file = workdir / f"raw-np{nproc}.json"
            configs += aggregate(run_config(args, nproc, workdir, raw_file))
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    drops = {r.get("cache_drop") for c in configs for m in c["summary"].values()
             for r in m.get("repeats", []) if r.get("cache_drop")}
    results = {
        "command": "python benchmarks/bench_checkpoint.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine, "workdir": str(workdir), "wall_s": time.time() - started,
        "loadavg_end": list(os.getloadavg()), "cache_drop": ",".join(sorted(drops)) or "none",
        "targets": _report.TARGETS, "configs": configs,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    md = _report.results_markdown(results)
    (out_dir / "results.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out_dir / 'results.md'} and results.json in {results['wall_s']:.0f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
