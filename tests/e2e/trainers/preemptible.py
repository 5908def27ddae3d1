"""A preemptible DDP trainer, written the way the run-control docs tell users to write one.

    torchrun --nproc_per_node=2 tests/e2e/trainers/preemptible.py --ckpt-dir CKPT --out-dir OUT

Saves on a step interval and/or rank 0's clock, and on SIGTERM/SIGUSR1 (any rank); once the
checkpoint a signal asked for is durable it leaves the loop and exits 0. Run again with the same
arguments, it resumes from the newest checkpoint. For the tests it leaves, per rank, in OUT:

- ``steps-rank{R}.jsonl``: one line per step, ``{"step", "loss"}`` (loss as float.hex());
- ``saves-rank{R}.jsonl``: one line per save, ``{"step", "reasons"}``;
- ``pid-rank{R}``: this worker's pid (for a test that signals one worker);
- ``exit-rank{R}.json``: written on a clean exit: ``{"step", "preempted"}``;
- ``final-rank{R}.pt``: model and optimizer state at ``--total-steps`` (uninterrupted or resumed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, for tests._helpers
from tests._helpers import progression_windows  # noqa: E402


class Net(nn.Module):
    def __init__(self, vocab: int = 33, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(4 * dim, 64)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(64, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.gelu(self.hidden(self.embed(x).flatten(1)))))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--total-steps", type=int, default=60)
    p.add_argument("--save-every-steps", type=int, default=None)
    p.add_argument("--save-every-seconds", type=float, default=None)
    p.add_argument("--signals", default="SIGTERM,SIGUSR1")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--keep-every", type=int, default=None)
    p.add_argument("--keep-best", type=int, default=None)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (all ranks)")
    p.add_argument("--slow-rank", type=int, default=None, help="this rank sleeps as long again")
    p.add_argument("--crash-rank", type=int, default=None)
    p.add_argument("--crash-at-step", type=int, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid-rank{rank}").write_text(str(os.getpid()))

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dataset = progression_windows(256)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = StatefulDataLoader(dataset, batch_size=16, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    model = DDP(Net())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    mgr = CheckpointManager(
        args.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        save_every_steps=args.save_every_steps,
        save_every_seconds=args.save_every_seconds,
        save_on_signals=tuple(getattr(signal, s) for s in args.signals.split(",") if s),
        keep_last=args.keep_last, keep_every=args.keep_every,
        keep_best=args.keep_best, best_metric="loss" if args.keep_best else None,
    )
    steps_log = open(out / f"steps-rank{rank}.jsonl", "a")  # noqa: SIM115 - closed at exit
    saves_log = open(out / f"saves-rank{rank}.jsonl", "a")  # noqa: SIM115

    step = mgr.load()
    epoch = step // steps_per_epoch
    model.train()
    while step < args.total_steps and not mgr.preempted:
        sampler.set_epoch(epoch)
        for x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            steps_log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
            steps_log.flush()
            if step == args.crash_at_step and rank == args.crash_rank:
                os._exit(3)  # a worker dies; torchrun SIGTERMs the survivor
            time.sleep(args.step_seconds * (2 if rank == args.slow_rank else 1))
            if decision := mgr.should_save(step):  # the same answer on every rank
                mgr.save(step, metrics={"loss": loss.item()}, blocking=not args.async_save)
                saves_log.write(json.dumps({"step": step, "reasons": decision.reasons}) + "\n")
                saves_log.flush()
            if mgr.preempted:
                break  # the checkpoint the signal asked for is durable
            if step >= args.total_steps:
                break
        epoch += 1

    if step >= args.total_steps and not mgr.preempted:
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
                   out / f"final-rank{rank}.pt")
    mgr.close()
    (out / f"exit-rank{rank}.json").write_text(json.dumps(
        {"step": step, "preempted": mgr.preempted}
    ))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
