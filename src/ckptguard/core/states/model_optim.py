"""The model and optimizer, through DCP's ``get/set_*_state_dict``: tensors, sharded across
ranks, reshardable. Also the plain facts about them the manifest records."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ckptguard.core.states.base import MODEL, OPTIMIZER
from ckptguard.errors import StateMismatchError, UnsupportedStateError

logger = logging.getLogger(__name__)


class ModelOptimizerState:
    """Model and optimizer through DCP's ``get/set_*_state_dict``.

    Why not ``model.state_dict()`` / ``optimizer.state_dict()``: raw optimizer state is keyed by
    integer position, which breaks when parameter groups are built in another order;
    ``get_optimizer_state_dict`` keys it by parameter FQN and handles DDP, FSDP2/DTensor and
    plain modules alike.

    Why two ways to build the state dict. DCP initialises an optimizer with no state by running
    a zero-LR ``step()`` on zero gradients (``_init_optim_state``) so that a load template asks
    for the moments. That is wrong for a save and unreliable for a load:

    * ``state_dict()`` (what a save writes) must be the state *as it is*. Initialising it would
      make a checkpoint taken before the first ``optimizer.step()`` (``save(0)``) start AdamW's
      step count at 1 and change the rest of the run. It never steps and never initialises.
    * ``load_template(saved_keys)`` (what a load reads into) must ask for exactly what the
      checkpoint holds. DCP skips its initialisation when any ``.grad`` exists (a warm-up
      backward before ``load()``, pytorch#140898), and the moments would not be loaded; so the
      template initialises the state itself with the user's gradients set aside and put back
      untouched, and leaves out the parameters the checkpoint has no state for (a save before
      the first step, a parameter that never had a gradient), which then load without state,
      exactly as they were saved.
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
        """The live state as it is (FQN-keyed); never steps or initialises the optimizer."""
        sd: dict[str, Any] = {MODEL: get_model_state_dict(self.model)}
        if self.optimizer is not None:
            sd[OPTIMIZER] = self._optimizer_state_dict()
        return sd

    def load_template(self, saved_keys: Collection[str]) -> dict[str, Any]:
        """The state dict to ``dcp.load`` a checkpoint into, given its flattened keys.

        Every parameter the checkpoint holds optimizer state for has its tensors here, whatever
        the live optimizer holds and whether or not gradients exist; a parameter without saved
        state has none here and loads without state. May initialise the live optimizer (a
        zero-LR step on zero gradients, on a state set aside first): the load replaces it.
        The user's ``.grad`` tensors are the same objects with the same values afterwards.
        """
        sd: dict[str, Any] = {MODEL: get_model_state_dict(self.model)}
        if self.optimizer is None:
            return sd
        osd = self._optimizer_state_dict()
        with_state = _fqns_with_saved_state(saved_keys)
        wanted = {fqn for fqn in _param_fqns(osd) if fqn in with_state}
        if wanted - set(osd["state"]):
            osd = self._initialised_optimizer_state_dict()
        osd["state"] = {fqn: s for fqn, s in osd["state"].items() if fqn in wanted}
        sd[OPTIMIZER] = osd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        # A copy: DCP renames the keys of the dict it is handed in place, to the wrapper's names
        # (``module.x`` under DDP, ``_orig_mod.x`` under torch.compile), and the guard's read-back
        # still compares this dict with the live model afterwards.
        set_model_state_dict(self.model, dict(state_dict[MODEL]), options=StateDictOptions(strict=strict))
        if self.optimizer is None:
            return
        osd = state_dict[OPTIMIZER]
        if strict:
            self._check_params_in_saved_groups(osd)
        # strict=False: DCP's strict check refuses a parameter without state, which a checkpoint
        # saved before the first step (or before a parameter got its first gradient) legitimately
        # has; the keys were checked strictly before the load (guard.statecheck.check_keys) and
        # the parameters just above.
        with _lazy_init_disabled(self.optimizer):
            set_optimizer_state_dict(
                self.model, self.optimizer, osd, options=StateDictOptions(strict=False)
            )

    # ------------------------------------------------------------------ optimizer internals

    def _optimizer_state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        with _lazy_init_disabled(self.optimizer):
            osd = get_optimizer_state_dict(self.model, self.optimizer)
        osd["state"] = {fqn: s for fqn, s in osd["state"].items() if s}
        return osd

    def _initialised_optimizer_state_dict(self) -> dict[str, Any]:
        """DCP's initialisation on a cleared state, with the user's gradients set aside.

        DCP initialises only an optimizer without state and without gradients; clearing a
        partial state is safe because the load that follows replaces the whole state.
        """
        assert self.optimizer is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        self.optimizer.state.clear()
        try:
            for p in params:
                p.grad = None
            osd = get_optimizer_state_dict(self.model, self.optimizer)
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        logger.debug(
            "initialised the optimizer state (zero-LR step) to build the load template; the "
            "gradients of %d parameters were set aside and put back",
            sum(g is not None for g in grads),
        )
        return osd

    def _check_params_in_saved_groups(self, loaded: dict[str, Any]) -> None:
        """A live parameter without loaded state must be one the saved optimizer had (it had
        no state yet); one it never had is a mismatch that DCP would load silently."""
        live = _param_fqns(self._optimizer_state_dict())
        saved = set(_param_fqns(loaded))
        unknown = [fqn for fqn in live if fqn not in loaded["state"] and fqn not in saved]
        if unknown:
            raise StateMismatchError(
                f"{len(unknown)} parameter(s) of the live optimizer are not in the checkpoint's "
                f"optimizer: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}. Build "
                "the optimizer over the parameters it was saved with, or load with strict=False "
                "to start their optimizer state from scratch."
            )


@contextmanager
def _lazy_init_disabled(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Stop DCP's ``get/set_optimizer_state_dict`` from stepping an optimizer without state.

    DCP initialises only when ``optimizer.state`` is empty. An empty entry for one parameter
    is how torch's own optimizers mark "no state yet" (``self.state[p]``, then ``if not
    state:``), so it changes nothing an optimizer does; it is removed again on the way out
    (the object may be a new one if ``load_state_dict`` ran in between).
    """
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    added = first is not None and not optimizer.state
    if added:
        optimizer.state[first] = {}
    try:
        yield
    finally:
        if added and first in optimizer.state and not optimizer.state[first]:
            del optimizer.state[first]


def _param_fqns(osd: dict[str, Any]) -> list[str]:
    """The parameter FQNs of an FQN-keyed optimizer state dict, in group order."""
    return [fqn for group in osd.get("param_groups", []) for fqn in group.get("params", [])]


def _fqns_with_saved_state(saved_keys: Collection[str]) -> set[str]:
    """Candidate FQNs of the parameters a checkpoint's flattened keys hold optimizer state for.

    ``optimizer.state.<fqn>.<name>[.<nested>]``: every dotted prefix of what follows
    ``optimizer.state.`` is a candidate, so a state name with dots cannot hide a parameter (and
    ``a.b`` cannot be both a parameter and a module, so no prefix is mistaken for another).
    """
    head = f"{OPTIMIZER}.state."
    out: set[str] = set()
    for key in saved_keys:
        if key.startswith(head):
            parts = key[len(head):].split(".")
            out.update(".".join(parts[:n]) for n in range(1, len(parts)))
    return out


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
