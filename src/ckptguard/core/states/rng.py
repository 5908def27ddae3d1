"""Capture and restore of every RNG stream a training step can draw from, per rank.

Restoring rank 0's RNG on every rank (a common shortcut) makes all ranks draw the same dropout
masks and augmentations after resume; so each rank saves and restores its own streams.
State is kept as tensors and plain Python values so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG stream of this process: python, numpy global, torch CPU, CUDA (all devices)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Restore what ``capture_rng_state`` captured; returns streams it could not restore."""
    skipped: list[str] = []
    random.setstate(_as_python_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            skipped.append("cuda")
    return skipped


def _as_python_state(value: Any) -> tuple:
    # A round trip through torch.save keeps tuples, but be tolerant of lists (e.g. from JSON).
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


class WorkerRNGState:
    """Mixin for a Dataset that draws random numbers in DataLoader workers (augmentation).

    ``StatefulDataLoader`` resumes mid-epoch by starting new worker processes, and each worker
    reseeds python, numpy and torch from the loader's base seed: the draws a worker made before
    the save are made again, so every augmented sample after a resume differs from the
    uninterrupted run (only with ``num_workers > 0``; in the main process ckptguard's own RNG
    state covers it). ``StatefulDataLoader`` does save a *dataset's* ``state_dict()`` per worker,
    snapshotted with each batch, and restores it in the new worker before it fetches anything;
    this mixin makes that state the worker's RNG streams::

        class MyDataset(WorkerRNGState, torch.utils.data.Dataset): ...

    Define your own ``state_dict``/``load_state_dict`` instead if the dataset has more state,
    and include ``capture_rng_state()`` in it when called inside a worker.
    """

    def state_dict(self) -> dict[str, Any]:
        if torch.utils.data.get_worker_info() is None:
            return {}
        return {"worker_rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and torch.utils.data.get_worker_info() is not None:
            restore_rng_state(state_dict["worker_rng"])


class RNGState:
    """Every RNG stream of this rank (see ``ckptguard.core.states.rng``). Restored last on purpose."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        skipped = restore_rng_state(state_dict)
        if skipped:
            logger.warning(
                "RNG streams %s were saved but cannot be restored here (device count differs)",
                skipped,
            )
