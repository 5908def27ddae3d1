"""The save side of the commit protocol: what each rank leaves in ``.step-N.partial/`` and how
rank 0 gathers it before committing (see ``manager`` for the sequence, ``commit`` for the renames).
``read_rank_file`` is the one reader of a rank file, for the load and for every tool.

Each rank writes its ``rank-R.pt`` and, once its DCP files are durable, a ``.done-R.json`` record
with the size and crc32 of every file it wrote, or a ``.failed-R.json`` saying why it could not.
Rank 0 polls for the records instead of joining a collective, so an async commit running in a
background thread never races the training process group, and a failed rank is noticed at once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from ckptguard.core.dist import describe_error
from ckptguard.core.format import rank_filename
from ckptguard.core.integrity import hash_files
from ckptguard.core.storage import write_bytes_durably, write_file_durably
from ckptguard.core.writer import HashingFileSystemWriter
from ckptguard.errors import CheckpointCorruptError, CommitError

logger = logging.getLogger(__name__)

DONE_PREFIX = ".done-"
FAILED_PREFIX = ".failed-"


def write_rank_file(partial: Path, step: int, rank: int, world_size: int, rank_states: dict[str, Any]) -> None:
    """This rank's non-tensor state (RNG, dataloader, scheduler, extras), fsynced."""
    payload = {
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "states": {name: state.state_dict() for name, state in rank_states.items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_file_durably(partial / rank_filename(rank), buf.getbuffer())


def read_rank_file(path: Path) -> dict[str, Any]:
    """A rank file's payload (``step``, ``rank``, ``world_size``, ``states``), read with
    ``weights_only=True`` so that a rank file can never run code; any failure is a
    ``CheckpointCorruptError`` naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointCorruptError(
            f"refusing to load {path}: it holds objects that weights_only loading does not "
            "allow, and ckptguard never writes such objects, so the file was replaced or "
            f"damaged after the save. Nothing in it was executed. ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:
        raise CheckpointCorruptError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("states", {}), dict):
        raise CheckpointCorruptError(
            f"cannot read {path}: expected a rank file (a dict with 'states'), found "
            f"{type(payload).__name__}"
        )
    return payload


def own_files(partial: Path, rank: int) -> list[str]:
    """The files ``rank`` wrote: its rank file, its DCP shards, and (rank 0) DCP's index."""
    names = [rank_filename(rank)]
    prefix = f"__{rank}_"
    names += sorted(n for n in os.listdir(partial) if n.startswith(prefix) and n.endswith(".distcp"))
    if rank == 0:
        names.append(".metadata")
    return names


def write_done_record(partial: Path, rank: int, writer: HashingFileSystemWriter | None = None) -> None:
    names = own_files(partial, rank)
    # the writer hashed its files while fsyncing them; it fsyncs and hashes any other now
    entries = writer.entries_for(partial, names) if writer is not None else hash_files(partial, names)
    record = json.dumps({"rank": rank, "files": entries}).encode()
    write_bytes_durably(partial / f"{DONE_PREFIX}{rank:05d}.json", record)


def write_failure_record(partial: Path, rank: int, error: BaseException) -> None:
    record = json.dumps({"rank": rank, "error": describe_error(error)}).encode()
    try:
        write_bytes_durably(partial / f"{FAILED_PREFIX}{rank:05d}.json", record)
    except OSError:  # a full disk may refuse this too; rank 0 then waits for the timeout
        logger.debug("could not leave a failure record in %s", partial, exc_info=True)


def collect_done_records(partial: Path, world_size: int, timeout_s: float) -> dict[str, dict]:
    """Wait for every rank's done record (rank 0); returns the manifest's ``files`` entries."""
    deadline = time.monotonic() + timeout_s
    wanted = [partial / f"{DONE_PREFIX}{r:05d}.json" for r in range(world_size)]
    while True:
        missing = [p for p in wanted if not p.exists()]
        if not missing:
            break
        failed = sorted(partial.glob(f"{FAILED_PREFIX}*.json"))
        if failed:
            reasons = "; ".join(_read_failure_record(p) for p in failed)
            raise CommitError(f"not committing {partial}: {reasons}. The previous checkpoints are untouched.")
        if time.monotonic() > deadline:
            raise CommitError(
                f"ranks {[int(p.stem[len(DONE_PREFIX):]) for p in missing]} did not finish writing "
                f"{partial} within commit_timeout_s={timeout_s}; the checkpoint was "
                "not committed and the previous one is untouched."
            )
        time.sleep(0.005)
    files: dict[str, dict] = {}
    for p in wanted:
        files.update(json.loads(p.read_text())["files"])
        p.unlink()
    return files


def _read_failure_record(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        return f"rank {record['rank']} failed: {record['error']}"
    except (OSError, ValueError, KeyError):
        return f"a rank failed ({path.name} unreadable)"
