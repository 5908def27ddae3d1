"""ckptguard.tools.migrate and the legacy-checkpoint refusal in CheckpointManager.load().

The old format keys optimizer state by integer position in param_groups. These tests build such
checkpoints with decay/no-decay groups and tied weights, and check that the migration names every
position correctly, refuses every mapping that does not fit (naming the parameter), writes
nothing when it refuses, and produces a checkpoint CheckpointManager.load() restores exactly.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.cli import main
from ckptguard.core import loading as loading_module
from ckptguard.core.format import read_manifest
from ckptguard.errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointLockedError,
    StateMismatchError,
)
from ckptguard.tools import legacy
from ckptguard.tools.migrate import build_from_factory, migrate, read_param_names
from tests._helpers import (
    RecordingBar,
    TiedLM,
    assert_model_equal,
    assert_tensors_equal,
    build_tied_optimizer,
    build_tied_training,
    make_training_objects,
    optimizer_tensors,
    save_legacy_checkpoint,
    train_steps,
)

FACTORY = "tests._helpers:tied_factory"
OPT_ORDER = ["hidden.weight", "embed.weight", "head.bias", "hidden.bias"]  # build_tied_optimizer


def _meta_tied():
    with torch.device("meta"):
        model = TiedLM()
        return model, build_tied_optimizer(model)


def _meta_kw() -> dict:
    model, optimizer = _meta_tied()
    return {"model": model, "optimizer": optimizer}


@pytest.fixture(params=["dcp", "torch"])
def old_ckpt(request, tmp_path):
    """A tied-weight trainer after 3 steps, saved in the old format; (path, objects)."""
    model, opt, sched = build_tied_training(seed=0)
    train_steps(model, opt, sched, 3)
    path = tmp_path / ("old" if request.param == "dcp" else "old.pt")
    save_legacy_checkpoint(path, model, opt, sched, step=3, fmt=request.param, epoch=0)
    return path, (model, opt, sched)


def _load_fresh(root):
    model, opt, sched = build_tied_training(seed=123)  # different init: everything must load
    with CheckpointManager(root, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        step = mgr.load()
    return step, (model, opt, sched)


# ---------------------------------------------------------------------- load() refuses old formats


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_load_refuses_old_index_keyed_checkpoint_instead_of_starting_fresh(tmp_path, fmt, monkeypatch):
    root = tmp_path / "run"
    root.mkdir()
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 2)
    old = root / ("ckpt" if fmt == "dcp" else "ckpt.pt")
    save_legacy_checkpoint(old, model, opt, sched, step=2, fmt=fmt)

    # The bug this guards against: without the check, load() finds no step-* directory and
    # returns 0, and training silently restarts with fresh weights and an empty optimizer.
    monkeypatch.setattr(loading_module, "refuse_legacy_root", lambda root: None)
    m2, o2, s2 = build_tied_training(seed=1)
    with CheckpointManager(root, model=m2, optimizer=o2, lr_scheduler=s2) as mgr:
        assert mgr.load() == 0
    monkeypatch.undo()

    with CheckpointManager(root, model=m2, optimizer=o2, lr_scheduler=s2) as mgr:
        with pytest.raises(CheckpointFormatError) as err:
            mgr.load()
    msg = str(err.value)
    assert str(old) in msg and "integer position" in msg
    assert f"ckptguard migrate {old} {root} --factory" in msg
    assert not o2.state, "the optimizer must be untouched"


def test_load_names_the_newest_of_several_old_checkpoints(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 1)
    for name in ("step-200", "step-1000", "step-99"):  # DCP dirs named like torchtitan's
        save_legacy_checkpoint(root / name, model, opt, sched, step=int(name[5:]))
    with CheckpointManager(root, model=model, optimizer=opt) as mgr:
        with pytest.raises(CheckpointFormatError) as err:
            mgr.load()
    msg = str(err.value)
    assert f"ckptguard migrate {root / 'step-1000'} {root} --factory" in msg
    assert str(root / "step-99") in msg and str(root / "step-200") in msg


def test_suggested_destination_never_collides_with_the_old_directory(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 1)
    save_legacy_checkpoint(root / "step-00000001", model, opt, sched, step=1)
    with CheckpointManager(root, model=model, optimizer=opt) as mgr:
        with pytest.raises(CheckpointFormatError, match=f"migrate {root / 'step-00000001'} {root}-ckptguard "):
            mgr.load()


def test_load_of_root_without_old_checkpoint_still_starts_at_zero(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    model, opt, sched = build_tied_training()
    torch.save(model.state_dict(), root / "weights.pt")  # a model-only file is not index-keyed
    (root / "notes.txt").write_text("hello")
    with CheckpointManager(root, model=model, optimizer=opt) as mgr:
        assert mgr.load() == 0
    with CheckpointManager(tmp_path / "absent", model=model, optimizer=opt) as mgr:
        assert mgr.load() == 0


def test_detect_legacy_does_not_flag_ckptguard_checkpoints(tmp_path):
    model, opt, sched = make_training_objects()
    train_steps(model, opt, sched, 1)
    with CheckpointManager(tmp_path / "r", model=model, optimizer=opt) as mgr:
        path = mgr.save(1)
    assert legacy.detect_legacy(path) is None
    assert legacy.find_legacy_checkpoints(tmp_path / "r") == []


# ---------------------------------------------------------------------- a correct migration


def test_migrate_restores_every_moment_on_its_parameter(old_ckpt, tmp_path):
    path, (model, opt, sched) = old_ckpt
    meta_model, meta_opt = _meta_tied()
    report = migrate(path, tmp_path / "new", model=meta_model, optimizer=meta_opt)

    assert [s.name for s in report.slots] == OPT_ORDER
    assert [s.index for s in report.slots] == [0, 1, 2, 3]
    assert report.group_sizes == [2, 2]
    assert report.not_recovered == ["rng", "dataloader"]
    assert "epoch" in report.unused_keys
    step, (m2, o2, s2) = _load_fresh(tmp_path / "new")
    assert step == 3
    assert_model_equal(model, m2)
    assert m2.head.weight is m2.embed.weight
    assert_tensors_equal(optimizer_tensors(opt), optimizer_tensors(o2), "optimizer")
    assert s2.state_dict() == sched.state_dict()
    assert o2.param_groups[0]["weight_decay"] == 0.1 and o2.param_groups[1]["weight_decay"] == 0.0


def test_migrated_checkpoint_loads_with_a_dataloader_and_later_saves_hold_it(old_ckpt, tmp_path, caplog):
    """The old format has no loader position: load warns (never silently) instead of refusing,
    so the manager can keep the loader and the next checkpoint holds its position."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    path, _ = old_ckpt
    migrate(path, tmp_path / "new", **_meta_kw())
    model, opt, sched = build_tied_training(seed=123)
    loader = StatefulDataLoader(list(range(8)), batch_size=2)
    with CheckpointManager(tmp_path / "new", model=model, optimizer=opt, lr_scheduler=sched, dataloader=loader) as mgr:
        with caplog.at_level("WARNING", logger="ckptguard.core.restore"):
            assert mgr.load() == 3
        assert "holds no 'dataloader' state" in caplog.text and "first batch" in caplog.text
        it = iter(loader)
        assert next(it).tolist() == [0, 1]
        mgr.save(4)
    assert "dataloader" in read_manifest(tmp_path / "new" / "step-00000004")["components"]


def test_migrated_checkpoint_is_fqn_keyed_with_tied_weight_once(old_ckpt, tmp_path):
    from ckptguard.tools.reader import load_tensor_state

    path, _ = old_ckpt
    report = migrate(path, tmp_path / "new", **_meta_kw())
    sd = load_tensor_state(report.destination)
    assert sorted(sd["optimizer"]["state"]) == sorted(OPT_ORDER)  # head.weight is embed.weight
    assert sd["optimizer"]["param_groups"][0]["params"] == OPT_ORDER[:2]
    assert set(sd["model"]) == {"embed.weight", "hidden.weight", "hidden.bias", "head.weight", "head.bias"}


def test_migrated_manifest_has_every_field_the_manager_writes(old_ckpt, tmp_path):
    path, _ = old_ckpt
    report = migrate(path, tmp_path / "new", **_meta_kw())
    model, opt, sched = build_tied_training()
    with CheckpointManager(tmp_path / "ref", model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        ref = read_manifest(mgr.save(1))
    got = read_manifest(report.destination)
    assert set(ref) - set(got) == set(), "migrate's manifest lacks fields the manager writes"
    # "guard" is what the resume guard records about the live trainer at save time; a migrated
    # checkpoint has no live trainer behind it and the guard reads it with info.get("guard", {}).
    assert set(ref["info"]) - set(got["info"]) - {"guard"} == set()
    assert got["migrated_from"]["path"] == str(path.resolve())
    assert "rng" not in got["components"]


def test_param_names_file_in_optimizer_order(old_ckpt, tmp_path):
    path, (model, opt, _) = old_ckpt
    names = tmp_path / "names.txt"
    names.write_text("# optimizer order\n" + "\n".join(OPT_ORDER) + "\n")
    report = migrate(path, tmp_path / "new", param_names=read_param_names(names))
    assert report.mapping_source == "names file"
    # without a model the tied alias cannot be known, so the name as listed is used
    assert [s.name for s in report.slots] == OPT_ORDER


def test_param_names_with_model_resolve_tied_alias(old_ckpt, tmp_path):
    path, (model, opt, _) = old_ckpt
    order = ["hidden.weight", "head.weight", "head.bias", "hidden.bias"]  # head.weight is embed.weight
    report = migrate(path, tmp_path / "new", model=_meta_tied()[0], param_names=order)
    assert [s.name for s in report.slots] == OPT_ORDER
    _, (m2, o2, _) = _load_fresh(tmp_path / "new")
    assert_tensors_equal(optimizer_tensors(opt), optimizer_tensors(o2), "optimizer")


def test_model_only_single_group_uses_named_parameters_order(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, None, 2)
    save_legacy_checkpoint(tmp_path / "old.pt", model, opt, step=2, fmt="torch")
    with torch.device("meta"):
        meta = TiedLM()
    report = migrate(tmp_path / "old.pt", tmp_path / "new", model=meta)
    assert "named_parameters" in report.mapping_source
    m2 = TiedLM()
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    with CheckpointManager(tmp_path / "new", model=m2, optimizer=o2) as mgr:
        assert mgr.load() == 2
    assert_tensors_equal(optimizer_tensors(opt), optimizer_tensors(o2), "optimizer")


def test_saved_param_names_are_used_and_cross_checked(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, named[n]) for n in OPT_ORDER[:2]], "weight_decay": 0.1},
        {"params": [(n, named[n]) for n in OPT_ORDER[2:]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    train_steps(model, opt, None, 2)
    save_legacy_checkpoint(tmp_path / "old.pt", model, opt, step=2, fmt="torch")
    report = migrate(tmp_path / "old.pt", tmp_path / "new", model=_meta_tied()[0])
    assert report.mapping_source.startswith("param_names saved")
    assert [s.name for s in report.slots] == OPT_ORDER
    wrong = ["embed.weight", "hidden.weight", "head.bias", "hidden.bias"]
    with pytest.raises(StateMismatchError, match="saved the names"):
        migrate(tmp_path / "old.pt", tmp_path / "new2", model=_meta_tied()[0], param_names=wrong)


def test_wrapper_prefix_is_stripped(tmp_path):
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 1)
    sd = {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
          "optimizer": opt.state_dict(), "step": 1}
    torch.save(sd, tmp_path / "ddp.pt")
    report = migrate(tmp_path / "ddp.pt", tmp_path / "new", **_meta_kw())
    assert report.stripped_prefix == "module."
    _, (m2, _, _) = _load_fresh_no_sched(tmp_path / "new")
    assert_model_equal(model, m2)


def _load_fresh_no_sched(root):
    model, opt, sched = build_tied_training(seed=5)
    with CheckpointManager(root, model=model, optimizer=opt) as mgr:
        return mgr.load(), (model, opt, sched)


def test_missing_hyperparameters_are_filled_from_the_optimizer(tmp_path):
    """An old torch did not have AdamW's decoupled_weight_decay: a DCP load of the migrated
    checkpoint finds no value for it; migrate takes it from the optimizer built like the old
    one (as Optimizer.load_state_dict would default it), and reports it."""
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 2)
    osd = opt.state_dict()
    for g in osd["param_groups"]:
        del g["decoupled_weight_decay"]
    torch.save({"model": model.state_dict(), "optimizer": osd, "step": 2,
                "lr_scheduler": sched.state_dict()}, tmp_path / "old.pt")

    names = migrate(tmp_path / "old.pt", tmp_path / "names", param_names=OPT_ORDER)
    assert names.filled_hyperparameters == {}  # no optimizer to take the value from

    report = migrate(tmp_path / "old.pt", tmp_path / "new", **_meta_kw())
    assert report.filled_hyperparameters == {
        "param_groups[0]": ["decoupled_weight_decay"], "param_groups[1]": ["decoupled_weight_decay"],
    }
    from ckptguard.tools.reader import load_tensor_state

    groups = load_tensor_state(report.destination)["optimizer"]["param_groups"]
    assert [g["decoupled_weight_decay"] for g in groups] == [True, True]
    step, (m2, o2, _) = _load_fresh(tmp_path / "new")
    assert step == 2
    assert_tensors_equal(optimizer_tensors(opt), optimizer_tensors(o2), "optimizer")


def test_dry_run_writes_nothing(old_ckpt, tmp_path):
    path, _ = old_ckpt
    report = migrate(path, tmp_path / "new", **_meta_kw(), dry_run=True)
    assert report.destination is None and len(report.slots) == 4
    assert not (tmp_path / "new").exists()


def test_step_override_and_missing_step(tmp_path):
    model, opt, _ = build_tied_training()
    train_steps(model, opt, None, 1)
    save_legacy_checkpoint(tmp_path / "old.pt", model, opt, fmt="torch")  # no step key
    # the optimizer's per-parameter step says 1 (no source at all: tests/unit/test_step_inference.py)
    inferred = migrate(tmp_path / "old.pt", tmp_path / "inferred", **_meta_kw())
    assert inferred.step == 1 and "optimizer per-parameter 'step'" in inferred.step_source
    report = migrate(tmp_path / "old.pt", tmp_path / "new", step=7, **_meta_kw())
    assert report.destination.endswith("step-00000007")


# ---------------------------------------------------------------------- refusals, nothing written


def _assert_nothing_written(root):
    assert not root.exists() or not any(p.name.startswith(("step-", ".step-")) for p in root.iterdir())


def test_wrong_order_is_refused_naming_the_parameter(old_ckpt, tmp_path):
    """The naive mapping (named_parameters order) would put hidden.weight's moments on the
    embedding; the shapes betray it."""
    path, _ = old_ckpt
    naive = [n for n, _ in TiedLM().named_parameters()]
    with pytest.raises(StateMismatchError) as err:
        migrate(path, tmp_path / "new", model=_meta_tied()[0], param_names=naive)
    assert "'embed.weight'" in str(err.value) and "position 0" in str(err.value)
    _assert_nothing_written(tmp_path / "new")


def test_model_alone_cannot_name_several_groups(old_ckpt, tmp_path):
    path, _ = old_ckpt
    with pytest.raises(StateMismatchError, match="2 param groups of sizes \\[2, 2\\]"):
        migrate(path, tmp_path / "new", model=_meta_tied()[0])
    _assert_nothing_written(tmp_path / "new")


def test_group_sizes_must_match(old_ckpt, tmp_path):
    path, _ = old_ckpt
    with torch.device("meta"):
        model = TiedLM()
        opt = torch.optim.AdamW(model.parameters())  # one group of 4, not [2, 2]
    with pytest.raises(StateMismatchError, match=r"sizes \[2, 2\].*sizes \[4\]"):
        migrate(path, tmp_path / "new", model=model, optimizer=opt)
    _assert_nothing_written(tmp_path / "new")


@pytest.mark.parametrize("names, match", [
    (["hidden.weight", "embed.weight", "head.bias"], "has 4 parameters"),
    (["hidden.weight", "embed.weight", "head.bias", "nope"], "'nope' is not among"),
    (["hidden.weight", "embed.weight", "head.weight", "hidden.bias"], "tied to 'embed.weight'"),
])
def test_bad_names_are_refused(old_ckpt, tmp_path, names, match):
    path, _ = old_ckpt
    with pytest.raises(StateMismatchError, match=match):
        migrate(path, tmp_path / "new", model=_meta_tied()[0], param_names=names)
    _assert_nothing_written(tmp_path / "new")


def test_model_whose_parameters_do_not_match_is_refused(old_ckpt, tmp_path):
    path, _ = old_ckpt

    class Wider(TiedLM):
        def __init__(self):
            super().__init__(dim=24)

    with torch.device("meta"):
        model = Wider()
        opt = build_tied_optimizer(model)
    with pytest.raises(StateMismatchError, match="'hidden.weight'|'embed.weight'"):
        migrate(path, tmp_path / "new", model=model, optimizer=opt)

    class Extra(TiedLM):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with torch.device("meta"):
        model = Extra()
        opt = build_tied_optimizer(model)
    with pytest.raises(StateMismatchError, match="missing \\['extra.bias', 'extra.weight'\\]"):
        migrate(path, tmp_path / "new", model=model, optimizer=opt)
    _assert_nothing_written(tmp_path / "new")


def test_optimizer_of_another_model_is_refused(old_ckpt, tmp_path):
    path, _ = old_ckpt
    other, other_opt = _meta_tied()
    with pytest.raises(StateMismatchError, match="not a parameter of the model"):
        migrate(path, tmp_path / "new", model=_meta_tied()[0], optimizer=other_opt)


def test_existing_step_is_not_overwritten_unless_asked(old_ckpt, tmp_path):
    path, _ = old_ckpt
    kw = _meta_kw()
    first = migrate(path, tmp_path / "new", **kw)
    before = read_manifest(first.destination)["files"]
    with pytest.raises(CheckpointExistsError):
        migrate(path, tmp_path / "new", **kw)
    assert read_manifest(first.destination)["files"] == before
    migrate(path, tmp_path / "new", overwrite=True, **kw)


def test_destination_held_by_a_running_manager_is_refused(old_ckpt, tmp_path):
    path, _ = old_ckpt
    model, opt, _ = build_tied_training()
    with CheckpointManager(tmp_path / "new", model=model, optimizer=opt) as running:
        running.save(1)  # a manager becomes the root's writer at its first save
        with pytest.raises(CheckpointLockedError):
            migrate(path, tmp_path / "new", **_meta_kw())


def test_inputs_that_are_not_old_checkpoints(tmp_path):
    kw = _meta_kw()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointFormatError, match="cannot read"):
        migrate(tmp_path / "junk.pt", tmp_path / "new", **kw)
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        migrate(tmp_path / "absent", tmp_path / "new", **kw)
    model, opt, _ = build_tied_training()
    with CheckpointManager(tmp_path / "r", model=model, optimizer=opt) as mgr:
        done = mgr.save(1)
    with pytest.raises(CheckpointFormatError, match="already a ckptguard checkpoint"):
        migrate(done, tmp_path / "new", **kw)
    torch.save({"model": model.state_dict()}, tmp_path / "model_only.pt")
    with pytest.raises(CheckpointFormatError, match="found 0 index-keyed optimizer"):
        migrate(tmp_path / "model_only.pt", tmp_path / "new", **kw)
    _assert_nothing_written(tmp_path / "new")


def test_inconsistent_optimizer_state_is_refused(tmp_path):
    model, opt, _ = build_tied_training()
    train_steps(model, opt, None, 1)
    osd = opt.state_dict()
    osd["state"][9] = osd["state"][0]
    torch.save({"model": model.state_dict(), "optimizer": osd, "step": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointFormatError, match=r"positions \[9\]"):
        migrate(tmp_path / "old.pt", tmp_path / "new", **_meta_kw())


# ---------------------------------------------------------------------- factory and CLI


def test_factory_builds_on_meta_device():
    model, opt = build_from_factory("tests._helpers:tied_factory")
    assert model.embed.weight.is_meta and opt is not None


def test_factory_that_needs_real_tensors_is_called_once_and_names_no_meta(tmp_path):
    """A factory may have side effects (open a run, allocate a GPU): it is called exactly once.
    A failure on the meta device names --no-meta instead of silently calling it again on CPU."""
    calls = tmp_path / "calls.txt"
    mod = tmp_path / "needs_cpu.py"
    mod.write_text(
        "import torch\n"
        "from tests._helpers import TiedLM\n"
        "def build():\n"
        f"    open({str(calls)!r}, 'a').write('x')\n"
        "    m = TiedLM()\n"
        "    assert not m.embed.weight.is_meta, 'refuses meta'\n"
        "    return m\n"
    )
    with pytest.raises(ValueError, match="--no-meta"):
        build_from_factory(f"{mod}:build")
    assert calls.read_text() == "x"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt = build_from_factory(f"{mod}:build", meta=False)
    assert calls.read_text() == "xx"
    assert not model.embed.weight.is_meta and opt is None


@pytest.mark.parametrize("spec", ["nocolon", "tests._helpers:nope", "/no/such/file.py:fn"])
def test_bad_factory_specs(spec):
    with pytest.raises(ValueError):
        build_from_factory(spec)


def test_cli_migrate(old_ckpt, tmp_path, capsys):
    path, (model, opt, _) = old_ckpt
    assert main(["migrate", str(path), str(tmp_path / "new"), "--factory", FACTORY, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would migrate" in out and "embed.weight" in out and "nothing written" in out
    assert not (tmp_path / "new").exists()

    assert main(["migrate", str(path), str(tmp_path / "new"), "--factory", FACTORY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["destination"].endswith("step-00000003")
    assert [s["name"] for s in report["slots"]] == OPT_ORDER
    _, (m2, o2, _) = _load_fresh(tmp_path / "new")
    assert_tensors_equal(optimizer_tensors(opt), optimizer_tensors(o2), "optimizer")


def test_cli_migrate_errors(old_ckpt, tmp_path, capsys):
    path, _ = old_ckpt
    assert main(["migrate", str(path), str(tmp_path / "new")]) == 2
    assert "--factory" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("\n".join(n for n, _ in TiedLM().named_parameters()))
    assert main(["migrate", str(path), str(tmp_path / "new"), "--factory", FACTORY,
                 "--param-names", str(names)]) == 2
    err = capsys.readouterr().err
    assert "embed.weight" in err and "error" in err
    _assert_nothing_written(tmp_path / "new")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_old_checkpoint_saved_from_gpu_migrates_and_loads_on_gpu(tmp_path):
    """torch.save of CUDA tensors: migrate reads them to CPU, the manager loads them back onto
    the GPU model, every moment equal."""
    model, opt, sched = build_tied_training()
    model.cuda()
    opt = build_tied_optimizer(model)
    x = torch.randint(0, 33, (8, 4), device="cuda")
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x), x[:, -1]).backward()
        opt.step()
        opt.zero_grad()
    save_legacy_checkpoint(tmp_path / "old.pt", model, opt, step=2, fmt="torch")
    migrate(tmp_path / "old.pt", tmp_path / "new", **_meta_kw())
    m2 = TiedLM().cuda()
    o2 = build_tied_optimizer(m2)
    with CheckpointManager(tmp_path / "new", model=m2, optimizer=o2) as mgr:
        assert mgr.load() == 2
    assert m2.embed.weight.is_cuda
    assert_tensors_equal(
        {k: v.cpu() for k, v in optimizer_tensors(opt).items()},
        {k: v.cpu() for k, v in optimizer_tensors(o2).items()}, "optimizer",
    )


def test_migrate_reports_progress_per_phase(old_ckpt, tmp_path, monkeypatch):
    bar = RecordingBar()
    monkeypatch.setattr("ckptguard.tools.migrate.progress", bar)
    migrate(old_ckpt[0], tmp_path / "new", **_meta_kw())
    assert bar.calls[0]["desc"] == "migrate" and bar.calls[0]["total"] == 3
    assert bar.phases == ["reading", "mapping", "writing"] and bar.updates == 3
