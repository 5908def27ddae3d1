"""The trainer the kill tests crash: the demo's TinyLM on its learnable data, saving every few steps.

Run as ``python tests/e2e/_kill_trainer.py ...`` (one rank) or under ``torchrun`` (FSDP2 over a
CPU mesh). It records, in ``--out-dir``:

* ``losses-rank{R}.jsonl``: the exact loss of every step (hex floats), appended as it goes, so
  the lines written before a SIGKILL survive it;
* ``loaded-rank{R}.json``: the step ``CheckpointManager.load()`` returned;
* with ``--snapshots``, ``live-{save|load}-step{N}-rank{R}.pt``: this rank's live state (local
  shards of every parameter and optimizer tensor, and every RNG stream) right after saving or
  loading step N, so a test can check that what a new process loads is what was saved.

A crash is injected with ``CKPTGUARD_FAULT`` (see ``ckptguard.testing.faults``), never by timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ckptguard import CheckpointManager
from ckptguard.demo import TinyLM, TokenWindows, build_optimizer, warmup_cosine
from ckptguard.testing import faults


def live_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    out: dict = {}
    for name, p in model.named_parameters():
        out[f"model.{name}"] = _local(p)
        for k, v in sorted(optimizer.state.get(p, {}).items()):
            if isinstance(v, torch.Tensor):
                out[f"optim.{name}.{k}"] = _local(v)
    out["rng.torch"] = torch.get_rng_state()
    out["rng.python"] = repr(random.getstate())
    out["rng.numpy"] = repr(np.random.get_state())
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def main() -> None:
    faults.install()  # CKPTGUARD_FAULT: the phase this run is killed at
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--total-steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--keep-last", type=int, default=2, help="0 keeps every checkpoint")
    p.add_argument("--resave-at", type=int, default=None, help="save this step twice (overwrite)")
    p.add_argument("--snapshots", action="store_true")
    a = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # Short collective timeout: a rank whose peer was killed fails fast even if torchrun
        # were slow to tear it down.
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank() if world > 1 else 0
    a.out_dir.mkdir(parents=True, exist_ok=True)

    seed = 1234 + rank  # own streams per rank: a resume must restore each rank's own RNG
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(1234)  # identical initial weights on every rank

    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(
        TokenWindows(a.data, rank, world), batch_size=8, shuffle=True, drop_last=True
    )
    model = TinyLM()
    torch.manual_seed(seed)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.hidden, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(a.total_steps))
    mgr = CheckpointManager(
        a.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        keep_last=a.keep_last or None, commit_timeout_s=120,
    )
    blocking = a.mode == "sync"

    step = mgr.load()
    (a.out_dir / f"loaded-rank{rank}.json").write_text(json.dumps({"step": step}))
    if a.snapshots:
        torch.save(live_state(model, optimizer), a.out_dir / f"live-load-step{step}-rank{rank}.pt")
    model.train()
    while step < a.total_steps:
        for x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            with open(a.out_dir / f"losses-rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
            if step % a.save_every == 0:
                mgr.save(step, blocking=blocking)
                if a.snapshots:
                    torch.save(
                        live_state(model, optimizer), a.out_dir / f"live-save-step{step}-rank{rank}.pt"
                    )
                if step == a.resave_at:
                    mgr.save(step, blocking=blocking, overwrite=True)
            if step >= a.total_steps:
                break
    mgr.close()
    (a.out_dir / f"finished-rank{rank}").write_text("ok")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
