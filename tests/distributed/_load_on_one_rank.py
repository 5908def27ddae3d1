"""Load a checkpoint on ONE process with no process group, as a user moving a 2-rank run to a
single machine would; write what was restored for the 2-rank test to compare.

Usage: python _load_on_one_rank.py CKPT_ROOT OUT_FILE

Run by ``test_load_on_one_rank.py`` on rank 0 in a plain ``python`` subprocess (its torchrun
environment removed). Builds an unsharded TinyLM, its AdamW and LR scheduler and a
StatefulDataLoader exactly as the trainer does, calls ``CheckpointManager.load()``, and saves
full parameters, moments keyed by FQN, the scheduler step and every log record/warning.
"""

from __future__ import annotations

import logging
import sys
import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.demo import TinyLM, build_optimizer


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def main(root: str, out: str) -> None:
    records = _Records()
    logging.getLogger("ckptguard").addHandler(records)
    logging.getLogger("ckptguard").setLevel(logging.DEBUG)

    torch.manual_seed(1)  # another init than the saved run: only the load can make them equal
    model = TinyLM()
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    loader = StatefulDataLoader(torch.arange(64), batch_size=4, shuffle=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(
            root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader
        ) as mgr:
            step = mgr.load()

    optim = {}
    for name, param in model.named_parameters():
        for k, v in optimizer.state.get(param, {}).items():
            if isinstance(v, torch.Tensor):
                optim[f"optim.{name}.{k}"] = v.detach().clone()
    torch.save(
        {
            "step": step,
            "model": {f"model.{n}": p.detach().clone() for n, p in model.named_parameters()},
            "optim": optim,
            "scheduler_last_epoch": scheduler.last_epoch,
            "log": records.messages + [f"WARNING warnings: {w.message}" for w in caught],
        },
        out,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
