"""The e2e matrix of ordinary trainers (issue 10, point 6): each resumes bit-exactly.

Every cell is a trainer file in ``tests/e2e/trainers/``, written the way users write that kind
of trainer (its own model, loop and order of calls, nothing hidden in a shared helper), run by
``ckptguard.testing.assert_resumes_exactly``: uninterrupted for ``TOTAL_STEPS`` steps vs stopped
(saved) after ``STOP_AT`` and resumed in a fresh process (``torchrun`` for 2 ranks). Every loss
and every tensor and value of both final checkpoints (model, optimizer, scheduler, dataloader
position, RNG streams, extras) must be bit-identical. The data is learnable (arithmetic
progressions, ``tests._helpers.progression_windows``) and the test checks that the loss falls,
so a lost moment or a repeated batch cannot hide in a flat, noisy loss. ``STOP_AT`` is
mid-epoch in every cell: saves at an epoch boundary are covered by the epoch-boundary test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptguard.core.commit import CheckpointLayout
from ckptguard.testing import ResumeReport, assert_resumes_exactly

TOTAL_STEPS = 12
STOP_AT = 5
BASE = {"losses", "model", "optimizer", "lr_scheduler", "dataloader", "rng"}

# (trainer module, ranks, extra components the checkpoint must hold, marks)
CELLS = [
    pytest.param("plain", 1, set(), id="plain-1rank"),
    pytest.param("ddp", 2, set(), id="ddp-2ranks"),
    pytest.param("fsdp2", 2, set(), id="fsdp2-2ranks"),
    pytest.param("grad_accum", 1, set(), id="grad_accum-1rank"),
    pytest.param("grad_accum", 2, set(), id="grad_accum-ddp-2ranks"),
    pytest.param("bf16_autocast", 1, set(), id="bf16_autocast-1rank"),
    pytest.param("ema", 1, {"extra.ema"}, id="ema-1rank"),
    pytest.param("compiled", 1, set(), id="compiled-1rank"),
    pytest.param("activation_checkpointing", 1, set(), id="activation_checkpointing-1rank"),
    pytest.param("two_optimizers", 1, {"extra.embed_optimizer"}, id="two_optimizers-1rank"),
    pytest.param("two_optimizers", 2, {"extra.embed_optimizer"}, id="two_optimizers-fsdp2-2ranks"),
    pytest.param("tied_weights", 1, set(), id="tied_weights-1rank"),
    pytest.param("save_every_step", 1, set(), id="save_every_step-keep_last2-1rank"),
]


def _losses(leg_dir: Path) -> dict[int, list[float]]:
    """{rank: losses in step order} from a leg's ``ctx.record`` logs."""
    out: dict[int, list[float]] = {}
    for path in sorted(leg_dir.glob("losses-rank*.jsonl")):
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        out[int(path.stem.removeprefix("losses-rank"))] = [
            float.fromhex(r["loss"]) for r in sorted(recs, key=lambda r: r["step"])
        ]
    return out


def _assert_exact_and_learning(report: ResumeReport, workdir: Path, nproc: int, extras: set[str]) -> None:
    comps = {c.name: c for c in report.components}
    # a component missing from the checkpoint would compare as "exact" by absence
    assert set(comps) == BASE | extras, report.format()
    assert comps["losses"].detail == f"{TOTAL_STEPS * nproc} losses identical", report.format()
    losses = _losses(workdir / "uninterrupted")
    assert sorted(losses) == list(range(nproc))
    for rank, per_step in losses.items():
        assert len(per_step) == TOTAL_STEPS
        first, last = sum(per_step[:3]) / 3, sum(per_step[-3:]) / 3
        assert last < first - 0.3, f"rank {rank}: the loss did not fall ({first:.3f} -> {last:.3f}): {per_step}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("trainer,nproc,extras", CELLS)
def test_trainer_resumes_exactly(tmp_path: Path, trainer: str, nproc: int, extras: set[str]) -> None:
    report = assert_resumes_exactly(
        f"tests.e2e.trainers.{trainer}:train", tmp_path, total_steps=TOTAL_STEPS, stop_at=STOP_AT,
        nproc=nproc,
    )
    _assert_exact_and_learning(report, tmp_path, nproc, extras)
    if trainer == "save_every_step":
        # keep_last=2 held on both runs, across the resume and the final overwrite
        for run in ("ckpt-a", "ckpt-b"):
            kept = CheckpointLayout(tmp_path / run).complete_steps()
            assert kept == [TOTAL_STEPS - 1, TOTAL_STEPS], f"{run}: {kept}"
