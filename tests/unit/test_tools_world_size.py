"""The tools on a checkpoint written by 2 ranks (FSDP2, gloo) next to the same state written
by 1 rank: diff compares them key for key, export consolidates the shards, inspect shows the
per-rank files.

One ``torchrun --nproc_per_node=2`` job (module-scoped) loads the 1-rank checkpoint into an
FSDP2 model and saves it again, so both checkpoints hold the same model/optimizer/scheduler
state, sharded differently, with per-rank RNG state of different world sizes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckptguard.cli import main
from ckptguard.tools.diff import diff_checkpoints
from ckptguard.tools.export import export_model
from ckptguard.tools.inspect import inspect_path
from tests._helpers import assert_tensors_equal, launcher_free_env, make_ckptguard_checkpoint

REPO = Path(__file__).resolve().parents[2]

_RESHARD = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, {repo!r})
    from ckptguard import CheckpointManager
    from ckptguard.demo import TinyLM, build_optimizer

    src, dst = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    model = TinyLM()
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model.hidden, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    with CheckpointManager(src, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        step = mgr.load()
    with CheckpointManager(dst, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        mgr.save(step)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def two_world_sizes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worlds")
    one = make_ckptguard_checkpoint(tmp / "one", steps=(3,))
    script = tmp / "reshard.py"
    script.write_text(_RESHARD.format(repo=str(REPO)))
    env = dict(launcher_free_env(), OMP_NUM_THREADS="1", CKPTGUARD_NO_PROGRESS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(one), str(tmp / "two")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return one / "step-00000003", tmp / "two" / "step-00000003"


def test_the_two_rank_checkpoint_is_sharded(two_world_sizes):
    _, two = two_world_sizes
    assert sorted(p.name for p in two.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in two.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]


def test_diff_across_world_sizes(two_world_sizes, capsys):
    one, two = two_world_sizes
    report = diff_checkpoints(one, two)
    assert report.world_sizes == (1, 2)
    assert report.equal, report.format()
    assert report.not_compared == ["dataloader", "rng"]
    assert report.within_tolerance == []  # bit-for-bit, not merely close
    assert report.identical == report.compared > 40
    assert main(["diff", str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "not compared (per-rank state; world sizes differ 1 vs 2): dataloader, rng" in out


def test_diff_across_world_sizes_still_sees_a_difference(two_world_sizes, tmp_path):
    """The exit code 0 above is earned: a checkpoint one training step further differs."""
    one, two = two_world_sizes
    later = make_ckptguard_checkpoint(tmp_path / "later", steps=(4,))
    report = diff_checkpoints(later, two)
    assert not report.equal
    assert {d.key.split(".")[0] for d in report.differing} >= {"model", "optimizer"}


def test_export_consolidates_the_shards(two_world_sizes, tmp_path):
    one, two = two_world_sizes
    export_model(one, tmp_path / "one.pt")
    export_model(two, tmp_path / "two.safetensors")
    from safetensors.torch import load_file

    ref = torch.load(tmp_path / "one.pt", weights_only=True)
    got = load_file(tmp_path / "two.safetensors")
    assert_tensors_equal(ref, got, "exported from 2 ranks")
    assert got["embed.weight"].shape == (33, 32)  # uneven FSDP shard (33 rows over 2 ranks)


def test_inspect_shows_world_size_and_rank_files(two_world_sizes):
    _, two = two_world_sizes
    info = inspect_path(two)
    assert info.world_size == 2 and info.files == 6
    rng = next(c for c in info.components if c.name == "rng")
    assert rng.ranks == [0, 1]
    model = next(c for c in info.components if c.name == "model")
    assert {t.key: t.shape for t in model.tensors}["embed.weight"] == [33, 32]  # full shape
    assert "(per rank; rank 0 shown, 2 ranks in all)" in info.format()

