"""``ckptguard audit ROOT``: every resume found in a root's run trace, with the findings of the
checks run at that load and the first-divergence verdict, as text, JSON or a loss plot.

Works offline, from the trace files alone: the findings were stored in each resumed segment's
header when it loaded, and the comparison is the same one ``mgr.record`` makes while training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.guard.divergence import Reference, compare_segment, resumes_in
from ckptguard.guard.findings import Divergence, Finding, Severity, steps_text
from ckptguard.guard.trace import Segment, read_trace, trace_files

PLOT_WINDOW_STEPS = 20


class PlotUnavailableError(ImportError):
    """``--plot`` needs matplotlib, which is an optional extra."""


@dataclass
class ResumeAudit:
    """One resume: the load's findings (rank 0's) and each rank's comparison."""

    index: int
    resumed_from: int
    step_dir: str | None
    findings: list[Finding]
    compared_steps: int = 0
    divergence: Divergence | None = None
    skipped: str | None = None
    ranks: int = 1
    _plot: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.divergence is None and not any(f.severity is Severity.ERROR for f in self.findings)

    def format(self) -> str:
        lines = [f"resume #{self.index + 1}: resume from step {self.resumed_from}" + (f" ({self.step_dir})" if self.step_dir else "")]
        lines += ["  " + f.format() for f in self.findings] or ["  checks: no findings"]
        if self.divergence is not None:
            lines.append("  " + self.divergence.format())
        elif self.skipped:
            lines.append(f"  trace: not compared ({self.skipped})")
        elif self.compared_steps:
            lines.append(f"  trace: {steps_text(self.compared_steps)} identical to the earlier run")
        else:
            lines.append("  trace: no step of the resumed run overlaps the earlier run's records")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resumed_from": self.resumed_from,
            "step_dir": self.step_dir,
            "findings": [f.to_dict() for f in self.findings],
            "compared_steps": self.compared_steps,
            "divergence": self.divergence.to_dict() if self.divergence else None,
            "skipped": self.skipped,
            "ranks": self.ranks,
            "ok": self.ok,
        }


@dataclass
class AuditResult:
    root: str
    resumes: list[ResumeAudit]
    segments: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.resumes)

    def format(self) -> str:
        head = f"{self.root}: {self.segments} run segment(s), {len(self.resumes)} resume(s)"
        if not self.resumes:
            return head + "; nothing to compare (no run resumed from a checkpoint)"
        return "\n".join([head, *(r.format() for r in self.resumes), "verdict: " + ("OK" if self.ok else "PROBLEMS FOUND")])

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "segments": self.segments, "resumes": [r.to_dict() for r in self.resumes], "ok": self.ok}

    def plot(self, path: str | Path) -> Path:
        """Loss of the earlier run vs the resumed run around each resume point, as a PNG."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise PlotUnavailableError(
                "--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or pip install 'ckptguard[plot]'), or leave out --plot."
            ) from e
        n = max(1, len(self.resumes))
        fig = Figure(figsize=(7, 3 * n))
        axes = fig.subplots(n, 1, squeeze=False)[:, 0]
        for ax, r in zip(axes, self.resumes, strict=False):
            ref, got = r._plot.get("reference", {}), r._plot.get("resumed", {})
            if ref:
                ax.plot(sorted(ref), [ref[s] for s in sorted(ref)], label="earlier run", color="tab:blue")
            if got:
                ax.plot(sorted(got), [got[s] for s in sorted(got)], label="resumed run", color="tab:orange", linestyle="--")
            ax.axvline(r.resumed_from, color="gray", linewidth=1, label=f"resumed from step {r.resumed_from}")
            if r.divergence is not None:
                ax.axvline(r.divergence.step, color="tab:red", linewidth=1, label=f"first divergence ({r.divergence.cause})")
            ax.set_title(f"resume #{r.index + 1}: from step {r.resumed_from}", fontsize="medium")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend(fontsize="small")
        if not self.resumes:
            axes[0].text(0.5, 0.5, "no resume in the trace", ha="center", va="center")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png")
        return path


def audit(root: str | Path, *, rtol: float = 0.0) -> AuditResult:
    """Read every rank's trace under ``root`` and compare each resumed segment."""
    root = Path(root)
    files = trace_files(root)
    if not files:
        raise FileNotFoundError(
            f"no run trace under {root} (trace.jsonl): the trainer records one by calling "
            "mgr.record(step, loss=loss, batch=batch) after each step"
        )
    per_rank: dict[int, list[tuple[Segment, Reference]]] = {}
    nsegments = 0
    for rank, path in sorted(files.items()):
        segments = read_trace(path)
        if rank == min(files):
            nsegments = len(segments)
        per_rank[rank] = resumes_in(segments, rtol)
    first = per_rank[min(per_rank)]
    out = []
    for i, (seg, ref) in enumerate(first):
        r = ResumeAudit(
            index=i, resumed_from=seg.resumed_from, step_dir=seg.header.get("step_dir"),
            findings=[Finding.from_dict(f) for f in seg.header.get("findings", [])],
            ranks=len(per_rank),
        )
        for rank, resumes in sorted(per_rank.items()):
            if i >= len(resumes):
                continue
            rseg, rref = resumes[i]
            cmp = compare_segment(rref, rseg, rank=rank, rtol=rtol)
            r.compared_steps = max(r.compared_steps, cmp.compared_steps)
            r.skipped = r.skipped or cmp.skipped
            if cmp.divergence is not None and (r.divergence is None or cmp.divergence.step < r.divergence.step):
                r.divergence = cmp.divergence
        r._plot = _plot_data(seg, ref)
        out.append(r)
    return AuditResult(str(root), out, nsegments)


def _plot_data(seg: Segment, ref: Reference) -> dict[str, dict[int, float]]:
    """Losses from ``PLOT_WINDOW_STEPS`` before the resume point to as many after the last step
    the earlier run reached."""
    lo = seg.resumed_from - PLOT_WINDOW_STEPS
    hi = max(ref.records, default=seg.resumed_from) + PLOT_WINDOW_STEPS
    earlier = {s: v for s, v in ref.losses_before.items() if s >= lo}
    earlier.update({s: float.fromhex(r["loss"]) for s, r in ref.records.items() if s <= hi})
    resumed = {s: float.fromhex(r["loss"]) for s, r in seg.records.items() if s <= hi}
    return {"reference": earlier, "resumed": resumed}
