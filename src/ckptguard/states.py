"""One adapter per kind of training state, all speaking the ``state_dict``/``load_state_dict``
protocol, so the manager only iterates over named states.

Two homes on disk:

* ``ModelOptimizerState`` goes through DCP: tensors, sharded across ranks, reshardable.
* Every other adapter goes into the rank's own ``rank-NNNNN.pt`` (small, per rank, loaded with
  ``weights_only=True``). ``per_rank`` says whether another rank's copy may stand in when the
  world size changed: a scheduler's may, a dataloader position or an RNG stream may not.

To add a kind of state: write an adapter here and list it in ``build_rank_states``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ckptguard.errors import UnsupportedStateError
from ckptguard.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
DATALOADER = "dataloader"
RNG = "rng"
EXTRA_PREFIX = "extra."


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def _require_stateful(obj: Any, setting: str) -> None:
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
    if missing:
        raise UnsupportedStateError(
            f"{setting}={type(obj).__name__} has no {' or '.join(missing)}(); ckptguard can only "
            "checkpoint objects that can report and restore their state."
        )


class ModelOptimizerState:
    """Model and optimizer through DCP's ``get/set_*_state_dict``.

    Why not ``model.state_dict()`` / ``optimizer.state_dict()``: a freshly built optimizer has an
    empty state (AdamW creates ``exp_avg``/``exp_avg_sq`` lazily on the first ``step()``), so a
    DCP load template built from it asks for nothing and the moments are silently dropped; and
    raw optimizer state is keyed by integer position, which breaks when parameter groups are
    built in another order. ``get_optimizer_state_dict`` initialises the state first and keys it
    by parameter FQN; both handle DDP, FSDP2/DTensor and plain modules alike.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if not isinstance(model, nn.Module):
            raise UnsupportedStateError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise UnsupportedStateError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {MODEL: get_model_state_dict(self.model)}
        if self.optimizer is not None:
            sd[OPTIMIZER] = get_optimizer_state_dict(self.model, self.optimizer)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        options = StateDictOptions(strict=strict)
        set_model_state_dict(self.model, state_dict[MODEL], options=options)
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state_dict[OPTIMIZER], options=options)


class ObjectState:
    """Any object with ``state_dict()``/``load_state_dict()`` (scheduler, grad scaler, ...)."""

    per_rank = False

    def __init__(self, obj: Any, setting: str) -> None:
        _require_stateful(obj, setting)
        self.obj = obj

    def state_dict(self) -> Any:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        self.obj.load_state_dict(state_dict)


def _is_plain_dataloader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader) and not callable(
        getattr(obj, "state_dict", None)
    )


class DataLoaderState(ObjectState):
    """A dataloader that can say where it is, e.g. torchdata's ``StatefulDataLoader``."""

    per_rank = True

    def __init__(self, loader: Any) -> None:
        if _is_plain_dataloader(loader):
            raise UnsupportedStateError(
                "dataloader=torch.utils.data.DataLoader cannot report its position, so a resume "
                "would silently restart the epoch from its first batch (and reshuffle). Use "
                "torchdata.stateful_dataloader.StatefulDataLoader (pip install torchdata; same "
                "constructor arguments), which saves its mid-epoch position and worker state; or "
                "pass dataloader=None and restore the data position yourself."
            )
        super().__init__(loader, "dataloader")
        workers = getattr(loader, "num_workers", 0) or 0
        dataset = getattr(loader, "dataset", None)
        if workers > 0 and dataset is not None and not isinstance(dataset, Stateful):
            logger.warning(
                "dataloader has num_workers=%d and its dataset %s has no state_dict()/"
                "load_state_dict(): random draws made inside the workers (e.g. augmentation) "
                "restart from the worker seed on resume and will differ from an uninterrupted "
                "run. If the dataset draws random numbers, derive it from "
                "ckptguard.rng.WorkerRNGState (class %s(WorkerRNGState, Dataset)) so that each "
                "worker's RNG is saved with the loader.",
                workers, type(dataset).__name__, type(dataset).__name__,
            )

    def load_state_dict(self, state_dict: Any) -> None:
        self.obj.load_state_dict(state_dict)
        # Build the resumed iterator now, before the RNG is restored. Creating a DataLoader
        # iterator draws a base seed from the global torch RNG; in the uninterrupted run that draw
        # happened at the start of the epoch, long before the save. Left to the trainer's first
        # ``iter(loader)`` after ``load()``, it would shift every later dropout mask by one draw.
        # ``state_dict()`` makes StatefulDataLoader create and keep that iterator for the next
        # ``iter()``; the restore of the RNG streams, done last, then undoes the draw.
        self.obj.state_dict()


class RNGState:
    """Every RNG stream of this rank (see ``ckptguard.rng``). Restored last on purpose."""

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


def build_rank_states(
    lr_scheduler: Any | None, dataloader: Any | None, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """The per-rank-file states, in restore order: RNG must come last (see DataLoaderState)."""
    states: dict[str, Any] = {}
    if lr_scheduler is not None:
        states[LR_SCHEDULER] = ObjectState(lr_scheduler, "lr_scheduler")
    for key, obj in (extra or {}).items():
        if not isinstance(key, str) or not key:
            raise UnsupportedStateError(f"extra keys must be non-empty strings, got {key!r}")
        states[EXTRA_PREFIX + key] = ObjectState(obj, f"extra[{key!r}]")
    if dataloader is not None:
        states[DATALOADER] = DataLoaderState(dataloader)
    states[RNG] = RNGState()
    return states


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters as plain values (for the manifest and the guard)."""
    groups = []
    for group in optimizer.param_groups:
        hp = {}
        for k, v in group.items():
            if k == "params":
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float, bool, str, type(None))):
                hp[k] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
                hp[k] = list(v)
        groups.append(hp)
    return groups


def model_device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"
