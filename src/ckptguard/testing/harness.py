"""Resume-exactness harness: does *your* trainer resume exactly?

Give it a training function ``fn(ctx: ResumeContext) -> None`` written the way you write
trainers (build objects, ``mgr.load()``, iterate the loader). It runs three fresh processes
(or three ``torchrun`` jobs with ``nproc`` ranks):

* ``uninterrupted``: steps 1..N;
* ``interrupted``: steps 1..K, then save and exit, as a preemption would;
* ``resumed``: a new process that loads step K and runs K+1..N;

then compares every recorded loss (exactly) and the final checkpoints of both runs (every
tensor with ``torch.equal``, every per-rank state) and names what differs. If the function also
records the run trace (``mgr.record(step, loss=loss, batch=batch)``), the report names the first
divergent step and its likely cause (data order, LR scheduler, RNG, model or optimizer; see
``ckptguard.guard.divergence``), and says so when the runs differ before the interruption
(a nondeterministic trainer, not a resume problem).

Your function's contract, in the loop::

    ctx.record(step, loss)           # after computing the loss of ``step``; or, better,
    mgr.record(step, loss=loss, batch=batch)   # the trace: losses plus the cause of a divergence
    if ctx.should_stop(step):        # the harness's simulated preemption point
        mgr.save(step); return
    ...
    ctx.finish(mgr, step)            # once, after the last step: saves the final state

In pytest::

    from ckptguard.testing import assert_resumes_exactly
    def test_my_trainer_resumes(tmp_path):
        assert_resumes_exactly("my_pkg.train:train", tmp_path, total_steps=20, stop_at=8)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptguard.core.format import step_dirname
from ckptguard.guard import divergence, trace
from ckptguard.tools.reader import load_checkpoint, values_equal

LEGS = ("uninterrupted", "interrupted", "resumed")


@dataclass
class ResumeContext:
    """What the harness tells a training function, and how it reports back."""

    ckpt_dir: Path
    out_dir: Path
    total_steps: int
    stop_at: int | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", "0"))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def record(self, step: int, loss: float | torch.Tensor) -> None:
        """Append the exact loss of ``step`` (as a hex float) to this rank's log."""
        value = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        with open(self.out_dir / f"losses-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": value.hex()}) + "\n")

    def should_stop(self, step: int) -> bool:
        return self.stop_at is not None and step == self.stop_at

    def finish(self, mgr: Any, step: int) -> None:
        """Save the final state so the harness can compare it with the other run's."""
        mgr.save(step, overwrite=True)
        mgr.close()


@dataclass
class ComponentResult:
    name: str
    exact: bool
    detail: str = ""


@dataclass
class ResumeReport:
    exact: bool
    components: list[ComponentResult]
    first_divergent_step: int | None
    total_steps: int
    stop_at: int
    nproc: int
    divergence: Any = None  # guard.Divergence: first divergence of the resumed run (trace)
    nondeterministic: Any = None  # guard.Divergence: the runs differed before the interruption

    def format(self) -> str:
        lines = [
            f"resume check: {self.total_steps} steps, interrupted after step {self.stop_at}, "
            f"{self.nproc} process(es)"
        ]
        for c in self.components:
            mark = "exact   " if c.exact else "DIFFERS "
            lines.append(f"  {mark} {c.name:<14} {c.detail}")
        if self.first_divergent_step is not None:
            lines.append(f"  first divergent step: {self.first_divergent_step}")
        if self.nondeterministic is not None:
            lines.append(
                "  the runs differ BEFORE the interruption, so the trainer is not deterministic "
                "(no resume is to blame): " + self.nondeterministic.format()
            )
        if self.divergence is not None:
            lines.append("  " + self.divergence.format())
        lines.append("verdict: " + ("BIT-EXACT" if self.exact else "NOT EXACT"))
        return "\n".join(lines)


def run_resume_check(
    fn: str,
    workdir: str | Path,
    *,
    total_steps: int,
    stop_at: int,
    nproc: int = 1,
    options: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
) -> ResumeReport:
    """Run ``fn`` (``"package.module:function"``) uninterrupted and interrupted+resumed."""
    if not 0 < stop_at < total_steps:
        raise ValueError(f"need 0 < stop_at < total_steps, got stop_at={stop_at}, total_steps={total_steps}")
    workdir = Path(workdir)
    plan = {
        "uninterrupted": ("a", None),
        "interrupted": ("b", stop_at),
        "resumed": ("b", None),
    }

    def start(leg: str) -> _Leg:
        ckpt, stop = plan[leg]
        return _start_leg(fn, workdir, leg, workdir / f"ckpt-{ckpt}", total_steps, stop, nproc, options or {})

    # The uninterrupted run shares nothing with the other two (its own checkpoint root), so it runs
    # beside them: the legs are mostly process start-up, and a check takes about half as long.
    uninterrupted = start("uninterrupted")
    try:
        start("interrupted").finish(timeout_s)
        start("resumed").finish(timeout_s)
    finally:
        uninterrupted.finish(timeout_s)
    return compare_runs(workdir, total_steps=total_steps, stop_at=stop_at, nproc=nproc)


def assert_resumes_exactly(fn: str, workdir: str | Path, **kwargs: Any) -> ResumeReport:
    """``run_resume_check`` for pytest: fails with the per-component report if not exact."""
    report = run_resume_check(fn, workdir, **kwargs)
    assert report.exact, "\n" + report.format()
    return report


@dataclass
class _Leg:
    """One leg's process (a trainer, or torchrun and its ranks) and where its log goes."""

    name: str
    fn: str
    out_dir: Path
    proc: subprocess.Popen

    def finish(self, timeout_s: float) -> None:
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            out += f"\n[ckptguard.testing] killed after timeout_s={timeout_s}"
        (self.out_dir / "log.txt").write_text(out)
        if self.proc.returncode != 0:
            raise RuntimeError(
                f"{self.name} run of {self.fn} failed (exit {self.proc.returncode}); log in "
                f"{self.out_dir / 'log.txt'}:\n" + out[-4000:]
            )


def _start_leg(
    fn: str, workdir: Path, leg: str, ckpt_dir: Path, total_steps: int, stop_at: int | None,
    nproc: int, options: dict[str, Any],
) -> _Leg:
    out_dir = workdir / leg
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "-m", "ckptguard.testing", "--fn", fn, "--ckpt-dir", str(ckpt_dir), "--out-dir", str(out_dir),
        "--total-steps", str(total_steps), "--options", json.dumps(options),
    ]
    if stop_at is not None:
        args += ["--stop-at", str(stop_at)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = _import_root(fn)
    if root is not None:  # the legs import ``fn`` by name, as this process could
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _Leg(leg, fn, out_dir, proc)


def _import_root(fn: str) -> str | None:
    """The ``sys.path`` entry from which this process imports ``fn``'s top-level package or
    module (a test file's directory, a repo root), or None when it cannot tell."""
    top = fn.partition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.has_location or spec.origin is None:
        return None
    origin = Path(spec.origin).resolve()
    return str(origin.parent.parent if spec.submodule_search_locations else origin.parent)


def _read_losses(out_dir: Path) -> dict[int, dict[int, str]]:
    """{rank: {step: hex loss}} from one leg's logs."""
    losses: dict[int, dict[int, str]] = {}
    for path in sorted(out_dir.glob("losses-rank*.jsonl")):
        rank = int(path.stem.removeprefix("losses-rank"))
        losses[rank] = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            losses[rank][rec["step"]] = rec["loss"]
    return losses


def _component_of(key: str) -> str:
    head, _, rest = key.partition(".")
    if head.startswith("rank") and head[4:].isdigit():
        return rest.split(".")[0] if not rest.startswith("extra.") else ".".join(rest.split(".")[:2])
    return head


def compare_runs(workdir: str | Path, *, total_steps: int, stop_at: int, nproc: int) -> ResumeReport:
    """Compare the legs' losses and final checkpoints; see ``run_resume_check``."""
    workdir = Path(workdir)
    ref = _read_losses(workdir / "uninterrupted")
    got = _read_losses(workdir / "interrupted")
    for rank, steps in _read_losses(workdir / "resumed").items():
        got.setdefault(rank, {}).update(steps)
    if not ref:  # the trainer records the trace only: its losses are in it
        ref, got = trace.trace_losses(workdir / "ckpt-a"), trace.trace_losses(workdir / "ckpt-b")
    by_trace = divergence.compare_traces(workdir / "ckpt-a", workdir / "ckpt-b", stop_at=stop_at)
    components: list[ComponentResult] = []

    first_bad = None
    nsteps = 0
    for rank in sorted(ref):
        for step in sorted(ref[rank]):
            nsteps += 1
            if got.get(rank, {}).get(step) != ref[rank][step] and (first_bad is None or step < first_bad):
                first_bad = step
    if first_bad is None and nsteps:
        components.append(ComponentResult("losses", True, f"{nsteps} losses identical"))
    else:
        sample = ref[min(ref)].get(first_bad) if ref and first_bad else None
        detail = f"first differs at step {first_bad}" if nsteps else "no losses recorded"
        if sample is not None:
            resumed = got.get(min(ref), {}).get(first_bad)
            detail += f" ({float.fromhex(sample)!r} vs {float.fromhex(resumed) if resumed else None!r})"
        components.append(ComponentResult("losses", False, detail))

    final = step_dirname(total_steps)
    a = load_checkpoint(workdir / "ckpt-a" / final)
    b = load_checkpoint(workdir / "ckpt-b" / final)
    by_comp: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for key in sorted(set(a) | set(b)):
        comp = _component_of(key)
        counts[comp] = counts.get(comp, 0) + 1
        if key not in a or key not in b:
            by_comp.setdefault(comp, []).append(f"{key} only in {'resumed' if key in b else 'uninterrupted'}")
        elif not values_equal(a[key], b[key]):
            by_comp.setdefault(comp, []).append(_describe_difference(key, a[key], b[key]))
    for comp in sorted(counts):
        bad = by_comp.get(comp, [])
        if bad:
            components.append(ComponentResult(comp, False, f"{len(bad)}/{counts[comp]} values differ, e.g. {bad[0]}"))
        else:
            components.append(ComponentResult(comp, True, f"{counts[comp]} values identical"))
    before = by_trace.before if by_trace else None
    after = by_trace.after if by_trace else None
    exact = all(c.exact for c in components) and before is None and after is None
    return ResumeReport(exact, components, first_bad, total_steps, stop_at, nproc, after, before)


def _describe_difference(key: str, a: Any, b: Any) -> str:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.is_floating_point():
        diff = (a.double() - b.double()).abs().max().item() if a.dtype == b.dtype else float("nan")
        return f"{key} (max abs diff {diff:.3g})"
    return key


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one leg of a resume check (used by run_resume_check)")
    p.add_argument("--fn", required=True)
    p.add_argument("--ckpt-dir", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--total-steps", required=True, type=int)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--options", default="{}")
    a = p.parse_args(argv)
    module, _, name = a.fn.partition(":")
    train = getattr(importlib.import_module(module), name)
    ctx = ResumeContext(a.ckpt_dir, a.out_dir, a.total_steps, a.stop_at, json.loads(a.options))
    distributed = ctx.world_size > 1
    on_cuda = str(ctx.options.get("device", "cpu")).startswith("cuda")
    if on_cuda:
        # one GPU per rank, before any CUDA work: NCCL refuses two ranks on one device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if distributed:
        # CUDA tensors (FSDP2's collectives) need NCCL; ckptguard's own groups stay on gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if on_cuda else "gloo")
    try:
        train(ctx)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    _main()
