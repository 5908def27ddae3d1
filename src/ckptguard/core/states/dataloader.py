"""The dataloader's position (torchdata ``StatefulDataLoader``), with what torchdata's state
leaves out at an epoch boundary: the sampler's epoch and whether the epoch's last batch was
yielded. Per-rank state: never borrowed from another rank."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ckptguard.core.states.base import Stateful
from ckptguard.core.states.objects import ObjectState
from ckptguard.errors import UnsupportedStateError

logger = logging.getLogger(__name__)


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
