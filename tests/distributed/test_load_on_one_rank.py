"""A checkpoint written by 2 FSDP2 ranks loads on 1 plain process with equal state, and that
process is told that per-rank state (RNG, dataloader position) cannot continue exactly."""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.tools.reader import load_checkpoint
from tests._helpers import launcher_free_env
from tests.distributed._fsdp import (
    assert_all_ranks,
    build_sharded,
    full_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)

_SCRIPT = Path(__file__).with_name("_load_on_one_rank.py")


def _load_in_one_process(root: Path, out: Path) -> list[str]:
    """Problems as text rather than exceptions: rank 1 is waiting for rank 0's verdict."""
    try:
        proc = subprocess.run(
            [sys.executable, str(_SCRIPT), str(root), str(out)],
            env=launcher_free_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        return [f"1-process load did not finish within {e.timeout}s:\n{e.stdout}\n{e.stderr}"]
    if proc.returncode != 0:
        return [f"1-process load exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"]
    return []


def _check_one_process_result(
    out: Path, expected: dict[str, torch.Tensor], step_dir: Path
) -> list[str]:
    result = torch.load(out, weights_only=True)
    problems = []
    if result["step"] != 3:
        problems.append(f"1-process load() returned step {result['step']}, expected 3")
    if result["scheduler_last_epoch"] != 3:
        problems.append(
            f"1-process scheduler last_epoch {result['scheduler_last_epoch']}, expected 3"
        )
    loaded = {**result["model"], **result["optim"]}
    problems += tensor_problems(expected, loaded, "1 process vs 2-rank full tensors")

    # The reader names moments "optimizer.state.<fqn>.<name>"; the helpers "optim.<fqn>.<name>".
    on_disk = {
        k.replace("optimizer.state.", "optim.", 1): v
        for k, v in load_checkpoint(step_dir).items()
        if k.startswith(("model.", "optimizer.state."))
    }
    reference = {k: v for k, v in on_disk.items() if isinstance(v, torch.Tensor)}
    problems += tensor_problems(expected, reference, "reader's full tensors vs 2-rank full tensors")

    warnings = [m for m in result["log"] if m.startswith("WARNING") and "2 ranks" in m]
    for name in ("rng", "dataloader"):
        if not any(f"'{name}'" in m for m in warnings):
            problems.append(
                f"1-process load did not warn that per-rank state '{name}' of 2 ranks cannot be "
                f"exact; its log: {result['log']}"
            )
    return problems


def test_two_rank_checkpoint_loads_on_one_process(mesh, shared_tmp):
    seed_per_rank(40)
    model, optimizer, scheduler = build_sharded(mesh, with_scheduler=True)
    loader = StatefulDataLoader(torch.arange(64), batch_size=4, shuffle=True)
    batches = iter(loader)
    next(batches), next(batches)  # a mid-epoch position to save
    train_sharded(model, optimizer, scheduler, 3, first_batch=0)
    root = shared_tmp / "ckpt"
    with CheckpointManager(
        root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader
    ) as mgr:
        step_dir = mgr.save(3)
    expected = full_state(model, optimizer)  # collective: on both ranks

    problems: list[str] = []
    if dist.get_rank() == 0:
        out = shared_tmp / "one-process.pt"
        try:
            problems = _load_in_one_process(root, out)
            if not problems:
                problems = _check_one_process_result(out, expected, step_dir)
        except Exception:  # noqa: BLE001 - reported on both ranks below, not raised on one
            problems = [traceback.format_exc()]
    assert_all_ranks(problems)  # rank 1 waits here while rank 0 runs the 1-process load
