"""What the resume guard found: one ``Finding`` per problem, a ``Divergence`` for the run trace,
and a ``GuardReport`` that holds them for one resume.

Severity says what a finding means for the resumed run, not how alarming it sounds:

* ``ERROR``: state is lost or wrong; the run is not continuing the training it checkpointed
  (moments dropped, LR schedule restarted, a divergence in the trace). ``strict=True`` raises.
* ``WARNING``: the state was restored correctly but the run cannot be bit-exact with an
  uninterrupted one (world size changed, a new torch version, a new batch size), or your code
  asked for something the checkpoint overrode (a changed hyperparameter).
* ``INFO``: a change accepted on purpose (``allow_lr_change=True``), kept for the record.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptguard.errors import ResumeError

logger = logging.getLogger("ckptguard.guard")


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


_LOG_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.ERROR: logging.ERROR}


@dataclass
class Finding:
    """One resume problem.

    ``check`` names the check (``"lr"``, ``"optimizer_state"``, ...), ``component`` the piece of
    training state it concerns (``model``, ``optimizer``, ``lr_scheduler``, ``dataloader``,
    ``rng``, ``trainer``, ``environment``). ``message`` gives the saved and current values and
    what to do; ``saved``/``current`` carry the same values for machines (JSON-able).
    """

    check: str
    component: str
    severity: Severity
    message: str
    saved: Any = None
    current: Any = None

    def __post_init__(self) -> None:
        self.severity = Severity(self.severity)

    def format(self) -> str:
        return f"[{self.severity.value.upper()}] {self.component}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(**{k: d.get(k) for k in ("check", "component", "severity", "message", "saved", "current")})


@dataclass
class Divergence:
    """The first step at which a resumed run's trace differs from the earlier run's.

    ``cause`` is the component most likely at fault (``dataloader``, ``lr_scheduler``, ``model``,
    ``rng``, ``optimizer``); ``fields`` lists every recorded value that differs at that step
    (``batch``, ``lr``, ``train_mode``, ``rng``, ``loss``), most telling first.
    """

    step: int
    rank: int
    cause: str
    fields: list[str]
    message: str
    resumed_from: int | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    resumed: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        return f"first divergence at step {self.step} (rank {self.rank}): likely cause {self.cause}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Divergence:
        return cls(**d)


@dataclass
class GuardReport:
    """Findings of the checks run when step ``step`` was loaded, and later the trace's verdict.

    ``compared_steps`` counts the trace records of the resumed run compared so far with the
    earlier run's; ``divergence`` is the first that differed (``None`` while all matched).
    """

    step: int
    step_dir: str
    findings: list[Finding] = field(default_factory=list)
    divergence: Divergence | None = None
    compared_steps: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def clean(self) -> bool:
        """No errors and no warnings (info findings are changes accepted on purpose)."""
        return not self.errors and not self.warnings

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def format(self) -> str:
        lines = [f"resume from step {self.step} ({self.step_dir}):"]
        if not self.findings:
            lines.append("  checks: no findings")
        lines += ["  " + f.format() for f in self.findings]
        if self.divergence is not None:
            lines.append("  " + self.divergence.format())
        elif self.compared_steps:
            lines.append(f"  trace: {steps_text(self.compared_steps)} identical to the earlier run")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "step_dir": self.step_dir,
            "findings": [f.to_dict() for f in self.findings],
            "divergence": self.divergence.to_dict() if self.divergence else None,
            "compared_steps": self.compared_steps,
        }

    def log(self, log: logging.Logger = logger) -> None:
        for f in self.findings:
            log.log(_LOG_LEVEL[f.severity], "resume from step %d: %s", self.step, f.format())

    def raise_if_errors(self, what: str = "") -> None:
        """``ResumeError`` listing every error finding (used by ``strict=True``)."""
        if self.errors:
            raise ResumeError(
                f"resume from step {self.step} ({self.step_dir}) failed {len(self.errors)} check(s)"
                + (f" {what}" if what else "")
                + ":\n  "
                + "\n  ".join(f.format() for f in self.errors)
                + "\nFix the cause, or build the manager with strict=False to resume anyway (the "
                "findings are then logged and kept in mgr.last_report)."
            )


def steps_text(n: int) -> str:
    return f"{n} resumed step{'' if n == 1 else 's'}"
