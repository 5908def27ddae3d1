"""The benchmark script must keep running and keep measuring what a user gets.

A tiny-size run on 1 and 2 ranks (no timing checks), plus the report's arithmetic on made-up
numbers: targets marked met / MISSED, the cost-vs-bytes fit, the memory ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
SCRIPT = BENCH / "bench_checkpoint.py"
METHODS = ["disk", "torch.save", "dcp", "dcp.async_save", "ckptguard", "ckptguard keep_last=1",
           "ckptguard keep_last=None", "ckptguard async"]


@pytest.fixture()
def bench_path():
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture()
def report(bench_path):
    import _report

    return _report


@pytest.mark.timeout(600)
def test_benchmark_runs_every_method_on_1_and_2_ranks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "0.004", "--repeats", "2", "--warmup", "0",
         "--nproc", "1,2", "--out", str(out), "--workdir", str(work)],
        capture_output=True, text=True, env=env, timeout=550,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the saves run the path a trainer's do: the optimizer steps between them, the guard is quiet
    assert "[ERROR]" not in proc.stderr, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert [c["nproc"] for c in results["configs"]] == [1, 2]
    for cfg in results["configs"]:
        assert cfg["total_bytes"] > 0 and cfg["local_bytes"] > 0
        summary = cfg["summary"]
        assert sorted(summary) == sorted(METHODS)
        for method in ("disk", "torch.save", "dcp", "ckptguard"):
            for key in ("save_s", "load_cold_s", "load_warm_s"):
                assert summary[method][key]["median"] > 0, (cfg["nproc"], method, key)
        for method in ("ckptguard keep_last=1", "ckptguard keep_last=None"):
            assert summary[method]["save_s"]["median"] > 0, (cfg["nproc"], method)
        for method in ("dcp.async_save", "ckptguard async"):
            assert 0 < summary[method]["stall_s"]["median"] <= summary[method]["complete_s"]["median"]
        # retention is on: every timed save of a keep_last row deleted exactly one checkpoint
        # (the previous ones existed), the no-retention row deleted nothing inside its save
        for method, keep in (("ckptguard", 3), ("ckptguard keep_last=1", 1),
                             ("ckptguard async", 3)):
            assert cfg["keep_last"][method] == keep
            for rep in summary[method]["repeats"]:
                assert rep["deleted_n"] == 1, (cfg["nproc"], method, summary[method]["repeats"])
        assert all(r["deleted_n"] == 0 for r in summary["ckptguard keep_last=None"]["repeats"])
        # repeats are interleaved, the order alternating: every method sees the same disk state
        assert cfg["order"][1] == list(reversed(cfg["order"][0]))
        assert sorted(cfg["order"][0]) == sorted(METHODS)
        # the extras probes found ckptguard's save and load steps
        assert summary["ckptguard"]["save_extras"], summary["ckptguard"]
        assert summary["ckptguard"]["load_extras"], summary["ckptguard"]
        assert set(cfg["targets"]["met"]) >= {"save_vs_dcp", "save_keep1_vs_dcp", "load_cold_vs_dcp",
                                              "async_stall_pct", "extras_pct", "sync_mem_copies",
                                              "async_mem_copies"}

    md = (out / "results.md").read_text()
    assert md.index("## Headline") < md.index("### ")  # the user's view comes first
    for method in METHODS:
        assert f"| {method} |" in md
    assert "extra RSS / state" in md
    assert "s/GiB" in md
    assert "| target | value | goal | status |" in md
    # the benchmark cleans up after itself: no checkpoint left in its workdir
    leftovers = [p for p in work.rglob("*") if p.is_file() and not p.name.startswith("raw-np")]
    assert leftovers == []


def _summary(**medians: dict[str, float]) -> dict:
    return {m: {k: {"min": v, "median": v, "max": v, "n": 1} for k, v in keys.items()}
            for m, keys in medians.items()}


def test_targets_mark_misses_as_misses(report) -> None:
    s = _summary(
        dcp={"save_s": 1.0, "load_cold_s": 1.0, "load_warm_s": 0.5},
        ckptguard={"save_s": 1.25, "load_cold_s": 0.9, "load_warm_s": 0.5, "save_mem": 2**29},
        **{"ckptguard keep_last=1": {"save_s": 0.98},
           "ckptguard keep_last=None": {"save_s": 1.02},
           "ckptguard async": {"stall_s": 0.05, "save_mem": 2**20, "held_mem": 2**30}},
    )
    t = report.targets(s, size_gib=0.5, local_bytes=2**30)
    assert t["save_vs_dcp"] == pytest.approx(0.8) and t["met"]["save_vs_dcp"] is False
    assert t["met"]["save_keep1_vs_dcp"] is True
    assert t["met"]["load_cold_vs_dcp"] is True and t["met"]["load_warm_vs_dcp"] is True
    assert t["async_stall_pct"] == pytest.approx(4.0) and t["met"]["async_stall_pct"] is False
    # extras: the no-retention save against raw DCP, so deletion is not counted twice
    assert t["extras_pct"] == pytest.approx(100 * 0.02 / 1.02) and t["met"]["extras_pct"] is True
    assert t["sync_mem_ratio"] == pytest.approx(0.5) and t["met"]["sync_mem_copies"] is True
    assert t["async_mem_ratio"] == pytest.approx(1 + 2**-10) and t["met"]["async_mem_copies"] is True
    # the save ratio is a target at 0.5 and 2 GiB only; elsewhere it is shown, not judged
    small = report.targets(s, size_gib=0.0625, local_bytes=2**30)
    assert small["met"]["save_vs_dcp"] is None and small["save_vs_dcp"] == pytest.approx(0.8)
    assert report.status_text(False) == "**MISSED**" and report.status_text(True) == "met"


def test_cost_fit_is_seconds_per_gib(report) -> None:
    fit = report.linear_fit([0.0625, 0.5, 2.0], [0.1 + 3 * g for g in (0.0625, 0.5, 2.0)])
    assert fit is not None
    slope, intercept, r2 = fit
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(0.1) and r2 == pytest.approx(1.0)
    assert report.linear_fit([0.5], [1.0]) is None


def test_settle_waits_for_a_deletion_still_running_after_save(bench_path, tmp_path: Path) -> None:
    """When retention moves to a background thread, the benchmark must not time the next method
    while the old checkpoint is still being removed: it waits, and reports how long."""
    import _methods

    root = tmp_path / "root"
    (root / "step-00000002").mkdir(parents=True)
    doomed = root / ".step-00000001.deleting"
    doomed.mkdir()
    (doomed / "__0_0.distcp").write_bytes(b"x" * 1024)
    (root / ".guard").mkdir()  # a directory of the library's own that is never emptied
    (root / ".guard" / "trace.jsonl").write_text("{}")
    mgr = SimpleNamespace(root=root, keep_last=1, steps=lambda: [2],
                          layout=SimpleNamespace(step_dir=lambda s: root / f"step-{s:08d}"))
    remover = threading.Timer(0.3, shutil.rmtree, args=(doomed,))
    remover.start()
    try:
        waited = _methods._settle(mgr, timeout_s=30)
    finally:
        remover.join()
    assert not doomed.exists()
    assert waited is not None and waited >= 0.25
    # nothing left to delete: returns at once
    assert _methods._settle(mgr, timeout_s=30) < 0.25
