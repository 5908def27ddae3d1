"""DCP's ``DefaultStager`` against ckptguard's ``BackgroundStager``, both through ``dcp.async_save``.

About 0.5 GiB of model + AdamW state on CPU; each stager saves it ``--repeats`` times (the stager
is kept between saves, as in training). Per save: the caller's stall (until ``async_save``
returns), the time until the copy is staged, the time until the files are durable
(``sync_files=True``), and the peak RSS above the level before the save. Prints a markdown table
of medians. ::

    python benchmarks/bench_staging.py [--mib 512] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from ckptguard.core.async_save import Staged
from ckptguard.core.staging import BackgroundStager
from ckptguard.core.states import ModelOptimizerState

warnings.filterwarnings("ignore")
_WIDTH = 2048


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples RSS every millisecond in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _training_state(mib: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Linear layers whose weights + AdamW moments make about ``mib`` MiB (12 bytes a parameter)."""
    layers = max(1, round(mib * 2**20 / 12 / (_WIDTH * _WIDTH)))
    model = nn.Sequential(*[nn.Linear(_WIDTH, _WIDTH, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, _WIDTH)).sum().backward()
    opt.step()
    return model, opt


def _one_save(
    sd: dict[str, Any], path: Path, start: Callable[[dict[str, Any], dcp.FileSystemWriter], tuple[Future, Future]],
) -> dict[str, float]:
    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True)
    times: dict[str, float] = {}
    base = _rss_bytes()
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        staged, durable = start(sd, writer)
        times["stall_s"] = time.perf_counter() - t0
        staged.result()
        times["staged_s"] = time.perf_counter() - t0
        durable.result()
        times["durable_s"] = time.perf_counter() - t0
    times["extra_rss_mib"] = (rss.peak - base) / 2**20
    return times


def _dcp_default(stager: DefaultStager) -> Callable[..., tuple[Future, Future]]:
    def start(sd: dict[str, Any], writer: dcp.FileSystemWriter) -> tuple[Future, Future]:
        response = dcp.async_save(sd, storage_writer=writer, async_stager=stager, no_dist=True)
        return response.staging_completion, response.upload_completion

    return start


def _ours(stager: BackgroundStager) -> Callable[..., tuple[Future, Future]]:
    def start(sd: dict[str, Any], writer: dcp.FileSystemWriter) -> tuple[Future, Future]:
        staging = stager.stage(sd)  # as CheckpointManager.save does, before async_save
        response = dcp.async_save(sd, storage_writer=writer, async_stager=Staged(staging, sd), no_dist=True)
        done = response if isinstance(response, Future) else response.upload_completion
        return staging, done

    return start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, opt = _training_state(args.mib)
    state = ModelOptimizerState(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters())
                 + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])
    root = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=args.dir))
    load = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        default = DefaultStager(StagingOptions(
            use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
            use_non_blocking_copy=False,
        ))
        ours = BackgroundStager(opt)
        stagers = {"DCP DefaultStager (async staging)": _dcp_default(default), "ckptguard BackgroundStager": _ours(ours)}
        for repeat in range(args.repeats):
            for name, start in stagers.items():  # interleaved: machine noise hits both alike
                path = root / f"{repeat}-{len(rows.get(name, []))}-{name.split()[0]}"
                rows.setdefault(name, []).append(_one_save(state.state_dict(), path, start))
                shutil.rmtree(path)
        default.close()
        ours.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"state: {nbytes / 2**20:.0f} MiB (model + AdamW), CPU, {args.repeats} repeats, medians; "
          f"torch {torch.__version__}; load average before: {load[0]:.2f} on {os.cpu_count()} CPUs\n")
    print("| stager | caller stall s | staged after s | durable after s | peak extra RSS MiB |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {med['stall_s']:.3f} | {med['staged_s']:.3f} | {med['durable_s']:.3f} | "
              f"{med['extra_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
