"""The step an old checkpoint was saved at, from what it holds, for ``migrate`` without ``--step``.

Old trainers record the step in different places, or only implicitly:

- the optimizer's per-parameter ``step`` (Adam, AdamW, Adagrad, RMSprop... count their updates;
  the highest count over the parameters is the number of ``optimizer.step()`` calls that
  updated anything: a parameter without a gradient on some steps counts fewer);
- an LR scheduler's ``last_epoch`` (the number of ``scheduler.step()`` calls; per-step
  schedulers match the optimizer, per-epoch ones do not);
- a ``step`` / ``global_step`` / ``iteration`` / ``iter`` key, at the top or in a small dict
  beside the states (``train_state.step``).

ckptguard's step is the number of completed optimizer steps (``save(step)`` after ``step``
updates; ``load()`` returns it as the next loop's start). Every source above counts the same
thing when the trainer stepped the scheduler once per optimizer step and saved its step after
the update, so the sources must agree; when they do not (a 0-based loop index, a per-epoch
scheduler, two optimizers stepped at different rates) guessing would resume at a wrong LR or
data position, so ``infer_step`` refuses and names every source and its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptguard.errors import CheckpointFormatError

STEP_KEYS = ("step", "global_step", "iteration", "iter")
_MAX_DEPTH = 3
# A float counter stops counting exactly here (Adam's per-parameter step is a float32 tensor).
_EXACT_UP_TO = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24}


@dataclass(frozen=True)
class StepSource:
    """One place an old checkpoint records its step."""

    kind: str  # "optimizer" | "scheduler" | "key"
    where: str  # dotted path in the checkpoint, e.g. "optimizer", "lr_scheduler", "train_state.step"
    value: int
    note: str = ""
    exact: bool = True  # False: a float32 counter past 2**24, or a fractional value

    def describe(self) -> str:
        what = {
            "optimizer": f"the optimizer per-parameter 'step' in '{self.where}'",
            "scheduler": f"the LR scheduler's last_epoch in '{self.where}'",
            "key": f"the key '{self.where}'",
        }[self.kind]
        return f"{what} = {self.value}" + (f" ({self.note})" if self.note else "")


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _as_count(value: Any) -> tuple[int | None, bool]:
    """``value`` as a non-negative step count and whether it is exact; ``(None, _)``: not one."""
    exact = True
    if _is_tensor(value):
        if value.numel() != 1:
            return None, False
        limit = _EXACT_UP_TO.get(value.dtype)
        value = value.item()
        exact = limit is None or abs(value) < limit
    if isinstance(value, bool):
        return None, False
    if isinstance(value, float):
        if not value.is_integer():
            return None, False
        value = int(value)
    if not isinstance(value, int) or value < 0:
        return None, False
    return value, exact


def _looks_like_optimizer(d: Mapping) -> bool:
    return isinstance(d.get("state"), Mapping) and isinstance(d.get("param_groups"), list)


def _looks_like_scheduler(d: Mapping) -> bool:
    return "last_epoch" in d and not _looks_like_optimizer(d)


def _is_tensor_dict(d: Mapping) -> bool:
    """A model state dict: every value a tensor (a buffer named 'step' is no step count)."""
    return bool(d) and all(_is_tensor(v) for v in d.values())


def _optimizer_source(where: str, osd: Mapping) -> StepSource | None:
    counts: list[tuple[int, bool]] = []
    for param_state in osd["state"].values():
        if isinstance(param_state, Mapping) and "step" in param_state:
            count, exact = _as_count(param_state["step"])
            if count is not None:
                counts.append((count, exact))
    if not counts:
        return None  # SGD, or never stepped: no per-parameter count
    highest = max(c for c, _ in counts)
    fewer = sum(1 for c, _ in counts if c < highest)
    note = f"highest over {len(counts)} parameters"
    if fewer:
        note += f"; {fewer} have fewer (no gradient on some steps)"
    exact = all(e for c, e in counts if c == highest)
    if not exact:
        note += "; a float32 counter is exact only below 2**24 = 16777216"
    return StepSource("optimizer", where, highest, note, exact)


def step_sources(state: Mapping[str, Any]) -> list[StepSource]:
    """Every place in the old checkpoint ``state`` (the dict ``torch.load`` or DCP returns)
    that records its step, in the order found."""
    found: list[StepSource] = []

    def visit(d: Mapping, prefix: str, depth: int) -> None:
        for key, value in d.items():
            where = f"{prefix}{key}"
            if isinstance(value, Mapping):
                if _looks_like_optimizer(value):
                    source = _optimizer_source(where, value)
                    if source is not None:
                        found.append(source)
                elif _looks_like_scheduler(value):
                    count, exact = _as_count(value["last_epoch"])
                    if count is not None:
                        found.append(StepSource("scheduler", where, count, exact=exact))
                elif depth < _MAX_DEPTH and not _is_tensor_dict(value):
                    visit(value, where + ".", depth + 1)
            elif str(key) in STEP_KEYS:
                count, exact = _as_count(value)
                if count is not None:
                    found.append(StepSource("key", where, count,
                                            "" if exact else "a low-precision float", exact))

    if isinstance(state, Mapping) and not _is_tensor_dict(state):
        if _looks_like_optimizer(state):  # the old file is the optimizer state dict itself
            source = _optimizer_source("(top level)", state)
            found.extend([source] if source is not None else [])
        else:
            visit(state, "", 1)
    return found


def infer_step(state: Mapping[str, Any]) -> tuple[int, str]:
    """The step the old checkpoint ``state`` was saved at and a sentence saying where it came
    from; ``CheckpointFormatError`` naming every source when there is none or they disagree.

    Sources: the optimizer's per-parameter ``step``, a scheduler's ``last_epoch``, a
    ``step``/``global_step``/``iteration``/``iter`` key (see the module docstring).
    """
    sources = step_sources(state)
    exact = [s for s in sources if s.exact]
    listed = "; ".join(s.describe() for s in sources)
    if not exact:
        why = (
            f"its only step records are not exact: {listed}" if sources else
            "it holds no optimizer per-parameter 'step' (SGD keeps none), no LR scheduler "
            f"last_epoch, and no key named {' / '.join(STEP_KEYS)}"
        )
        raise CheckpointFormatError(
            f"cannot tell which step the old checkpoint was saved at: {why}. Pass it: "
            "--step N (Python: migrate(..., step=N)), N = the number of optimizer steps the old "
            "run had completed."
        )
    values = sorted({s.value for s in exact})
    if len(values) > 1:
        raise CheckpointFormatError(
            f"the old checkpoint's step records disagree: {listed}. A per-epoch LR scheduler, a "
            "0-based loop index saved as 'step', or optimizers stepped at different rates do "
            "this; ckptguard will not guess. Pass the number of optimizer steps the old run "
            "had completed: --step N (Python: migrate(..., step=N))."
        )
    first, *others = exact
    text = first.describe()
    if others:
        text += "; agrees with " + ", ".join(s.describe().split(" = ")[0] for s in others)
    ignored = [s for s in sources if not s.exact]
    if ignored:
        text += "; ignored (inexact): " + "; ".join(s.describe() for s in ignored)
    return values[0], text
