"""The load side of a checkpoint's per-rank files: which rank file a rank reads, what it may
restore from it when the world size changed, and how a damaged file is named.

Per-rank states (dataloader position, RNG streams) belong to the rank that saved them: after a
world-size change they are restored only on ranks that existed before, and a warning says the
resume cannot be bit-exact. Replicated states (scheduler, extras) are read from any rank's file.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import CheckpointException

from ckptguard.core.format import rank_filename
from ckptguard.core.records import read_rank_file
from ckptguard.core.states import DATALOADER, EXTRA_PREFIX, LR_SCHEDULER
from ckptguard.errors import CheckpointCorruptError, StateMismatchError

logger = logging.getLogger(__name__)


def load_rank_file(
    step_dir: Path, manifest: dict[str, Any], rank: int, world_size: int, rank_states: dict[str, Any]
) -> None:
    """Restore ``rank_states`` (in their order: RNG last) from this rank's file."""
    saved_world = manifest["world_size"]
    same_rank = rank < saved_world
    path = step_dir / rank_filename(rank if same_rank else 0)
    states = read_rank_file(path).get("states")
    if states is None:
        raise CheckpointCorruptError(f"cannot read {path}: it holds no 'states'")
    for name, state in rank_states.items():
        if name not in states:
            if manifest.get("save_mode") == "migrate":
                # The old format never held it; refusing would force the user to drop the
                # dataloader from the manager, and then no later checkpoint would hold it either.
                logger.warning(
                    "%s was migrated from an old-format checkpoint that holds no '%s' state: it "
                    "keeps its current state (a dataloader starts from its first batch); "
                    "checkpoints saved from now on hold it", step_dir, name,
                )
                continue
            if name in (DATALOADER, LR_SCHEDULER) or name.startswith(EXTRA_PREFIX):
                raise StateMismatchError(
                    f"{step_dir} holds no '{name}' state (it has {sorted(states)}); the "
                    f"checkpoint was saved without it. Build the manager without {name} or "
                    "start a new run."
                )
            continue
        if getattr(state, "per_rank", False) and (not same_rank or saved_world != world_size):
            logger.warning(
                "%s: saved by %d ranks, loading on %d: per-rank state '%s' of rank %d is %s; "
                "the resume reshards exactly but cannot continue bit-exactly",
                step_dir, saved_world, world_size, name, rank,
                "restored from its own rank file" if same_rank else "not restored",
            )
            if not same_rank:
                continue
        state.load_state_dict(states[name])


def is_read_failure(e: BaseException) -> bool:
    """Whether a DCP load failed reading files (damage), rather than fitting them (mismatch)."""
    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    return bool(causes) and all(
        isinstance(c, (OSError, EOFError, pickle.UnpicklingError))
        # torch 2.13 wraps an unreadable .metadata in an AssertionError with these words
        or (isinstance(c, AssertionError) and "metadata read failed" in str(c))
        for c in causes
    )
