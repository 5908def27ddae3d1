"""``ResumeGuard``: the manager's companion that checks every resume and keeps the run trace.

The manager calls it at four points and holds no guard logic itself:

* ``before_save(step, micro_step)``: refuses a save in the middle of a gradient accumulation,
  notices an optimizer that has not stepped since the last load/save (the trainer trains with
  another object), fsyncs the trace; returns what the manifest records for later checks;
* ``before_load(step_dir, manifest, template)``: checks read from the manifest and DCP's metadata
  against the live objects, before anything is overwritten (hyperparameters are only visible
  then); raises ``StateMismatchError`` for keys/shapes that cannot load;
* ``after_load(report, template)``: what the live objects hold now (moments present and equal to
  the loaded ones, the LR training continues with, train mode); logs or raises (``strict``);
* ``record(step, loss, batch)``: appends to the run trace and compares with the earlier run.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptguard.core.dist import on_every_rank
from ckptguard.core.states import ModelOptimizerState, model_device_type, optimizer_hyperparameters
from ckptguard.errors import ResumeError, StateMismatchError
from ckptguard.guard import checks, statecheck
from ckptguard.guard.divergence import Reference, build_reference, compare_record
from ckptguard.guard.findings import Finding, GuardReport, Severity
from ckptguard.guard.trace import (
    TRACE_FORMAT,
    TraceWriter,
    make_record,
    new_segment_id,
    read_trace,
    trace_filename,
)

logger = logging.getLogger("ckptguard.guard")


@dataclass(frozen=True)
class GuardOptions:
    """How the resume guard judges a run: one object instead of a row of arguments, so that
    the manager, the tools and a test configure it alike (as DCP's ``StateDictOptions`` does).

    ``strict``: raise ``ResumeError`` on an ERROR finding (else log and keep it in the report).
    ``allow_lr_change``: an LR that differs at resume is info, not an error.
    ``global_batch_size``, ``grad_accum_steps``: the trainer's declarations, saved and compared.
    ``trace_rtol``: relative tolerance when the run trace's losses and LRs are compared (0: exact).
    """

    strict: bool = False
    allow_lr_change: bool = False
    global_batch_size: int | None = None
    grad_accum_steps: int | None = None
    trace_rtol: float = 0.0

    def __post_init__(self) -> None:
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1 or None, got {self.grad_accum_steps}")
        if self.trace_rtol < 0:
            raise ValueError(f"trace_rtol must be >= 0, got {self.trace_rtol}")


class ResumeGuard:
    """Checks and trace for one ``CheckpointManager`` (see the module docstring)."""

    def __init__(
        self,
        *,
        root: str | os.PathLike,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        rank_states: dict[str, Any],
        rank: int,
        world_size: int,
        agree: Callable[..., Any] | None = None,
        options: GuardOptions | None = None,
    ) -> None:
        self.root = Path(root)
        self.model = model
        self.optimizer = optimizer
        self.rank_states = rank_states
        self.rank = rank
        self.world_size = world_size
        # ``_dist.on_every_rank`` bound to the manager's group: the guard's steps that run on
        # every rank agree on their outcome through it (one process: runs them as they are)
        self.agree = agree or functools.partial(on_every_rank, group=None, root=self.root)
        self.options = options or GuardOptions()
        self.report: GuardReport | None = None
        self.segment = new_segment_id()
        self._writer = TraceWriter(self.root / trace_filename(rank))
        self._header_written = False
        self._reference: Reference | None = None
        self._branch: dict[str, Any] | None = None  # set by start_branch: this segment is a rollback
        self._baseline: tuple[int, float] | None = None  # (step, optimizer step count) at last load/save

    # ------------------------------------------------------------------ save

    def before_save(self, step: int, *, micro_step: int = 0, allow_mid_accumulation: bool = False) -> dict[str, Any]:
        """Refuse or note problems of this save; returns the manifest's ``info["guard"]``."""
        if micro_step and not allow_mid_accumulation:
            raise ResumeError(
                f"refusing to save step {step} at micro-step {micro_step} of a gradient accumulation"
                + (f" (grad_accum_steps={self.options.grad_accum_steps})" if self.options.grad_accum_steps else "")
                + ": the gradients accumulated so far are not part of a checkpoint, so a resume "
                "would apply an optimizer step with fewer micro-batches than the original run. "
                "Save right after optimizer.step() (micro_step=0), or pass "
                "allow_mid_accumulation=True to accept it."
            )
        self._check_optimizer_stepped(step)
        if self._header_written:  # the lineage of this checkpoint, for the next resume's reference
            self._writer.write({"kind": "save", "seg": self.segment, "step": int(step)})
        self._writer.sync()
        return {
            "trainer": {"global_batch_size": self.options.global_batch_size, "grad_accum_steps": self.options.grad_accum_steps},
            "micro_step": int(micro_step),
            "optimizer_steps": _optimizer_step_count(self.optimizer),
            "lr_scheduler_class": _scheduler_class(self.rank_states),
            "trace_segment": self.segment,
        }

    def _check_optimizer_stepped(self, step: int) -> None:
        now = _optimizer_step_count(self.optimizer)
        if self._baseline is None or now is None:
            return
        base_step, base_count = self._baseline
        if step <= base_step or base_count is None or now != base_count:
            return
        finding = Finding(
            "optimizer_stepped", "optimizer", Severity.ERROR,
            f"saving step {step}, but the optimizer handed to the manager has not stepped since "
            f"step {base_step} (its step count is still {now:g}): training uses another optimizer "
            "object (built after load()?), so this checkpoint would hold stale moments. Hand the "
            "optimizer you train with to CheckpointManager(optimizer=...).",
            saved=base_count, current=now,
        )
        if self.report is not None:
            self.report.findings.append(finding)
        if self.options.strict:
            raise ResumeError(finding.message + " (strict=True: refusing to save)")
        if self.rank == 0:
            logger.error("%s", finding.format())

    # ------------------------------------------------------------------ load

    def before_load(
        self, step: int, step_dir: Path, manifest: dict[str, Any], template: dict[str, Any], *,
        strict_keys: bool, saved_keys: dict[str, Any] | None = None,
    ) -> GuardReport:
        """Checks that need the live objects as they are before loading. May raise.

        ``saved_keys``: the checkpoint's ``statecheck.read_saved_keys``, if the caller read them."""
        info = manifest.get("info", {})
        guard_info = info.get("guard", {})
        report = GuardReport(step, str(step_dir))
        live = checks.LiveSetup(
            world_size=self.world_size,
            components=self.components(),
            optimizer_class=type(self.optimizer).__name__ if self.optimizer is not None else None,
            optimizer_bases=[c.__name__ for c in type(self.optimizer).__mro__] if self.optimizer is not None else [],
            param_groups_before_load=optimizer_hyperparameters(self.optimizer) if self.optimizer is not None else [],
            torch_version=torch.__version__,
            device_type=model_device_type(self.model),
            deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
            global_batch_size=self.options.global_batch_size,
            grad_accum_steps=self.options.grad_accum_steps,
        )
        report.findings += checks.check_components(manifest.get("components", []), live.components)
        report.findings += checks.check_scheduler_class(guard_info.get("lr_scheduler_class"), _scheduler_class(self.rank_states))
        report.findings += checks.check_world_size(int(manifest.get("world_size", self.world_size)), self.world_size)
        report.findings += checks.check_trainer({**guard_info.get("trainer", {}), "micro_step": guard_info.get("micro_step")}, live)
        if self.optimizer is not None:
            report.findings += checks.check_hyperparameters(info.get("param_groups", []), info.get("optimizer_class"), live)
        report.findings += checks.check_environment(info, manifest.get("torch_version"), live)
        if info.get("model_training") is False:
            report.findings += checks.check_model_mode(False, True)

        if saved_keys is None:
            saved_keys = statecheck.read_saved_keys(step_dir)
        self._saved_params_with_state = statecheck.saved_params_with_state(saved_keys)
        keys = statecheck.check_keys(saved_keys, template, strict=strict_keys)
        report.findings += keys.findings
        if keys.fatal:
            others = [f.format() for f in report.errors]
            raise StateMismatchError(
                f"cannot load {step_dir} into the live objects:\n  " + "\n  ".join(keys.fatal)
                + ("\nOther problems found: \n  " + "\n  ".join(others) if others else "")
            )
        statecheck.drop_paths(template, keys.drop)
        return report

    def after_load(self, report: GuardReport, template: dict[str, Any], manifest: dict[str, Any]) -> GuardReport:
        """Checks of what the live objects hold now; logs the report, raises if ``strict``.

        Every rank raises, or none: a check that fails on one rank alone (a user's state_dict
        hook, its trace file unreadable, a finding of its own under ``strict``) must not let
        the others go on to the next collective without it."""
        info = manifest.get("info", {})
        report.findings += self._readback(template)

        def check_rest() -> GuardReport:
            report.findings += self._lr_findings(info.get("param_groups", []))
            report.findings += checks.check_model_mode(None, self.model.training)
            self.report = report
            self._baseline = (report.step, _optimizer_step_count(self.optimizer))
            self._start_segment(report)
            if self.rank == 0:
                report.log()
            if self.options.strict:
                report.raise_if_errors("at load (the live objects already hold the loaded state)")
            return report

        return self.agree(check_rest, what=f"checking the resume from step {report.step}", error=ResumeError)

    def _readback(self, template: dict[str, Any]) -> list[Finding]:
        """A finding per component whose live state is not what DCP loaded; gathered over ranks.

        Every rank takes the same branches (decided on gathered values), since reading the live
        state dict may run collectives; each local step is agreed (``self.agree``), so that one
        failing on one rank raises ``ResumeError`` on every rank. Moments are expected exactly
        for the parameters the template asked for: a checkpoint saved before the first step, or
        before a parameter got its first gradient, holds none for them, and the optimizer
        rightly has none after load.
        """
        local: dict[str, list[str]] = {}
        live: dict[str, Any] = {}

        def read_live() -> bool:
            # never initialises an empty optimizer state, so a lost state shows as lost
            live.update(ModelOptimizerState(self.model, self.optimizer if "optimizer" in template else None).state_dict())
            if self.optimizer is not None and "optimizer" in template:
                expected = [f for f, s in template["optimizer"].get("state", {}).items() if s]
                held = live["optimizer"]["state"]
                lost = [f for f in expected if not held.get(f)]
                if lost:
                    local["optimizer_missing"] = [f"{len(lost)} of {len(expected)} parameters, e.g. {', '.join(lost[:5])}"]
            return bool(local)

        def compare(any_lost: bool) -> dict[str, list[str]]:
            if not any_lost:
                for comp in ("model", "optimizer"):
                    if comp in template and comp in live:
                        bad = statecheck.compare_nested(template[comp], live[comp], comp)
                        if bad:
                            local[comp] = bad
            return local

        what = "reading back the loaded state"
        any_lost = any(self.agree(read_live, what=what, error=ResumeError, every_result=True))
        merged: dict[str, list[str]] = {}
        parts = self.agree(lambda: compare(any_lost), what=what, error=ResumeError, every_result=True)
        for rank, part in enumerate(parts):
            for k, v in part.items():
                merged.setdefault(k, []).extend(f"rank {rank}: {x}" if self.world_size > 1 else x for x in v)
        out = []
        if "optimizer_missing" in merged:
            out.append(Finding(
                "optimizer_state", "optimizer", Severity.ERROR,
                "optimizer moments are missing after load although the checkpoint holds them for "
                f"{self._saved_params_with_state} parameters: {'; '.join(merged['optimizer_missing'])} "
                "have no state. The optimizer's load_state_dict dropped them (a wrapper that "
                "rebuilds its state?); training would restart Adam's moments from zero.",
                saved=self._saved_params_with_state, current=merged["optimizer_missing"],
            ))
        for comp in ("model", "optimizer"):
            if comp in merged:
                shown = merged[comp][:8]
                out.append(Finding(
                    "optimizer_state" if comp == "optimizer" else "model_state", comp, Severity.ERROR,
                    f"after load the live {comp} does not hold what the checkpoint holds "
                    f"({len(merged[comp])} value(s)): {'; '.join(shown)}"
                    + (" ..." if len(merged[comp]) > len(shown) else "")
                    + ". Its load_state_dict changed the values (Optimizer.load_state_dict casts "
                    "moments to the parameter dtype), so the resumed run does not start from the "
                    "saved state.",
                    saved=None, current=merged[comp],
                ))
        return out

    def _lr_findings(self, saved_groups: list[dict[str, Any]]) -> list[Finding]:
        if self.optimizer is None or not saved_groups:
            return []
        schedulers = [s.obj for s in self.rank_states.values() if isinstance(getattr(s, "obj", None), _LRScheduler)]
        live_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        predicted = checks.predict_scheduler_lrs(schedulers[0]) if len(schedulers) == 1 else None
        return checks.check_lr(
            saved_groups, live_lrs, predicted,
            scheduler_handed=bool(schedulers),
            scheduler_attached=any("initial_lr" in g for g in self.optimizer.param_groups),
            allow_lr_change=self.options.allow_lr_change,
        )

    def components(self) -> list[str]:
        return ["model"] + (["optimizer"] if self.optimizer is not None else []) + list(self.rank_states)

    # ------------------------------------------------------------------ trace

    def _start_segment(self, report: GuardReport | None) -> None:
        """A new segment begins at each load; compare its records with the earlier ones."""
        self.segment = new_segment_id()
        self._header_written = False
        self._reference = None
        self._branch = None
        if report is None:
            return
        path = self._writer.path
        if path.is_file():
            segments = read_trace(path)
            ref = build_reference(segments, report.step, self.options.trace_rtol)
            if ref.world_size is not None and ref.world_size != self.world_size:
                logger.info("trace not compared: world size changed from %d to %d", ref.world_size, self.world_size)
            elif ref.records:
                self._reference = ref

    def start_branch(self, step: int, abandoned: list[int]) -> None:
        """The load that just happened was a rollback to ``step`` while the run had reached
        ``abandoned``: the steps from here on are a new branch, expected to differ from the
        abandoned run (another LR, another data order), so they are not compared with it. The
        segment's header says so, for ``ckptguard audit`` and for later resumes, whose
        reference must come from this branch, never from the abandoned run."""
        self._reference = None
        self._branch = {"from_step": int(step), "abandoned_steps": [int(s) for s in abandoned]}

    def record(self, step: int, *, loss: Any, batch: Any = None) -> Any:
        """Append ``step`` to the trace; returns the first divergence when this step is it."""
        if not self._header_written:
            report = self.report
            self._writer.write({
                "kind": "segment", "seg": self.segment, "format": TRACE_FORMAT, "rank": self.rank,
                "world_size": self.world_size, "resumed_from": report.step if report else 0,
                "step_dir": report.step_dir if report else None, "pid": os.getpid(),
                "findings": [f.to_dict() for f in report.findings] if report else [],
                **({"branch": self._branch} if self._branch else {}),
            })
            self._header_written = True
        lrs = [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else None
        rec = make_record(self.segment, step, loss, lrs=lrs, batch=batch, train_mode=self.model.training)
        self._writer.write(rec)
        ref, report = self._reference, self.report
        if ref is None or report is None or report.divergence is not None or step not in ref.records:
            return None
        div = compare_record(
            ref.records[step], rec, rank=self.rank, resumed_from=ref.resumed_from,
            first_compared=report.compared_steps == 0, batch_first_seen=ref.batch_first_seen,
            rtol=self.options.trace_rtol,
        )
        report.compared_steps += 1
        if div is None:
            return None
        report.divergence = div
        report.findings.append(Finding("trace", div.cause, Severity.ERROR, div.format(), saved=div.reference, current=div.resumed))
        logger.error("resume from step %d: %s", report.step, div.format())
        if self.options.strict:
            raise ResumeError(f"resumed run diverged from the earlier run: {div.format()}")
        return div

    def close(self) -> None:
        self._writer.close()


_LRScheduler = torch.optim.lr_scheduler.LRScheduler


def _optimizer_step_count(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The ``step`` entry of the first parameter that has one (Adam-family, SGD with state...)."""
    if optimizer is None:
        return None
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state.get(p)
            if s and "step" in s:
                v = s["step"]
                return float(v.item() if isinstance(v, torch.Tensor) else v)
    return None


def _scheduler_class(rank_states: dict[str, Any]) -> str | None:
    state = rank_states.get("lr_scheduler")
    return type(state.obj).__name__ if state is not None else None
