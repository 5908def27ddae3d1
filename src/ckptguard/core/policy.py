"""Run-control policy over plain data: when to save, and which checkpoints to keep.

Kept apart from the mechanics (how bytes reach storage, how ranks talk) so that each rule can
be tested alone, with fake clocks and made-up step lists, in microseconds (the split Orbax's
``CheckpointManagerOptions`` makes). Nothing here touches files, processes or signals:
``ckptguard.runcontrol`` feeds ``SavePolicy`` the votes of every rank, the manager feeds
``RetentionPolicy`` the complete steps and the metrics of their manifests.

Retention: a complete checkpoint survives if ANY rule keeps it:

- ``keep_last=N``: the N newest complete checkpoints (``None``: keep all, as before);
- ``keep_every=K``: every checkpoint whose step is a multiple of K, forever;
- ``keep_best=N`` with ``best_metric``/``best_mode``: the N best by a metric given at save;
- the newest complete checkpoint, whatever the rules say (the resume point), and the steps the
  caller protects (the one just committed, even when an overwrite made it older than the newest).

Only the live branch is passed in: checkpoints a rollback set aside are never candidates.
"""

from __future__ import annotations

import math
import signal as _signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Reasons a checkpoint is kept, as ``inspect`` prints them (see ``RetentionDecision.explain``).
NEWEST = "newest"
PROTECTED = "just saved"
LAST = "last"
EVERY = "every"
BEST = "best"

_MODES = ("min", "max")


def normalise_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | int | str]:
    """The metrics of a save as the manifest stores them (JSON-safe), or a ``ValueError``
    naming the offending key.

    Accepts ints, floats and one-element tensors or numpy scalars (``loss`` itself as well as
    ``loss.item()``; a CUDA tensor costs a device sync here, as ``.item()`` would). A NaN or
    infinite value is stored as the string ``"nan"``/``"inf"``/``"-inf"``: standard JSON has no
    such numbers, and a diverged step must never count as one of the best.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"save(metrics=...) must be a dict of name -> number, got {type(metrics).__name__}"
        )
    out: dict[str, float | int | str] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"save(metrics=...): key {key!r} is not a string")
        if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor
            if value.numel() != 1:
                raise ValueError(
                    f"save(metrics=...): '{key}' is a tensor of {value.numel()} elements; pass "
                    "one number (e.g. loss.item())"
                )
            value = value.item()
        elif hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"save(metrics=...): '{key}' = {value!r} is not a number; metrics are numbers "
                "(the manifest stores them and keep_best ranks by them)"
            )
        if isinstance(value, float) and not math.isfinite(value):
            value = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        out[key] = value
    return out


def metric_value(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    """``metrics[name]`` as a finite float, else ``None`` (missing, non-finite, not a number):
    such a checkpoint is not ranked by ``keep_best``."""
    if not metrics:
        return None
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class RetentionDecision:
    """Which checkpoints stay and why (``reasons``), and which go (``doomed``, oldest first).

    ``reasons[step]`` lists every rule that keeps ``step`` (a checkpoint kept by two rules
    survives the loss of either); ``rank[step]`` is its place among the best (1 = best).
    """

    reasons: dict[int, list[str]] = field(default_factory=dict)
    doomed: list[int] = field(default_factory=list)
    rank: dict[int, int] = field(default_factory=dict)
    policy: RetentionPolicy | None = None

    @property
    def kept(self) -> list[int]:
        return sorted(self.reasons)

    def explain(self, step: int) -> str:
        """One line for ``inspect``: e.g. ``"last 3, best 2 by loss (min): #1"``, or
        ``"not kept by any rule: deleted at the next save"``."""
        if step not in self.reasons:
            return "not kept by any rule: deleted at the next save"
        p = self.policy
        words = []
        for reason in self.reasons[step]:
            if reason == LAST and p is not None and p.keep_last is not None:
                words.append(f"last {p.keep_last}")
            elif reason == EVERY and p is not None:
                words.append(f"every {p.keep_every}")
            elif reason == BEST and p is not None:
                words.append(f"best {p.keep_best} by {p.best_metric} ({p.best_mode}): #{self.rank[step]}")
            elif reason == LAST:
                words.append("keep_last=None (keep all)")
            else:
                words.append(reason)
        return ", ".join(words)


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention rules (see the module docstring); ``decide`` applies them.

    Ties in ``keep_best`` go to the newer checkpoint (it holds more training for the same
    score), so the choice never depends on listing order.
    """

    keep_last: int | None = 3
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    def __post_init__(self) -> None:
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {self.keep_last!r}")
        if self.keep_every is not None and (not isinstance(self.keep_every, int) or self.keep_every < 1):
            raise ValueError(
                f"keep_every must be an int >= 1 (keep every checkpoint whose step is a multiple "
                f"of it) or None, got {self.keep_every!r}"
            )
        if self.keep_best is not None:
            if not isinstance(self.keep_best, int) or self.keep_best < 1:
                raise ValueError(f"keep_best must be an int >= 1 or None, got {self.keep_best!r}")
            if not self.best_metric:
                raise ValueError(
                    f"keep_best={self.keep_best} needs best_metric: the name of a metric passed "
                    "to save(step, metrics={...}), e.g. best_metric='loss'"
                )
        elif self.best_metric is not None:
            raise ValueError(
                f"best_metric={self.best_metric!r} without keep_best: say how many of the best "
                "to keep (keep_best=N)"
            )
        if self.best_mode not in _MODES:
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def keeps_all(self) -> bool:
        return self.keep_last is None

    def decide(
        self,
        steps: Iterable[int],
        metrics: Mapping[int, Mapping[str, Any] | None] | None = None,
        *,
        protect: Iterable[int] = (),
    ) -> RetentionDecision:
        """Apply the rules to the complete ``steps`` of the live branch.

        ``metrics[step]`` are the metrics stored in that checkpoint's manifest (missing, or
        without ``best_metric``: not ranked). ``protect``: steps never doomed (the one just
        committed). The newest step is never doomed.
        """
        ordered = sorted(set(steps))
        decision = RetentionDecision(policy=self)
        if not ordered:
            return decision
        keep: dict[int, list[str]] = {}

        def add(step: int, reason: str) -> None:
            keep.setdefault(step, [])
            if reason not in keep[step]:
                keep[step].append(reason)

        add(ordered[-1], NEWEST)
        for step in protect:
            if step in ordered and step != ordered[-1]:
                add(step, PROTECTED)
        if self.keep_last is None:
            for step in ordered:
                add(step, LAST)
        else:
            for step in ordered[-self.keep_last:]:
                add(step, LAST)
        if self.keep_every is not None:
            for step in ordered:
                if step % self.keep_every == 0:
                    add(step, EVERY)
        if self.keep_best is not None:
            assert self.best_metric is not None
            scored = [
                (value, step) for step in ordered
                if (value := metric_value((metrics or {}).get(step), self.best_metric)) is not None
            ]
            sign = 1.0 if self.best_mode == "min" else -1.0
            scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))  # ties: the newer first
            for place, (_, step) in enumerate(scored[: self.keep_best], start=1):
                add(step, BEST)
                decision.rank[step] = place
        decision.reasons = {s: keep[s] for s in sorted(keep)}
        decision.doomed = [s for s in ordered if s not in keep]
        return decision


# ---------------------------------------------------------------------- when to save


@dataclass(frozen=True)
class SaveDecision:
    """The agreed answer of one ``should_save`` call and why (for logs and tests)."""

    save: bool
    reasons: tuple[str, ...] = ()
    signal: int = 0  # the signal number that asked for a preemption save; 0: none

    def __bool__(self) -> bool:
        return self.save


class SavePolicy:
    """``save_every_steps`` and ``save_every_seconds``, decided from plain votes.

    The step interval is the same arithmetic on every rank, so it needs no agreement. The
    clock is rank 0's alone (``clock_vote``): ranks' clocks drift and their steps end at
    different instants, so each deciding by its own clock would make one rank save a step its
    peers do not. ``ckptguard.runcontrol`` carries rank 0's vote and every rank's signal flag
    to every rank in one small collective and then calls ``decide``.

    The clock restarts at construction and whenever a save was made (``note_saved``, whatever
    asked for it), so ``save_every_seconds`` is the longest stretch of training a crash can
    lose, measured from the last checkpoint.
    """

    def __init__(
        self,
        save_every_steps: int | None = None,
        save_every_seconds: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if save_every_steps is not None and (not isinstance(save_every_steps, int) or save_every_steps < 1):
            raise ValueError(f"save_every_steps must be an int >= 1 or None, got {save_every_steps!r}")
        if save_every_seconds is not None and not (
            isinstance(save_every_seconds, (int, float)) and save_every_seconds > 0
        ):
            raise ValueError(f"save_every_seconds must be > 0 or None, got {save_every_seconds!r}")
        self.save_every_steps = save_every_steps
        self.save_every_seconds = save_every_seconds
        self.clock = clock  # replaceable, e.g. by a test's fake clock
        self._last_save = clock()

    def step_due(self, step: int) -> bool:
        return self.save_every_steps is not None and step % self.save_every_steps == 0

    def clock_vote(self) -> bool:
        """This process's clock says a save is due (only rank 0's vote is used)."""
        return (
            self.save_every_seconds is not None
            and self.clock() - self._last_save >= self.save_every_seconds
        )

    def seconds_since_save(self) -> float:
        return self.clock() - self._last_save

    def note_saved(self) -> None:
        """A checkpoint was made: the clock starts again."""
        self._last_save = self.clock()

    def decide(self, step: int, *, clock_due: bool, signal: int) -> SaveDecision:
        """The decision from the agreed votes: rank 0's ``clock_due`` and the largest signal
        number any rank saw since the last agreement (0: none)."""
        reasons = []
        if self.step_due(step):
            reasons.append(f"every {self.save_every_steps} steps")
        if clock_due:
            reasons.append(f"{self.save_every_seconds:g} s since the last save (rank 0's clock)")
        if signal:
            reasons.append(f"signal {signal_name(signal)}")
        return SaveDecision(bool(reasons), tuple(reasons), signal)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; the number itself if it names no signal."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return str(signum)

