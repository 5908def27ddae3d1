"""The resume checks that compare a checkpoint's manifest with the live training setup.

Each function takes plain values (the manifest's ``info`` and what the guard read from the live
objects) and returns findings, so each check can be read, and tested, on its own. The order in
which ``ResumeGuard`` runs them, and what it reads from the live objects, is in
``resume_guard.py``; tensor-level checks are in ``statecheck.py``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ckptguard.guard.findings import Finding, Severity

# Relative tolerance between a scheduler's closed-form LR and the LR its chained updates
# produced: their rounding differs by ~1e-15 per step, a changed schedule by far more.
LR_RTOL = 1e-9
# Hyperparameters that are not compared by check_hyperparameters: the LR moves every step (the
# LR check owns it) and ``params`` lists parameter names.
_NOT_HYPERPARAMETERS = {"lr", "params"}


@dataclass
class LiveSetup:
    """What the checks need to know about the live run, read by ``ResumeGuard``."""

    world_size: int
    components: list[str]
    optimizer_class: str | None
    optimizer_bases: list[str]  # class names in the optimizer's MRO: a subclass is the same kind
    param_groups_before_load: list[dict[str, Any]]
    torch_version: str
    device_type: str
    deterministic_algorithms: bool
    global_batch_size: int | None = None
    grad_accum_steps: int | None = None


def check_components(saved: list[str], live: list[str]) -> list[Finding]:
    """State the checkpoint holds that nothing in the live run will receive."""
    out = []
    for name in saved:
        if name in live:
            continue
        if name == "optimizer":
            out.append(Finding(
                "components", "optimizer", Severity.ERROR,
                "the checkpoint holds optimizer state (moments, step counts) but the manager was built "
                "without optimizer=: the optimizer you train with starts from empty moments. Pass it: "
                "CheckpointManager(..., optimizer=optimizer).",
                saved=name, current=None,
            ))
        elif name == "lr_scheduler":
            out.append(Finding(
                "components", "lr_scheduler", Severity.ERROR,
                "the checkpoint holds the LR scheduler's position but the manager was built without "
                "lr_scheduler=: a new scheduler restarts its schedule (warmup again) or the LR stays "
                "flat. Pass it: CheckpointManager(..., lr_scheduler=scheduler).",
                saved=name, current=None,
            ))
        elif name == "dataloader":
            out.append(Finding(
                "components", "dataloader", Severity.ERROR,
                "the checkpoint holds the dataloader's position but the manager was built without "
                "dataloader=: a new loader starts again from the first batch of the epoch. Pass it "
                "(a StatefulDataLoader), unless you restore the data position yourself.",
                saved=name, current=None,
            ))
        elif name != "rng" and name != "model":
            out.append(Finding(
                "components", name, Severity.WARNING,
                f"the checkpoint holds '{name}' but the manager was built without it: its state is "
                f"not restored. Pass it in extra= if the run still uses it.",
                saved=name, current=None,
            ))
    return out


def check_scheduler_class(saved: str | None, live: str | None) -> list[Finding]:
    """Another scheduler class restores the old one's attributes into itself without error and
    then computes its own schedule from them."""
    if not saved or not live or saved == live:
        return []
    return [Finding(
        "lr_scheduler_class", "lr_scheduler", Severity.ERROR,
        f"the checkpoint's LR scheduler is {saved}, the live one {live}: its restored state "
        f"({saved}'s attributes) is read by {live}'s formula, so the resumed schedule is neither. "
        f"Resume with a {saved}, or start the new schedule without loading the old one.",
        saved=saved, current=live,
    )]


def check_world_size(saved: int, live: int) -> list[Finding]:
    if saved == live:
        return []
    msg = (
        f"saved by {saved} rank(s), resumed on {live}: model and optimizer reshard exactly, but "
    )
    return [
        Finding("world_size", "dataloader", Severity.WARNING, msg + (
            "each rank's dataloader position belongs to its old shard of the data: ranks that "
            f"existed before (0..{min(saved, live) - 1}) continue from their own position over a "
            "differently sharded dataset, new ranks start from the beginning. Some samples will be "
            "seen twice or skipped; the run cannot continue bit-exactly."
        ), saved=saved, current=live),
        Finding("world_size", "rng", Severity.WARNING, msg + (
            "RNG streams are per rank: ranks beyond the saved ones start from fresh streams and "
            "dropout/augmentation draws differ from an uninterrupted run."
        ), saved=saved, current=live),
    ]


def check_trainer(saved: dict[str, Any], live: LiveSetup) -> list[Finding]:
    """Global batch size and gradient accumulation, when the trainer declares them; a save
    that was allowed mid accumulation."""
    out = []
    for key, what in (
        ("global_batch_size", "global batch size"),
        ("grad_accum_steps", "gradient-accumulation steps"),
    ):
        before, now = saved.get(key), getattr(live, key)
        if before is not None and now is not None and before != now:
            out.append(Finding(
                key, "trainer", Severity.WARNING,
                f"{what} changed from {before} (saved) to {now} (declared now): every step after "
                "the resume sees a different amount of data, so the run is not the one that was "
                "checkpointed; the LR schedule and step counts assume the old value. Keep "
                f"{key}={before} to resume exactly.",
                saved=before, current=now,
            ))
    micro = saved.get("micro_step") or 0
    if micro:
        out.append(Finding(
            "mid_accumulation", "trainer", Severity.WARNING,
            f"the checkpoint was saved at micro-step {micro} of a gradient accumulation "
            "(allow_mid_accumulation=True): the gradients of those micro-batches are not in a "
            "checkpoint, so the first optimizer step after the resume uses fewer of them.",
            saved=micro, current=0,
        ))
    return out


def check_hyperparameters(
    saved_groups: list[dict[str, Any]], saved_class: str | None, live: LiveSetup
) -> list[Finding]:
    """Optimizer hyperparameters your code set that differ from the saved ones.

    ``Optimizer.load_state_dict`` restores the saved param groups over the live ones, so a
    changed ``weight_decay`` or ``betas`` in the code is silently ignored after a resume. The
    live values are therefore read before the load.
    """
    out = []
    if saved_class and live.optimizer_class and saved_class not in live.optimizer_bases:
        out.append(Finding(
            "optimizer_class", "optimizer", Severity.ERROR,
            f"the checkpoint's optimizer is {saved_class}, the live one {live.optimizer_class}: its "
            "moments mean something else. Resume with the saved optimizer class.",
            saved=saved_class, current=live.optimizer_class,
        ))
        return out
    if not saved_groups or not live.param_groups_before_load:
        return out
    if len(saved_groups) != len(live.param_groups_before_load):
        out.append(Finding(
            "hyperparameters", "optimizer", Severity.ERROR,
            f"the checkpoint's optimizer has {len(saved_groups)} param group(s), the live one "
            f"{len(live.param_groups_before_load)}: parameters would get another group's "
            "hyperparameters. Build the param groups as they were when the checkpoint was saved.",
            saved=len(saved_groups), current=len(live.param_groups_before_load),
        ))
        return out
    changed = []
    for i, (s, now) in enumerate(zip(saved_groups, live.param_groups_before_load, strict=True)):
        for key in sorted((set(s) & set(now)) - _NOT_HYPERPARAMETERS):
            if not _same_value(s[key], now[key]):
                changed.append((i, key, s[key], now[key]))
    if changed:
        desc = "; ".join(f"group {i} {k}: saved {a!r}, your code {b!r}" for i, k, a, b in changed)
        fix = ", ".join(f"g['{k}'] = {b!r}" for _, k, _, b in changed[:3])
        out.append(Finding(
            "hyperparameters", "optimizer", Severity.WARNING,
            f"optimizer hyperparameters differ between the checkpoint and your code ({desc}). "
            "load() restored the saved values, so yours are ignored. If the change is on "
            f"purpose, set it after load(): for g in optimizer.param_groups: {fix}.",
            saved=[{"group": i, "key": k, "value": a} for i, k, a, _ in changed],
            current=[{"group": i, "key": k, "value": b} for i, k, _, b in changed],
        ))
    return out


def check_environment(info: dict[str, Any], torch_version_saved: str | None, live: LiveSetup) -> list[Finding]:
    out = []
    if torch_version_saved and torch_version_saved != live.torch_version:
        out.append(Finding(
            "torch_version", "environment", Severity.WARNING,
            f"saved with torch {torch_version_saved}, resumed with torch {live.torch_version}: "
            "kernels and optimizer implementations may round differently, so losses can drift "
            "from an uninterrupted run. Pin the torch version for a bit-exact resume.",
            saved=torch_version_saved, current=live.torch_version,
        ))
    device = info.get("device_type")
    if device and device != live.device_type:
        out.append(Finding(
            "device_type", "environment", Severity.WARNING,
            f"saved on {device}, resumed on {live.device_type}: the same state computes different "
            "roundings on another device; the resumed losses will not match bit for bit.",
            saved=device, current=live.device_type,
        ))
    det = info.get("deterministic_algorithms")
    if det is not None and bool(det) != live.deterministic_algorithms:
        out.append(Finding(
            "deterministic_algorithms", "environment", Severity.WARNING,
            f"torch.use_deterministic_algorithms was {det} when saved and is "
            f"{live.deterministic_algorithms} now: nondeterministic kernels make the resumed "
            f"run differ from the original. Call torch.use_deterministic_algorithms({det}) "
            "before training as the original run did.",
            saved=bool(det), current=live.deterministic_algorithms,
        ))
    return out


def check_model_mode(saved_training: bool | None, live_training: bool) -> list[Finding]:
    out = []
    if saved_training is False:
        out.append(Finding(
            "model_mode", "model", Severity.WARNING,
            "the model was in eval mode when the checkpoint was saved (saved right after an "
            "evaluation?): if the original run kept training in eval mode, dropout was off there "
            "and will be on in a resumed run that calls model.train(). Call model.train() after "
            "evaluating, before the next training step and before saving.",
            saved="eval", current="train" if live_training else "eval",
        ))
    if not live_training:
        out.append(Finding(
            "model_mode", "model", Severity.WARNING,
            "the model is in eval mode after load(): train mode is not part of a checkpoint, so "
            "dropout and batch-norm updates stay off unless the trainer calls model.train() "
            "before its next step.",
            saved="eval" if saved_training is False else "train", current="eval",
        ))
    return out


def predict_scheduler_lrs(scheduler: Any) -> list[float] | None:
    """The LR the live scheduler gives at its restored position, computed from its schedule.

    For schedulers with a closed form (LambdaLR, OneCycleLR, CosineAnnealingWarmRestarts,
    and those with ``_get_closed_form_lr``). Chained ones (MultiplicativeLR, SequentialLR,
    ReduceLROnPlateau) only know "the previous LR times a factor", which a resume restores by
    construction; ``None`` for them.
    """
    sched = torch.optim.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if isinstance(scheduler, (sched.LambdaLR, sched.OneCycleLR, sched.CosineAnnealingWarmRestarts)):
                lrs = scheduler.get_lr()
            elif hasattr(scheduler, "_get_closed_form_lr"):
                lrs = scheduler._get_closed_form_lr()
            else:
                return None
        except Exception:  # noqa: BLE001 - a prediction is a bonus; never fail a load for it
            return None
    return [float(x) for x in lrs]


def check_lr(
    saved_groups: list[dict[str, Any]],
    live_lrs: list[float],
    predicted: list[float] | None,
    *,
    scheduler_handed: bool,
    scheduler_attached: bool,
    allow_lr_change: bool,
) -> list[Finding]:
    """The LR training continues with against the LR saved with the checkpoint.

    ``live_lrs`` is read after the whole load, ``predicted`` is what the live scheduler's
    schedule gives at its restored position. ``scheduler_attached`` means the param groups
    carry ``initial_lr``: some LRScheduler drives this optimizer.
    """
    out = []
    saved_lrs = [g.get("lr") for g in saved_groups]
    if scheduler_attached and not scheduler_handed:
        out.append(Finding(
            "lr", "lr_scheduler", Severity.ERROR,
            "the optimizer's param groups carry 'initial_lr', so an LR scheduler drives it, but no "
            "lr_scheduler= was handed to the manager: its position is neither saved nor restored. "
            "After the resume the schedule restarts from its beginning (a new scheduler) or the "
            "LR stays flat at the saved value (no scheduler). Pass CheckpointManager(..., "
            "lr_scheduler=scheduler) and build the scheduler before load().",
            saved=saved_lrs, current=live_lrs,
        ))
    for source, lrs in (("the optimizer after load", live_lrs), ("the live scheduler's schedule", predicted)):
        if lrs is None or len(lrs) != len(saved_lrs) or any(s is None for s in saved_lrs):
            continue
        bad = [(i, s, n) for i, (s, n) in enumerate(zip(saved_lrs, lrs, strict=True)) if not math.isclose(s, n, rel_tol=LR_RTOL)]
        if not bad:
            continue
        detail = "; ".join(f"group {i}: saved {s!r}, now {n!r} ({_relative(s, n)})" for i, s, n in bad)
        if allow_lr_change:
            out.append(Finding(
                "lr", "lr_scheduler", Severity.INFO,
                f"the LR from {source} differs from the LR saved with the checkpoint ({detail}); "
                "accepted because allow_lr_change=True.",
                saved=saved_lrs, current=lrs,
            ))
        else:
            out.append(Finding(
                "lr", "lr_scheduler", Severity.ERROR,
                f"the LR from {source} differs from the LR saved with the checkpoint ({detail}): the "
                "schedule changed (other total steps, warmup, scheduler class) or the scheduler was "
                "not restored, so the resumed run trains with another LR than the original. Build "
                "the scheduler as in the saved run, or pass allow_lr_change=True if the change is "
                "on purpose.",
                saved=saved_lrs, current=lrs,
            ))
        break  # one LR finding: the optimizer's LR is the one that trains
    return out


def _relative(saved: float, now: float) -> str:
    if saved == 0:
        return "saved LR is 0"
    return f"{(now - saved) / saved:+.2%}"


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b
