"""First divergence between a resumed run and the run it continues, with its likely cause.

A resumed segment (resumed from checkpoint step K) is compared, step by step, with what the run
that wrote checkpoint K recorded after K before it was preempted (``build_reference``). What
differs first says where to look, in this order, because each explains the ones after it:

1. the batch hash: the data order (dataloader/sampler position); a batch the earlier run saw
   at an earlier step means the loader restarted;
2. the LR: the scheduler (not restored, or another schedule);
3. train/eval mode: the model was left in eval mode (or the reverse);
4. an RNG stream: reseeded after load (a ``set_seed`` after resuming) or extra draws;
5. the loss alone: on the first resumed step the model's weights (the optimizer has not acted
   yet), on a later step the optimizer state (or an extra such as a GradScaler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckptguard.guard.findings import Divergence
from ckptguard.guard.trace import Segment, read_trace, trace_files


@dataclass
class Reference:
    """What earlier segments recorded: per step after the resume point, and every batch seen."""

    resumed_from: int
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    batch_first_seen: dict[str, int] = field(default_factory=dict)
    world_size: int | None = None
    losses_before: dict[int, float] = field(default_factory=dict)  # steps <= resumed_from, for plots


def build_reference(earlier: list[Segment], resumed_from: int, rtol: float = 0.0) -> Reference:
    """The reference for a segment that resumed from ``resumed_from``, from the earlier ones.

    Records after the resume point come from the lineage of the checkpoint: the segment that
    saved it (the last one with a ``save`` line for that step), then, for steps it did not
    reach, that segment's own reference, but only if it matched it: a run that diverged after
    its own resume is no longer the training the older records describe. Traces without save
    lines fall back to the latest earlier segment that recorded each step.
    """
    ref = Reference(resumed_from)
    for seg in earlier:
        for step, rec in seg.records.items():
            if step <= resumed_from:
                ref.losses_before[step] = float.fromhex(rec["loss"])
            b = rec.get("batch")
            if b is not None and (b not in ref.batch_first_seen or step < ref.batch_first_seen[b]):
                ref.batch_first_seen[b] = step
    writer = max((i for i, seg in enumerate(earlier) if resumed_from in seg.saves), default=None)
    if writer is None:
        for seg in earlier:  # in file order: later segments overwrite earlier ones
            _take_after(ref, seg.records, seg.world_size, overwrite=True)
        return ref
    seg = earlier[writer]
    _take_after(ref, seg.records, seg.world_size, overwrite=True)
    # a rollback's branch has no lineage after its start: the run before it was abandoned
    if 0 < seg.resumed_from < resumed_from and not seg.is_branch:
        parent = build_reference(earlier[:writer], seg.resumed_from, rtol)
        if compare_segment(parent, seg, rank=0, rtol=rtol).divergence is None:
            _take_after(ref, parent.records, parent.world_size, overwrite=False)
    return ref


def _take_after(ref: Reference, records: dict[int, dict[str, Any]], world_size: int | None, *, overwrite: bool) -> None:
    for step, rec in records.items():
        if step > ref.resumed_from and (overwrite or step not in ref.records):
            ref.records[step] = rec
            if world_size is not None and ref.world_size is None:
                ref.world_size = world_size


def _close(a_hex: str, b_hex: str, rtol: float) -> bool:
    if a_hex == b_hex:
        return True
    if rtol <= 0:
        return False
    a, b = float.fromhex(a_hex), float.fromhex(b_hex)
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def _lrs_close(a: list[str], b: list[str], rtol: float) -> bool:
    return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b, strict=True))


def _floats(v: Any) -> Any:
    if isinstance(v, str):
        return float.fromhex(v)
    if isinstance(v, list):
        return [_floats(x) for x in v]
    return v


def compare_record(
    ref: dict[str, Any],
    rec: dict[str, Any],
    *,
    rank: int,
    resumed_from: int,
    first_compared: bool,
    batch_first_seen: dict[str, int],
    rtol: float = 0.0,
) -> Divergence | None:
    """``None`` if ``rec`` matches ``ref`` (exactly, or within ``rtol`` for loss and LR)."""
    fields = []
    if ref.get("batch") is not None and rec.get("batch") is not None and ref["batch"] != rec["batch"]:
        fields.append("batch")
    if "lr" in ref and "lr" in rec and not _lrs_close(ref["lr"], rec["lr"], rtol):
        fields.append("lr")
    if "train" in ref and "train" in rec and ref["train"] != rec["train"]:
        fields.append("train_mode")
    rng_ref, rng_rec = ref.get("rng") or {}, rec.get("rng") or {}
    rng_bad = sorted(k for k in rng_ref.keys() & rng_rec.keys() if rng_ref[k] != rng_rec[k])
    if rng_bad:
        fields.append("rng")
    if not _close(ref["loss"], rec["loss"], rtol):
        fields.append("loss")
    if not fields:
        return None

    step = int(rec["step"])
    shown = {k: _floats(ref.get(k2)) for k, k2 in (("loss", "loss"), ("lr", "lr"))}
    got = {k: _floats(rec.get(k2)) for k, k2 in (("loss", "loss"), ("lr", "lr"))}
    for d, r in ((shown, ref), (got, rec)):
        d["batch"] = r.get("batch")
        d["train_mode"] = r.get("train")
        d["rng"] = r.get("rng")
    rng_note = (
        f" The RNG state differs too ({', '.join(rng_bad)}): if the data pipeline draws random "
        "augmentation, a reseeded RNG changes batches as well." if rng_bad else ""
    )
    if "batch" in fields:
        cause = "dataloader"
        seen = batch_first_seen.get(rec["batch"])
        if seen is not None and seen != step:
            msg = (
                f"the batch of step {step} is the batch the earlier run used at step {seen}: the "
                "data order restarted or repeated. The dataloader's position was not restored "
                "(a new loader not handed to the manager, or iter() of a loader that restarts)."
            )
        else:
            msg = (
                f"the batch of step {step} differs from the earlier run's (crc32 {rec['batch']} vs "
                f"{ref['batch']}): a different data order. The dataloader/sampler state (position, "
                "shuffle seed or epoch) was not restored."
            )
        msg += rng_note
    elif "lr" in fields:
        cause = "lr_scheduler"
        msg = (
            f"same batch, but the LR at step {step} is {got['lr']} vs {shown['lr']} in the earlier "
            "run: the LR scheduler was not restored, or its schedule changed."
        )
    elif "train_mode" in fields:
        cause = "model"
        mode = "train" if rec.get("train") else "eval"
        msg = (
            f"the model is in {mode} mode at step {step}, the earlier run was not: dropout and "
            "batch-norm behave differently. Call model.train() (or eval()) as the original run did."
        )
    elif "rng" in fields:
        cause = "rng"
        msg = (
            f"same batch and LR, but the {', '.join(rng_bad)} RNG state after step {step} differs: "
            "the RNG was reseeded after load() (a manual_seed/set_seed call when resuming) or drew "
            "a different number of values (an extra evaluation, a new iterator)."
        )
    elif first_compared and step == resumed_from + 1:
        cause = "model"
        msg = (
            f"same batch, LR and RNG, but the loss of the first resumed step {step} is "
            f"{got['loss']!r} vs {shown['loss']!r}: the optimizer has not acted yet, so the model's "
            "weights or buffers are not the saved ones (modified or reloaded after load()), or the "
            "kernels are nondeterministic (device, torch version, deterministic flag)."
        )
    else:
        cause = "optimizer"
        msg = (
            f"same batch, LR and RNG, but the loss of step {step} is {got['loss']!r} vs "
            f"{shown['loss']!r}, after the resumed steps before it matched: the updates differ, "
            "so the optimizer state (moments, step count) is not the saved one: a new optimizer "
            "object not handed to the manager, optimizer.load_state_dict(...) of other state "
            "after load(), or an extra such as a GradScaler not restored."
        )
    return Divergence(step, rank, cause, fields, msg, resumed_from, shown, got)


@dataclass
class SegmentComparison:
    compared_steps: int = 0
    divergence: Divergence | None = None
    skipped: str | None = None


def compare_segment(
    ref: Reference, seg: Segment, *, rank: int, rtol: float = 0.0
) -> SegmentComparison:
    """Compare a resumed segment's records with the reference, stopping at the first divergence."""
    out = SegmentComparison()
    if seg.is_branch:
        branch = seg.header["branch"]
        out.skipped = (
            f"a rollback: a new branch from step {seg.resumed_from}, expected to differ from the "
            f"abandoned run (its steps {', '.join(map(str, branch.get('abandoned_steps', [])))})"
        )
        return out
    if ref.world_size is not None and seg.world_size is not None and ref.world_size != seg.world_size:
        out.skipped = f"world size changed from {ref.world_size} to {seg.world_size}; per-rank traces are not comparable"
        return out
    for step in seg.steps:
        if step not in ref.records:
            continue
        div = compare_record(
            ref.records[step], seg.records[step], rank=rank, resumed_from=ref.resumed_from,
            first_compared=out.compared_steps == 0, batch_first_seen=ref.batch_first_seen, rtol=rtol,
        )
        out.compared_steps += 1
        if div is not None:
            out.divergence = div
            break
    return out


def resumes_in(segments: list[Segment], rtol: float = 0.0) -> list[tuple[Segment, Reference]]:
    """Every segment that resumed from a checkpoint, with the reference built from those before."""
    out = []
    for i, seg in enumerate(segments):
        if seg.resumed_from > 0:
            out.append((seg, build_reference(segments[:i], seg.resumed_from, rtol)))
    return out


@dataclass
class RunsComparison:
    """Two runs of one trainer compared by their traces (``ckptguard.testing``'s legs).

    ``before``: the interrupted run already differed from the uninterrupted one before it was
    stopped, so the trainer is not deterministic and no resume is to blame; ``after``: the first
    divergence of the resumed run. ``compared_steps`` counts steps compared on all ranks.
    """

    before: Divergence | None = None
    after: Divergence | None = None
    compared_steps: int = 0


def compare_traces(reference_root: Any, resumed_root: Any, *, stop_at: int, rtol: float = 0.0) -> RunsComparison | None:
    """Compare an uninterrupted run's trace with an interrupted-then-resumed run's, per rank.

    ``None`` when either root has no trace (the trainer does not call ``mgr.record``).
    """
    ref_files, got_files = trace_files(reference_root), trace_files(resumed_root)
    if not ref_files or not got_files:
        return None
    out = RunsComparison()
    for rank in sorted(ref_files.keys() & got_files.keys()):
        reference: dict[int, dict[str, Any]] = {}
        for seg in read_trace(ref_files[rank]):
            reference.update(seg.records)
        seen: dict[str, int] = {}
        for step in sorted(reference, reverse=True):
            if reference[step].get("batch") is not None:
                seen[reference[step]["batch"]] = step
        for seg in read_trace(got_files[rank]):
            start = seg.resumed_from
            ref = Reference(start, {s: r for s, r in reference.items() if s > start and (start or s <= stop_at)}, seen)
            cmp = compare_segment(ref, seg, rank=rank, rtol=rtol)
            out.compared_steps += cmp.compared_steps
            d = cmp.divergence
            if d is None:
                continue
            if start == 0 and (out.before is None or d.step < out.before.step):
                out.before = d
            elif start and (out.after is None or d.step < out.after.step):
                out.after = d
    return out
