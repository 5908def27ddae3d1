"""One adapter per kind of training state, all speaking the ``state_dict``/``load_state_dict``
protocol, so the manager only iterates over named states.

Two homes on disk:

* ``ModelOptimizerState`` goes through DCP: tensors, sharded across ranks, reshardable.
* Every other adapter goes into the rank's own ``rank-NNNNN.pt`` (small, per rank, loaded with
  ``weights_only=True``). ``per_rank`` says whether another rank's copy may stand in when the
  world size changed: a scheduler's may, a dataloader position or an RNG stream may not.

To add a kind of state: write an adapter here and register it in ``KINDS`` (docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
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

from ckptguard.core.states.rng import capture_rng_state, restore_rng_state
from ckptguard.errors import StateMismatchError, UnsupportedStateError

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
    """A dataloader that can say where it is, e.g. torchdata's ``StatefulDataLoader``.

    Two things torchdata's state leaves out, added under ``EPOCH_KEY`` (see ``_epoch_record``):

    * The sampler's epoch (``DistributedSampler.set_epoch``). The resumed iterator is built in
      ``load()`` (below), and building it reads the sampler's order for the epoch: with a fresh
      sampler that is epoch 0's order, whatever the trainer's ``set_epoch`` says afterwards. The
      saved epoch is set back first, so a trainer that does not call ``set_epoch`` before
      iterating also continues in the saved epoch's order.
    * Whether the epoch's last batch was yielded. Saved after the last batch but before the loop
      saw the end of the loader (``if step % steps_per_epoch == 0: save`` in the loop), torchdata
      says "not finished", and restored as is the next ``iter(loader)`` yields nothing: a loop
      that resumes at epoch ``step // steps_per_epoch`` silently skips a whole epoch. Such a
      checkpoint is restored as the *end* of its epoch, like a save after the loop: the next
      ``iter(loader)`` starts a new epoch. A loop that resumes *into* the ended epoch instead
      (its epoch kept in trainer state) says so by calling ``set_epoch`` with that epoch again;
      then the next ``iter(loader)`` yields that epoch's remaining batches, none. Without a
      sampler epoch the two loops cannot be told apart: a warning at the save says what
      ckptguard does.
    """

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
        self._warned_ambiguous = False
        workers = getattr(loader, "num_workers", 0) or 0
        dataset = getattr(loader, "dataset", None)
        if workers > 0 and dataset is not None and not isinstance(dataset, Stateful):
            logger.warning(
                "dataloader has num_workers=%d and its dataset %s has no state_dict()/"
                "load_state_dict(): random draws made inside the workers (e.g. augmentation) "
                "restart from the worker seed on resume and will differ from an uninterrupted "
                "run. If the dataset draws random numbers, derive it from "
                "ckptguard.core.states.rng.WorkerRNGState (class %s(WorkerRNGState, Dataset)) so that each "
                "worker's RNG is saved with the loader.",
                workers, type(dataset).__name__, type(dataset).__name__,
            )

    def state_dict(self) -> Any:
        state = self.obj.state_dict()
        if not isinstance(state, dict):
            return state
        record = _epoch_record(self.obj)
        if record["epoch_end"] and record["sampler_epoch"] is None and not self._warned_ambiguous:
            self._warned_ambiguous = True
            logger.warning(
                "dataloader saved after the last batch of its epoch, before the loop saw the end "
                "of the loader. After load() the next iter(loader) starts a NEW epoch, which is "
                "right for a loop that resumes at epoch step // steps_per_epoch. A loop that "
                "resumes into the epoch that just ended (its epoch kept in trainer state) would "
                "run that epoch again: resume it at the next epoch, or save after the inner loop. "
                "(Its sampler has no set_epoch(), which would let ckptguard tell the two apart.)"
            )
        return {**state, EPOCH_KEY: record}

    def load_state_dict(self, state_dict: Any) -> None:
        record = None
        if isinstance(state_dict, dict) and EPOCH_KEY in state_dict:
            state_dict = dict(state_dict)
            record = state_dict.pop(EPOCH_KEY)
        sampler = _epoch_sampler(self.obj)
        saved_epoch = record.get("sampler_epoch") if record else None
        if sampler is not None and saved_epoch is not None:
            sampler.set_epoch(saved_epoch)  # before the iterator below reads the order
        epoch_end = bool(record and record.get("epoch_end")) and _FINISHED in state_dict
        if epoch_end:
            state_dict[_FINISHED] = True
        self.obj.load_state_dict(state_dict)
        # Build the resumed iterator now, before the RNG is restored. Creating a DataLoader
        # iterator draws a base seed from the global torch RNG; in the uninterrupted run that draw
        # happened at the start of the epoch, long before the save. Left to the trainer's first
        # ``iter(loader)`` after ``load()``, it would shift every later dropout mask by one draw.
        # ``state_dict()`` makes StatefulDataLoader create and keep that iterator for the next
        # ``iter()``; the restore of the RNG streams, done last, then undoes the draw.
        self.obj.state_dict()
        if epoch_end and sampler is not None and saved_epoch is not None:
            _reenter_ended_epoch_on_set_epoch(self.obj, sampler, saved_epoch)


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


# --- epoch boundaries of a dataloader (see DataLoaderState) ---------------------------------

EPOCH_KEY = "ckptguard_epoch"  # added to a dict-shaped loader state: {"sampler_epoch", "epoch_end"}
_FINISHED = "_iterator_finished"  # torchdata's key: the loop has seen the end of the loader


def _epoch_sampler(loader: Any) -> Any | None:
    """The loader's sampler that has an epoch (``DistributedSampler`` and the like), or None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for s in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if callable(getattr(s, "set_epoch", None)) and isinstance(getattr(s, "epoch", None), int):
            return s
    return None


def _epoch_record(loader: Any) -> dict[str, Any]:
    """What torchdata's state leaves out: the sampler's epoch, and whether every batch of the
    current epoch was yielded while the iterator does not know yet that it is finished."""
    sampler = _epoch_sampler(loader)
    it = getattr(loader, "_iterator", None)
    epoch_end = False
    if it is not None and not getattr(it, "_finished", True) and not isinstance(
        getattr(loader, "dataset", None), torch.utils.data.IterableDataset
    ):
        try:
            epoch_end = getattr(it, "_num_yielded", 0) >= len(loader)
        except TypeError:  # no length: cannot tell
            pass
    return {"sampler_epoch": sampler.epoch if sampler is not None else None, "epoch_end": epoch_end}


def _reenter_ended_epoch_on_set_epoch(loader: Any, sampler: Any, ended_epoch: int) -> None:
    """Watch the trainer's first ``set_epoch`` after a load at the end of ``ended_epoch``.

    A loop that resumes at the next epoch calls ``set_epoch(ended_epoch + 1)``: nothing to do,
    the next ``iter(loader)`` starts it. A loop that resumes into the ended epoch calls
    ``set_epoch(ended_epoch)``: its next ``iter(loader)`` must yield the rest of that epoch
    (nothing), as the uninterrupted loop's iterator did, not run the epoch again. The watch is an
    attribute on the sampler instance, removed by that first call.
    """
    restored = getattr(loader, "_iterator", None)
    own = vars(sampler).get("set_epoch")
    original = sampler.set_epoch

    def set_epoch(epoch: int) -> None:
        if own is None:
            vars(sampler).pop("set_epoch", None)
        else:
            sampler.set_epoch = own
        original(epoch)
        if epoch == ended_epoch and getattr(loader, "_iterator", None) is restored and restored is not None:
            restored._finished = False
            logger.info(
                "set_epoch(%d) after loading a checkpoint saved after that epoch's last batch: "
                "the next iter(loader) finishes epoch %d (no batches left), as the uninterrupted "
                "run did", epoch, epoch,
            )

    sampler.set_epoch = set_epoch
