"""Thin helpers over torch.distributed that also work when no process group exists.

ckptguard runs the same code path with one process and under torchrun; these helpers make the
single-process case a world of size one instead of a branch in every caller.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from ckptguard.errors import CheckpointError, CommitError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def new_cpu_group() -> dist.ProcessGroup | None:
    """A gloo group for ckptguard's own collectives and DCP's.

    Keeping checkpoint traffic off the training group avoids two known traps: NCCL cannot move
    the CPU objects DCP exchanges, and a barrier on the group an ``async_save`` background thread
    is using can deadlock (KempnerForge#102/#104). Every rank must call this at the same point.
    """
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo")


def destroy_group(group: dist.ProcessGroup | None) -> None:
    """Destroy a group made by ``new_cpu_group``: its sockets and gloo threads go with it.

    Local to this process (``destroy_process_group`` of a non-default group makes no
    collective call), so ranks may do it at different moments once none of them uses the group.
    A group whose world was destroyed (or re-initialised) already is gone: nothing to do.
    """
    if group is None or not is_distributed():
        return
    try:
        dist.destroy_process_group(group)
    except ValueError:  # "Invalid process group specified": not in this world any more
        pass


def dcp_kwargs(group: dist.ProcessGroup | None) -> dict[str, Any]:
    """The process-group arguments of ``dcp.save``/``load``/``async_save``: ``group`` in a
    distributed job, else ``no_dist`` (one process; DCP would otherwise warn or fail)."""
    return {"process_group": group} if is_distributed() else {"no_dist": True}


def barrier(group: dist.ProcessGroup | None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def broadcast_object(obj: Any, group: dist.ProcessGroup | None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------- ranks agreeing on failures


def describe_error(e: BaseException) -> str:
    """One line per cause; DCP's CheckpointException otherwise prints whole tracebacks."""
    if isinstance(e, CheckpointException):
        return "; ".join(
            f"{type(exc).__name__}: {exc} (DCP, rank {rank})" for rank, (exc, _) in e.failures.items()
        )
    return f"{type(e).__name__}: {e}" if not isinstance(e, CheckpointError) else str(e)


def free_space_hint(path: str | os.PathLike) -> str:
    """A hint for write errors whose own text hides a full disk (torch's zip writer reports a
    short write as "unexpected pos")."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    return f" ({st.f_bavail * st.f_frsize / 2**30:.2f} GiB free on the file system of {path})"


def on_rank0_then_all(fn: Callable[[], Any], group: dist.ProcessGroup | None, error: type) -> Any:
    """Run ``fn`` on rank 0 and hand its result, or its error (as ``error``, or the
    CheckpointError subclass it raised), to every rank. One process: ``fn``'s errors propagate."""
    result = error_text = None
    if get_rank() == 0:
        try:
            result = fn()
        except CheckpointError as e:
            if not is_distributed():
                raise
            error_text, error = str(e), type(e)
        except Exception as e:
            if not is_distributed():
                raise
            error_text = f"{type(e).__name__}: {e}"
    result, error_text, error = broadcast_object((result, error_text, error), group)
    if error_text is not None:
        raise error(error_text)
    return result


def on_every_rank(
    fn: Callable[[], Any], group: dist.ProcessGroup | None, what: str, error: type,
    root: str | os.PathLike, *, every_result: bool = False,
) -> Any:
    """Run ``fn`` on every rank; if it fails on any rank, raise ``error`` on every rank.

    A rank that fails alone (a full disk, a user's ``state_dict()`` hook, a read error on one
    host) must not leave the others waiting in the next collective, nor let them go on with a
    state their peer could not write or restore. This is ckptguard's one way to agree on a
    local step's outcome: one ``all_gather`` of a small object. The message names each failing
    rank and its cause; an ``OSError`` carries no file name, so ``what`` names the path being
    written or read. The error is the ``CheckpointError`` subclass the failing ranks raised if
    they agree on one, else ``error``; on the rank that failed it is chained to the original.

    ``every_result``: return every rank's result (a list by rank; keep them small: they are
    pickled) instead of this rank's, so that a decision taken on them is the same everywhere.
    """
    result = failure = None
    local_error: BaseException | None = None
    try:
        result = fn()
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        if not is_distributed() and isinstance(e, CheckpointError):
            raise
        local_error = e
        failure = (type(e) if isinstance(e, CheckpointError) else None, describe_error(e))
    gathered = all_gather_object((failure, result if every_result and failure is None else None), group)
    failures = {rank: f for rank, (f, _) in enumerate(gathered) if f}
    if not failures:
        return [r for _, r in gathered] if every_result else result
    kinds = {kind for kind, _ in failures.values()}
    if len(kinds) == 1 and None not in kinds:
        error = kinds.pop()
    # ranks that failed the same way (DCP's agreed errors, a check every rank made) are named once
    by_text: dict[str, list[int]] = {}
    for rank, (_, text) in failures.items():
        by_text.setdefault(text, []).append(rank)
    causes = "; ".join(
        (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: " if get_world_size() > 1 else "")
        + text for text, ranks in by_text.items()
    )
    if error is CommitError:
        raise CommitError(
            f"{what} failed: {causes}{free_space_hint(root)}. The checkpoint was not committed "
            "and the previous ones are untouched; fix the cause (e.g. free disk space) and "
            "save again."
        ) from local_error
    raise error(f"{what} failed: {causes}") from local_error


class quiet_no_dist(warnings.catch_warnings):
    """DCP warns on every single-process call; we pass ``no_dist`` on purpose."""

    def __enter__(self) -> Any:
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return out
