"""Run control: save on preemption signals and on a clock, with the same answer on every rank.

Long runs are stopped from outside: SLURM sends ``--signal=B:USR1@120`` before the time limit,
Kubernetes and torchrun send SIGTERM and SIGKILL after a grace period. A checkpoint must be
taken *then*, by every rank at the same step, and the process must exit 0 so the scheduler
requeues it. Three pieces:

``SignalCatcher``
    Installs handlers only for the signals asked for, only from the main thread (Python runs
    handlers there alone, and ``signal.signal`` refuses other threads; we refuse first, by
    name). The handler records the signal number and nothing else: no I/O, no lock, no
    logging, since it interrupts the main thread between any two bytecodes, possibly inside a
    save, a lock or a ``logging`` call. A second signal while saving only sets the flag again.

    The previous handlers are chained, called after ours, with one deliberate exception: a
    previous handler that would end the process at once (``SIG_DFL`` for SIGTERM, SIGUSR1,
    SIGHUP..., and Python's ``default_int_handler`` for SIGINT, which raises
    ``KeyboardInterrupt``) is NOT called, because the checkpoint the signal asks for would
    then never be written; the run stops at the next ``should_save`` instead, cleanly. A
    previous ``SIG_IGN`` has nothing to call. A previous Python handler (a framework's or the
    user's own) is called with the same arguments; what it does is its own business.

    ``close()`` puts the previous handlers back (main thread only). If it cannot (closed from
    another thread, or never closed), our handler notices it is closed and hands the signal on:
    it restores the previous handler and re-delivers the signal, so a SIGTERM after ``close``
    still terminates a process whose previous handler was ``SIG_DFL``.

``SavePolicy`` (``ckptguard.core.policy``)
    The step interval and rank 0's clock.

``RunControl``
    ``should_save(step)``: one all_reduce(MAX) of four int64s, ``[signal seen on this rank,
    clock due on rank 0, step, -step]`` (the last two check that every rank asks about the
    same step), on the manager's CPU (gloo) group, so that a signal delivered to one
    rank only, or rank 0's clock, makes every rank save the same step. No collective is made
    when neither signals nor the clock are configured (the step interval is plain arithmetic),
    nor in a single process. ``preempted`` turns true once a save made after an agreed signal
    is durable (``note_saved(durable=True)``).

    A peer that died makes the all_reduce fail (gloo sees the closed connection) instead of
    hanging; ``should_save`` then raises ``CommitError`` naming the step and the cause, so a
    worker SIGTERMed by torchrun because its peer crashed exits non-zero at once rather than
    wait for the SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ckptguard.core.policy import SaveDecision, SavePolicy, signal_name
from ckptguard.errors import CheckpointError, CommitError

logger = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _ends_process(handler: _Handler) -> bool:
    """Would this previous handler end the process before the checkpoint is written?"""
    return handler in (signal.SIG_DFL, None) or handler is signal.default_int_handler


def _as_signal(sig: Any) -> signal.Signals:
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
        try:
            return signal.Signals[name]
        except KeyError:
            raise CheckpointError(f"save_on_signals: unknown signal {sig!r}") from None
    try:
        return signal.Signals(sig)
    except ValueError:
        raise CheckpointError(f"save_on_signals: {sig!r} is not a signal number") from None


class SignalCatcher:
    """Handlers that record which of ``signals`` arrived (see the module docstring)."""

    def __init__(self, signals: Iterable[Any]) -> None:
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(_as_signal(s) for s in signals))
        for sig in self.signals:
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                raise CheckpointError(
                    f"save_on_signals: {sig.name} cannot be caught by any process; use SIGTERM "
                    "(Kubernetes, torchrun) or SIGUSR1 (SLURM --signal=B:USR1@120)"
                )
        self._previous: dict[signal.Signals, _Handler] = {}
        self._installed = False
        self._closed = False
        # Written by the handler (main thread, between bytecodes), read by take(): a counter,
        # not a flag cleared by the reader, so that a signal arriving between the reader's
        # read and its clear is never lost.
        self._received = 0
        self._taken = 0
        self._last = 0

    def install(self) -> None:
        if self._installed or not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            raise CheckpointError(
                f"save_on_signals={tuple(s.name for s in self.signals)}: signal handlers can "
                f"only be installed from the main thread (this is {threading.current_thread().name!r}); "
                "construct the CheckpointManager in the main thread, or pass save_on_signals=() "
                "and call request_preemption() from your own handler"
            )
        done: list[signal.Signals] = []
        try:
            for sig in self.signals:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = previous
                done.append(sig)
        except (OSError, ValueError) as e:
            for sig in done:
                signal.signal(sig, self._previous.pop(sig))
            raise CheckpointError(
                f"save_on_signals: cannot install a handler for {sig.name}: {e}"
            ) from e
        self._installed = True
        for sig, prev in self._previous.items():
            if _ends_process(prev):
                logger.debug(
                    "%s: the previous handler (%s) would end the process before the checkpoint; "
                    "it is not chained", sig.name, prev,
                )

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of whatever it was doing: records and
        # chains, nothing else (no I/O, no logging, no locks).
        sig = signal.Signals(signum)
        previous = self._previous.get(sig, signal.SIG_DFL)
        if self._closed:
            if signal.getsignal(sig) == self._handle:
                # close() could not put the previous handler back: do it now and hand the
                # signal on, so that e.g. SIG_DFL still terminates.
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
                if callable(previous):
                    previous(signum, frame)
                elif previous in (signal.SIG_DFL, None):
                    os.kill(os.getpid(), signum)
            elif callable(previous) and not _ends_process(previous):
                # reached through a newer catcher's chain: be transparent to it
                previous(signum, frame)
            return
        self._last = signum
        self._received += 1
        if callable(previous) and not _ends_process(previous):
            previous(signum, frame)

    def trigger(self, signum: int = signal.SIGTERM) -> None:
        """Record ``signum`` as if it had been delivered (for a handler of your own, or a
        watchdog thread; assignments only, safe from any thread)."""
        self._last = int(signum)
        self._received += 1

    def take(self) -> int:
        """The last signal number received since the previous ``take``; 0 if none."""
        received = self._received
        if received == self._taken:
            return 0
        self._taken = received
        return self._last

    @property
    def received(self) -> int:
        """How many signals arrived so far (a second one during a save shows here)."""
        return self._received

    def close(self) -> None:
        """Put the previous handlers back (main thread); elsewhere, our handler hands signals on."""
        if self._closed:
            return
        self._closed = True
        if not self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.info(
                "signal handlers for %s are restored lazily (closed from thread %r): the next "
                "such signal goes to the previous handler",
                ", ".join(s.name for s in self._previous), threading.current_thread().name,
            )
            return
        for sig, previous in self._previous.items():
            current = signal.getsignal(sig)
            if current != self._handle:
                logger.warning(
                    "%s's handler was replaced after ckptguard installed its own (now %r); "
                    "leaving it in place", sig.name, current,
                )
                continue
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


class RunControl:
    """``should_save`` / ``preempted`` for one manager (see the module docstring).

    ``agree_every``: make the collective on every k-th ``should_save`` call only (the others
    answer from the step interval alone), for loops whose steps are so short that even a
    sub-millisecond collective matters; a signal or the clock is then acted on up to k-1 steps
    later. Every rank must call ``should_save`` at the same steps, as it must call ``save``.
    """

    def __init__(
        self,
        policy: SavePolicy,
        *,
        signals: Iterable[Any] = (),
        group: Any = None,
        agree_every: int = 1,
    ) -> None:
        if not isinstance(agree_every, int) or agree_every < 1:
            raise ValueError(f"agree_every must be an int >= 1, got {agree_every!r}")
        self.policy = policy
        self.catcher = SignalCatcher(signals)
        self.group = group
        self.agree_every = agree_every
        self._calls = 0
        self._requested = 0  # signal number of an agreed preemption; sticky
        self._preempted = False
        self._votes = torch.zeros(4, dtype=torch.int64)
        self.last_decision: SaveDecision | None = None
        self.catcher.install()

    @property
    def needs_agreement(self) -> bool:
        return bool(self.catcher.signals) or self.policy.save_every_seconds is not None

    @property
    def preemption_requested(self) -> bool:
        """Every rank has agreed that a signal asked for a checkpoint (it may not be durable yet)."""
        return bool(self._requested)

    @property
    def preempted(self) -> bool:
        """A signal arrived and the checkpoint it asked for is durable: time to exit."""
        return self._preempted

    def request_preemption(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a preemption checkpoint without a signal (any thread; no I/O)."""
        self.catcher.trigger(signum)

    def should_save(self, step: int) -> SaveDecision:
        """Agreed on every rank: a save is due at ``step`` (interval, rank 0's clock, or a
        signal any rank received). Every rank must call it at the same steps."""
        self._calls += 1
        signum = clock_due = 0
        if self.needs_agreement and (self._calls - 1) % self.agree_every == 0:
            signum = self.catcher.take()
            is_rank0 = not _distributed() or dist.get_rank(self.group) == 0
            clock_due = int(is_rank0 and self.policy.clock_vote())
            if _distributed() and dist.get_world_size(self.group) > 1:
                signum, clock_due = self._agree(step, signum, clock_due)
        decision = self.policy.decide(step, clock_due=bool(clock_due), signal=signum)
        if decision.signal and not self._requested:
            self._requested = decision.signal
            logger.warning(
                "preemption: %s received; every rank saves step %d and then reports preempted",
                signal_name(decision.signal), step,
            )
        self.last_decision = decision
        return decision

    def _agree(self, step: int, signum: int, clock_due: int) -> tuple[int, int]:
        """One all_reduce(MAX) of ``[signal, clock due, step, -step]``: the votes, and a check
        that every rank asks about the same step (else they would save different steps)."""
        votes = self._votes
        votes[0], votes[1], votes[2], votes[3] = signum, clock_due, step, -step
        try:
            dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as e:  # gloo: a peer's connection closed (it died) or timed out
            raise CommitError(
                f"should_save({step}): the ranks could not agree whether to save (a peer "
                f"process died or stopped answering): {type(e).__name__}: {e}. No checkpoint "
                "was written for this step; the newest complete one is the resume point. "
                "Check the other ranks' logs for the first failure."
                + (f" This rank had received signal {signum}." if signum else "")
            ) from e
        highest, lowest = int(votes[2]), -int(votes[3])
        if highest != lowest:
            raise CheckpointError(
                f"should_save: the ranks asked about different steps (from {lowest} to "
                f"{highest}; this rank: {step}). Every rank must call should_save(step) at the "
                "same steps with the same step number, as it must call save()."
            )
        return int(votes[0]), int(votes[1])

    def note_saved(self, *, durable: bool) -> None:
        """A save returned (``durable``: its checkpoint is committed, not an async save in
        flight). Restarts the clock; after an agreed signal, a durable save means preempted."""
        self.policy.note_saved()
        if durable and self._requested:
            self._preempted = True

    def close(self) -> None:
        self.catcher.close()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
