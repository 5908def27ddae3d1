"""The benchmark script must keep running: a tiny-size run on 1 and 2 ranks, no timing checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_checkpoint.py"
METHODS = ["disk", "torch.save", "dcp", "dcp.async_save", "ckptguard", "ckptguard async"]


@pytest.mark.timeout(600)
def test_benchmark_runs_every_method_on_1_and_2_ranks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "0.004", "--repeats", "1", "--nproc", "1,2",
         "--out", str(out), "--workdir", str(work)],
        capture_output=True, text=True, env=env, timeout=550,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert [c["nproc"] for c in results["configs"]] == [1, 2]
    for cfg in results["configs"]:
        assert cfg["total_bytes"] > 0
        summary = cfg["summary"]
        assert sorted(summary) == sorted(METHODS)
        for method in ("disk", "torch.save", "dcp", "ckptguard"):
            for key in ("save_s", "load_cold_s", "load_warm_s"):
                assert summary[method][key]["median"] > 0, (cfg["nproc"], method, key)
        for method in ("dcp.async_save", "ckptguard async"):
            assert 0 < summary[method]["stall_s"]["median"] <= summary[method]["complete_s"]["median"]
        # the extras probes found ckptguard's save and load steps
        assert summary["ckptguard"]["save_extras"], summary["ckptguard"]
        assert summary["ckptguard"]["load_extras"], summary["ckptguard"]
        assert set(cfg["targets"]["met"]) >= {"save_vs_dcp", "async_stall_pct", "extras_pct"}

    md = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in md
    assert "| target | value | goal | status |" in md
    # the benchmark cleans up after itself: no checkpoint left in its workdir
    leftovers = [p for p in work.rglob("*") if p.is_file() and not p.name.startswith("raw-np")]
    assert leftovers == []
