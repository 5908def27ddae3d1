"""Opening a checkpoint someone else wrote runs none of their code (issue 11, point 3).

DCP's ``.metadata`` is a pickle. Each test plants a crafted one whose unpickling would create a
marker file (a ``__reduce__`` to ``open(marker, "w")``), in a ckptguard checkpoint whose manifest
was updated to match it (so the checksum passes) and in a raw DCP directory inside a root, then
opens it the way a user would: ``CheckpointManager.load()``, ``inspect``, ``verify``, ``diff``,
``export``, ``migrate``, and the CLI. Every one must refuse with ``CheckpointFormatError`` naming
the file and the type, and the marker must not exist. A legit checkpoint still round-trips, and
the one opt-in (``unsafe_pickle``) opens a legit-but-odd file.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.distributed.checkpoint.metadata import StorageMeta

from ckptguard import CheckpointManager
from ckptguard.cli import main
from ckptguard.core.integrity import hash_files
from ckptguard.core.reader import DirectFileSystemReader
from ckptguard.core.safe_pickle import (
    UnsafePickleError,
    allow_unsafe_pickle,
    loads_dcp_metadata,
    read_dcp_metadata,
)
from ckptguard.errors import CheckpointCorruptError, CheckpointFormatError
from ckptguard.tools.diff import diff_checkpoints
from ckptguard.tools.export import export_model
from ckptguard.tools.inspect import inspect_path
from ckptguard.tools.migrate import build_from_factory, load_factory, migrate
from ckptguard.tools.reader import load_tensor_state
from ckptguard.tools.verify import verify_path
from tests._helpers import (
    assert_model_equal,
    assert_tensors_equal,
    make_ckptguard_checkpoint,
    make_loader,
    make_training_objects,
    optimizer_tensors,
    save_legacy_checkpoint,
    train_on_batches,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]

STEP = "step-00000002"


class _OpenMarker:
    """Unpickles as ``open(marker, "w")``: creates the marker file if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class OddStorageMeta(StorageMeta):
    """A legit but unusual ``storage_meta``: what a custom DCP storage plugin might write."""

    plugin: str = "acme-object-store"


def _rewrite_metadata(dcp_dir: Path, change, *, update_manifest: bool = True) -> None:
    """Rewrite ``dcp_dir/.metadata`` with ``change(metadata)`` applied; the test's own file, so
    plain pickle is fine here. With ``update_manifest`` its manifest entry is made to match."""
    path = dcp_dir / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))
    manifest_path = dcp_dir / "ckptguard.json"
    if update_manifest and manifest_path.is_file():
        import json

        manifest = json.loads(manifest_path.read_text())
        manifest["files"].update(hash_files(dcp_dir, [".metadata"]))
        manifest_path.write_text(json.dumps(manifest))


def _plant(dcp_dir: Path, marker: Path, **kw) -> None:
    _rewrite_metadata(dcp_dir, lambda md: setattr(md, "version", _OpenMarker(marker)), **kw)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def crafted_root(tmp_path, marker) -> Path:
    """(a) a ckptguard root whose checkpoint has a crafted .metadata and a matching manifest."""
    root = make_ckptguard_checkpoint(tmp_path / "ours", steps=(2,))
    _plant(root / STEP, marker)
    return root


@pytest.fixture
def raw_dcp_root(tmp_path, marker) -> Path:
    """(b) a root holding only a raw DCP directory (an old trainer's) with a crafted .metadata."""
    model, optimizer, scheduler = make_training_objects()
    train_on_batches(model, optimizer, scheduler, list(make_loader())[:2])
    root = tmp_path / "downloaded"
    root.mkdir()
    save_legacy_checkpoint(root / "old_dcp", model, optimizer, scheduler, step=2)
    _plant(root / "old_dcp", marker)
    return root


def _assert_refused(excinfo, file: Path, marker: Path) -> None:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, CheckpointFormatError)
    assert str(file / ".metadata") in msg, msg
    assert "open" in msg and "unsafe_pickle" in msg, msg
    assert not marker.exists(), "the crafted .metadata ran code"


def _manager_load(root: Path) -> int:
    model, optimizer, scheduler = make_training_objects(seed=1)
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader()) as mgr:
        return mgr.load()


OPENERS = {
    "load": _manager_load,
    "inspect": lambda root: inspect_path(root),
    "verify": lambda root: verify_path(root),
    "diff": lambda root: diff_checkpoints(root, root),
    "export": lambda root: export_model(root, root.parent / "model.pt"),
}


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_crafted_metadata_in_a_ckptguard_checkpoint_runs_nothing(crafted_root, marker, opener):
    with pytest.raises(CheckpointFormatError) as excinfo:
        OPENERS[opener](crafted_root)
    _assert_refused(excinfo, crafted_root / STEP, marker)


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_crafted_metadata_in_a_raw_dcp_dir_of_a_root_runs_nothing(raw_dcp_root, marker, opener):
    with pytest.raises(CheckpointFormatError) as excinfo:
        OPENERS[opener](raw_dcp_root)
    _assert_refused(excinfo, raw_dcp_root / "old_dcp", marker)


def test_migrate_and_inspect_of_the_raw_dcp_dir_itself_run_nothing(raw_dcp_root, marker, tmp_path):
    old = raw_dcp_root / "old_dcp"
    with pytest.raises(CheckpointFormatError) as excinfo:
        migrate(old, tmp_path / "new", model=make_training_objects()[0])
    _assert_refused(excinfo, old, marker)
    with pytest.raises(CheckpointFormatError) as excinfo:
        inspect_path(old)
    _assert_refused(excinfo, old, marker)


@pytest.mark.parametrize("command", ["inspect", "verify", "diff", "export"])
def test_cli_refuses_crafted_metadata_with_exit_2(crafted_root, marker, command, capsys):
    args = {
        "inspect": ["inspect", str(crafted_root)],
        "verify": ["verify", str(crafted_root)],
        "diff": ["diff", str(crafted_root), str(crafted_root)],
        "export": ["export", str(crafted_root), str(crafted_root.parent / "m.pt")],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ".metadata" in err and "open" in err and "--unsafe-pickle" in err
    assert not marker.exists()


def test_the_managers_dcp_reader_refuses_on_its_own(crafted_root, marker):
    """The reader ``dcp.load`` uses in ``CheckpointManager.load`` is guarded too, not only the
    key check that happens to read ``.metadata`` first."""
    with pytest.raises(UnsafePickleError):
        DirectFileSystemReader(crafted_root / STEP).read_metadata()
    assert not marker.exists()


def test_metadata_not_matching_the_manifest_is_not_unpickled(tmp_path, marker):
    """A tampered .metadata whose manifest entry was *not* updated is damage: refused before
    unpickling, even with verify_on_load=False and by tools that do not verify (inspect)."""
    root = make_ckptguard_checkpoint(tmp_path / "root", steps=(2,))
    _plant(root / STEP, marker, update_manifest=False)
    model, optimizer, scheduler = make_training_objects(seed=1)
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader(), verify_on_load=False) as mgr:
        with pytest.raises(CheckpointCorruptError, match=r"\.metadata does not match its manifest"):
            mgr.load()
    with pytest.raises(CheckpointCorruptError, match=r"\.metadata does not match its manifest"):
        inspect_path(root)
    assert not marker.exists()


def test_build_on_an_admitted_class_cannot_mutate_it():
    """``BUILD`` with slot state on a *class* would ``setattr`` on it process-wide (the C
    unpickler allows it even with a restricted ``find_class``); here it is refused."""
    crafted = (
        b"ctorch.distributed.checkpoint.metadata\nStorageMeta\n"  # GLOBAL: the class itself
        b"N}S'save_id'\nS'tampered'\ns\x86b."  # BUILD (None, {"save_id": "tampered"})
    )
    with pytest.raises(UnsafePickleError, match="BUILD"):
        loads_dcp_metadata(crafted, "crafted")
    assert StorageMeta.save_id is None


def test_a_module_outside_the_allowlist_is_never_imported():
    name = "ckptguard_test_never_imported_module"
    crafted = f"c{name}\nboom\n(tR.".encode()
    with pytest.raises(UnsafePickleError, match=f"{name}.boom"):
        loads_dcp_metadata(crafted, "crafted")
    assert name not in sys.modules


def _plant_in_shards(step_dir: Path, marker: Path) -> None:
    """Rewrite a checkpoint's DCP part with an optimizer hyperparameter (a non-tensor value,
    which DCP's default planner reads with ``torch.load(weights_only=False)``) replaced by the
    payload; the manifest is made to match."""
    import json

    import torch.distributed.checkpoint as dcp

    sd = load_tensor_state(step_dir)  # still legit here
    sd["optimizer"]["param_groups"][0]["lr"] = _OpenMarker(marker)
    for f in [*step_dir.glob("*.distcp"), step_dir / ".metadata"]:
        f.unlink()
    dcp.save(sd, checkpoint_id=step_dir, no_dist=True)
    manifest = json.loads((step_dir / "ckptguard.json").read_text())
    names = [f.name for f in step_dir.glob("*.distcp")] + [".metadata"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.endswith(".distcp")}
    manifest["files"].update(hash_files(step_dir, names))
    (step_dir / "ckptguard.json").write_text(json.dumps(manifest))


def test_crafted_value_in_the_shards_runs_nothing(tmp_path, marker):
    root = make_ckptguard_checkpoint(tmp_path / "ours", steps=(2,))
    _plant_in_shards(root / STEP, marker)
    assert verify_path(root).ok  # the manifest matches: only the unpickler stands in the way
    with pytest.raises(CheckpointFormatError, match=r"param_groups\.0\.lr"):
        _manager_load(root)
    with pytest.raises(CheckpointFormatError, match=r"param_groups\.0\.lr"):
        diff_checkpoints(root, root)
    assert not marker.exists(), "the crafted shard value ran code"


# ---------------------------------------------------------------------- legit files still open


def test_legit_checkpoint_round_trips_bit_exactly(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    loader = make_loader()
    batches = iter(loader)
    train_on_batches(model, optimizer, scheduler, [next(batches) for _ in range(3)])
    with CheckpointManager(tmp_path / "run", model=model, optimizer=optimizer,
                           lr_scheduler=scheduler, dataloader=loader) as mgr:
        mgr.save(3)
    model2, optimizer2, scheduler2 = make_training_objects(seed=7)
    with CheckpointManager(tmp_path / "run", model=model2, optimizer=optimizer2,
                           lr_scheduler=scheduler2, dataloader=make_loader()) as mgr:
        assert mgr.load() == 3
    assert_model_equal(model, model2)
    assert_tensors_equal(optimizer_tensors(optimizer), optimizer_tensors(optimizer2), "optimizer")
    info = inspect_path(tmp_path / "run")
    assert info.selected.step == 3
    assert verify_path(tmp_path / "run").ok


@pytest.fixture
def odd_root(tmp_path) -> Path:
    """A ckptguard root whose .metadata holds a type outside the allowlist, harmlessly."""
    root = make_ckptguard_checkpoint(tmp_path / "odd", steps=(2,))
    _rewrite_metadata(root / STEP, lambda md: setattr(md, "storage_meta", OddStorageMeta()))
    return root


def test_unsafe_pickle_opt_in_opens_a_legit_but_odd_file(odd_root, capsys):
    odd_type = f"{__name__}.OddStorageMeta"
    with pytest.raises(UnsafePickleError, match=odd_type):
        inspect_path(odd_root)
    assert inspect_path(odd_root, unsafe_pickle=True).selected.step == 2
    assert verify_path(odd_root, unsafe_pickle=True).ok
    assert diff_checkpoints(odd_root, odd_root, unsafe_pickle=True).equal
    assert main(["inspect", str(odd_root)]) == 2
    assert main(["inspect", "--unsafe-pickle", str(odd_root)]) == 0
    capsys.readouterr()
    # the flag is scoped to the call: nothing stays unlocked afterwards
    with pytest.raises(UnsafePickleError):
        read_dcp_metadata(odd_root / STEP)


def test_manager_load_of_an_odd_file_needs_the_opt_in_and_then_is_exact(odd_root):
    model, optimizer, scheduler = make_training_objects(seed=1)
    with CheckpointManager(odd_root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader()) as mgr:
        with pytest.raises(UnsafePickleError):
            mgr.load()
        with allow_unsafe_pickle():
            assert mgr.load() == 2
    with allow_unsafe_pickle():
        saved = load_tensor_state(odd_root / STEP)
    assert_tensors_equal(dict(model.state_dict()), saved["model"], "model")


# ---------------------------------------------------------------------- migrate --factory


def _write_factory(directory: Path, name: str = "old_trainer") -> Path:
    path = directory / f"{name}.py"
    path.write_text(
        "import torch\n"
        "from tests._helpers import TiedLM, build_tied_optimizer\n"
        "CALLS = []\n"
        "def build():\n"
        "    CALLS.append(torch.empty(0).device.type)\n"
        "    if torch.empty(0).is_meta:\n"
        "        raise RuntimeError('this factory needs real tensors')\n"
        "    model = TiedLM()\n"
        "    return model, build_tied_optimizer(model)\n"
    )
    return path


def test_factory_module_import_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    _write_factory(tmp_path, "factory_mod_path")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    fn = load_factory("factory_mod_path:build")
    assert callable(fn)
    assert sys.path == before


def test_factory_is_called_once_even_when_it_fails_on_meta(tmp_path, monkeypatch):
    _write_factory(tmp_path, "factory_mod_once")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--no-meta"):
        build_from_factory("factory_mod_once:build")
    module = sys.modules["factory_mod_once"]
    assert module.CALLS == ["meta"], module.CALLS
    module.CALLS.clear()
    model, optimizer = build_from_factory("factory_mod_once:build", meta=False)
    assert module.CALLS == ["cpu"] and optimizer is not None


def test_factory_path_that_is_not_a_python_file_is_a_clear_error(tmp_path, capsys):
    not_py = tmp_path / "weights.bin"
    not_py.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a Python file"):
        load_factory(f"{not_py}:build")
    assert main(["migrate", str(tmp_path / "old"), str(tmp_path / "new"), "--factory", f"{not_py}:build"]) == 2
    assert "not a Python file" in capsys.readouterr().err
