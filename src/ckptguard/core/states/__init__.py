"""One adapter per kind of training state, all speaking the ``state_dict``/``load_state_dict``
protocol, so the manager only iterates over named states.

Two homes on disk:

* ``ModelOptimizerState`` goes through DCP: tensors, sharded across ranks, reshardable.
* Every other adapter goes into the rank's own ``rank-NNNNN.pt`` (small, per rank, loaded with
  ``weights_only=True``). ``per_rank`` says whether another rank's copy may stand in when the
  world size changed: a scheduler's may, a dataloader position or an RNG stream may not.

One module per kind: ``model_optim`` (DCP), ``objects`` (scheduler, extras), ``dataloader``
(incl. the epoch-boundary record), ``rng``; ``base`` holds the names and the protocol. This
package keeps the registry (``KINDS``, ``build_rank_states``) and re-exports the adapters. To add
a kind of state: write its adapter and register it in ``KINDS`` (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckptguard.core.states.base import (
    DATALOADER,
    EXTRA_PREFIX,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    RNG,
    Stateful,
    require_stateful,
)
from ckptguard.core.states.dataloader import EPOCH_KEY, DataLoaderState
from ckptguard.core.states.model_optim import (
    ModelOptimizerState,
    model_device_type,
    optimizer_hyperparameters,
)
from ckptguard.core.states.objects import ObjectState
from ckptguard.core.states.rng import RNGState, capture_rng_state, restore_rng_state
from ckptguard.errors import UnsupportedStateError

__all__ = [
    "DATALOADER", "EPOCH_KEY", "EXTRA_PREFIX", "KINDS", "LR_SCHEDULER", "MODEL", "OPTIMIZER", "RNG",
    "DataLoaderState", "ModelOptimizerState", "ObjectState", "RNGState", "Stateful",
    "build_rank_states", "capture_rng_state", "model_device_type", "optimizer_hyperparameters",
    "require_stateful", "restore_rng_state",
]


# More kinds of per-rank state, each saved in the rank file under its name and restored before
# the RNG: name -> a function building its adapter (see docs/architecture.md, "Adding a state kind").
KINDS: dict[str, Callable[[], Any]] = {}


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
    for name, make in KINDS.items():
        states[name] = make()
    states[RNG] = RNGState()
    return states
