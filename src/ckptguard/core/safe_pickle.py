"""Read DCP's ``.metadata`` without running code from it.

Why: ``.metadata`` is a pickle, and ``pickle.load`` calls whatever callable the file names, so a
crafted file in a downloaded root or on a shared filesystem runs code the moment a checkpoint is
inspected, diffed or loaded. DCP's own ``FileSystemReader.read_metadata`` uses plain
``pickle.load``. Every read of ``.metadata`` in ckptguard goes through ``read_dcp_metadata``:

* for a ckptguard checkpoint, the bytes are checked against the size and CRC-32 the manifest
  recorded at commit *before* anything is deserialised (damage is reported as damage, and the
  bytes that are unpickled are exactly the bytes that were checked: they are read once);
* they are unpickled by ``_RestrictedUnpickler``, which, like ``torch.load(weights_only=True)``,
  admits only what DCP metadata is made of: DCP's metadata dataclasses and enums,
  ``torch.Size``, dtypes and layouts, paths, and plain containers. Anything else raises
  ``UnsafePickleError`` (a ``CheckpointFormatError``) naming the file and the type, before the
  type is even imported, so nothing the file names is run.

The unpickler is the pure-Python one with its ``BUILD``/``REDUCE``/``NEWOBJ`` handlers replaced:
the C unpickler's ``BUILD`` can ``setattr`` on a *class* it was handed, mutating an admitted
class process-wide; here ``BUILD`` only fills in instances of admitted classes.

The one opt-in for a file you trust that holds other types (a custom planner's
``planner_data``, a storage plugin's ``storage_data``) is ``unsafe_pickle``: the keyword of every
tool (``inspect_path(..., unsafe_pickle=True)``, CLI ``--unsafe-pickle``), or the context manager
``allow_unsafe_pickle()`` around any other call (e.g. ``CheckpointManager.load``). It switches to
plain ``pickle`` for ``.metadata`` and to ``weights_only=False`` for legacy ``torch.save`` files.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import importlib
import inspect
import io
import logging
import os
import pickle
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ckptguard.core.format import MANIFEST_NAME, read_checked_manifest
from ckptguard.core.integrity import HASH_ALGORITHM
from ckptguard.errors import CheckpointCorruptError, CheckpointFormatError

logger = logging.getLogger(__name__)

METADATA_NAME = ".metadata"

_F = TypeVar("_F", bound=Callable[..., Any])


class UnsafePickleError(CheckpointFormatError):
    """A pickle names a type or function outside the allowlist; nothing it names was run."""


# ---------------------------------------------------------------------- the opt-in

_UNSAFE: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptguard_unsafe_pickle", default=False)


@contextlib.contextmanager
def allow_unsafe_pickle(enabled: bool = True) -> Iterator[None]:
    """Within the block, unpickle ``.metadata`` (and legacy files) without the allowlist.

    Only for files you trust: a pickle can run any code. ``enabled=False`` is a no-op, so a
    caller can pass its own ``unsafe_pickle`` flag straight through.
    """
    token = _UNSAFE.set(_UNSAFE.get() or enabled)
    try:
        yield
    finally:
        _UNSAFE.reset(token)


def unsafe_pickle_allowed() -> bool:
    """Whether the caller opted in (``allow_unsafe_pickle`` or a tool's ``unsafe_pickle=True``)."""
    return _UNSAFE.get()


def honours_unsafe_pickle(fn: _F) -> _F:
    """Decorator for a public entry point with an ``unsafe_pickle: bool = False`` parameter: the
    whole call runs under ``allow_unsafe_pickle(unsafe_pickle)``, so readers deep inside it
    honour the flag without it being threaded through every helper."""
    signature = inspect.signature(fn)
    if "unsafe_pickle" not in signature.parameters:
        raise TypeError(f"{fn.__qualname__} has no 'unsafe_pickle' parameter")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with allow_unsafe_pickle(bool(bound.arguments["unsafe_pickle"])):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------- the allowlist

# Modules whose dataclasses and enums make up DCP metadata, now and in older torch (<= 2.0 kept
# TensorProperties in sharded_tensor.metadata). Classes added there by a newer torch are admitted
# without a ckptguard release: a dataclass is rebuilt without running its __init__.
_DCP_MODULES = frozenset({
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed._shard.metadata",
    "torch.distributed._shard.sharded_tensor.metadata",
})

# Other callables a DCP .metadata pickle names: how torch.Size, torch.layout, paths (the
# checkpoint_id in StorageMeta; pathlib._local from Python 3.13), ordered dicts, sets and, in
# pickle protocol <= 2, bytes are rebuilt. dtypes are admitted by value below.
_NAMED: frozenset[tuple[str, str]] = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
    *(
        (module, name)
        for module in ("pathlib", "pathlib._local")
        for name in ("Path", "PosixPath", "PurePath", "PurePosixPath", "PureWindowsPath")
    ),
})


def _admitted(module: str, name: str) -> Any:
    """The object ``module.name`` if the allowlist admits it; raises ``LookupError`` otherwise.

    A module outside the allowlist is never imported, so naming one runs none of its code.
    """
    # vars(), not getattr(): torch's module __getattr__ imports submodules lazily
    if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
        return vars(torch)[name]
    if (module, name) in _NAMED:
        obj = vars(importlib.import_module(module)).get(name)
        if obj is not None:
            return obj
    if module in _DCP_MODULES:
        obj = vars(importlib.import_module(module)).get(name)
        if _is_dcp_record_class(obj) or (
            isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == module
        ):
            return obj
    raise LookupError(f"{module}.{name}")


def _is_dcp_record_class(obj: Any) -> bool:
    """A dataclass defined in one of DCP's metadata modules (what BUILD/NEWOBJ may rebuild)."""
    return isinstance(obj, type) and obj.__module__ in _DCP_MODULES and dataclasses.is_dataclass(obj)


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Unpickler that resolves only admitted globals and rebuilds only admitted instances."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._callables: dict[int, Any] = {}  # what find_class handed out: all REDUCE may call

    def find_class(self, module: str, name: str) -> Any:
        try:
            obj = _admitted(module, name)
        except LookupError:
            raise UnsafePickleError(f"{module}.{name}") from None
        self._callables[id(obj)] = obj
        return obj

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if self._callables.get(id(func)) is not func:
            raise UnsafePickleError(f"a call of {type(func).__module__}.{type(func).__qualname__}")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = _load_reduce

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"persistent id {pid!r}")

    def _load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, type) or not _is_dcp_record_class(type(inst)):
            raise UnsafePickleError(f"BUILD of {type(inst).__module__}.{type(inst).__qualname__}")
        if isinstance(state, tuple) and len(state) == 2 and (state[1] is None or isinstance(state[1], dict)):
            state, slotstate = state
        else:
            slotstate = None
        if slotstate:
            raise UnsafePickleError(f"slot state of {type(inst).__qualname__}")
        setstate = type(inst).__dict__.get("__setstate__")
        if setstate is not None:  # TensorProperties: DCP's own __setstate__
            setstate(inst, state)
            return
        if state is None:
            return
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and not k.startswith("__") for k in state
        ):
            raise UnsafePickleError(f"state of {type(inst).__qualname__} that is not a field dict")
        inst.__dict__.update({sys.intern(k): v for k, v in state.items()})

    dispatch[pickle.BUILD[0]] = _load_build

    def _check_newobj_class(self, cls: Any) -> None:
        if not _is_dcp_record_class(cls):
            raise UnsafePickleError(f"NEWOBJ of {getattr(cls, '__qualname__', type(cls).__name__)}")

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack[-1]
        self._check_newobj_class(cls)
        self.stack[-1] = cls.__new__(cls, *args)

    dispatch[pickle.NEWOBJ[0]] = _load_newobj

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack[-1]
        self._check_newobj_class(cls)
        self.stack[-1] = cls.__new__(cls, *args, **kwargs)

    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex

    # INST / OBJ (protocol 0/1 class instantiation) call __init__ with arguments: DCP never writes
    # them, so they are refused outright.
    def _refuse_inst(self) -> None:
        raise UnsafePickleError("INST/OBJ opcode (protocol 0/1 object construction)")

    dispatch[pickle.INST[0]] = _refuse_inst
    dispatch[pickle.OBJ[0]] = _refuse_inst


def _forbidden_message(source: str, what: str) -> str:
    return (
        f"{source} names {what}, which DCP checkpoint metadata never contains; it was not "
        "unpickled and nothing in it ran. A crafted .metadata can run any code when unpickled: "
        "do not open this checkpoint unless you know who wrote it. If you do trust it (a custom "
        "DCP planner or storage plugin wrote it), pass unsafe_pickle=True (CLI: --unsafe-pickle) "
        "or wrap the call in `with ckptguard.core.safe_pickle.allow_unsafe_pickle():`."
    )


def loads_dcp_metadata(data: bytes, source: str, *, unsafe_pickle: bool | None = None) -> Metadata:
    """Unpickle the bytes of a DCP ``.metadata`` file named ``source`` (for messages).

    ``unsafe_pickle=None`` follows ``allow_unsafe_pickle``. Raises ``UnsafePickleError`` for a
    type outside the allowlist and ``CheckpointFormatError`` when the result is not DCP
    metadata; a truncated or garbled pickle raises ``pickle.UnpicklingError``/``EOFError`` as
    DCP's own reader would (callers report those as damage).
    """
    trusted = unsafe_pickle_allowed() if unsafe_pickle is None else unsafe_pickle
    if trusted:
        logger.warning("unpickling %s without the allowlist (unsafe_pickle=True)", source)
        metadata = pickle.loads(data)  # noqa: S301 - the caller's explicit opt-in
    else:
        try:
            metadata = _RestrictedUnpickler(io.BytesIO(data)).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(_forbidden_message(source, str(e))) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointFormatError(
            f"{source} is not DCP checkpoint metadata: it holds a {type(metadata).__name__}, not a "
            "torch.distributed.checkpoint.metadata.Metadata"
        )
    return metadata


def _check_against_manifest(step_dir: Path, name: str, data: bytes) -> None:
    """For a ckptguard checkpoint, compare the bytes of ``name`` with its manifest entry."""
    if not (step_dir / MANIFEST_NAME).is_file():
        return  # a raw DCP directory: no record to compare with
    path = step_dir / name
    entry = read_checked_manifest(step_dir)["files"].get(name)
    if not isinstance(entry, dict):
        raise CheckpointCorruptError(
            f"{path} is not listed in the manifest {step_dir / MANIFEST_NAME}, so it was not "
            "written by the save that committed this checkpoint; refusing to read it"
        )
    crc = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    if len(data) != entry.get("nbytes") or crc != entry.get(HASH_ALGORITHM):
        raise CheckpointCorruptError(
            f"{path} does not match its manifest entry ({len(data)} bytes, crc32 {crc}; the "
            f"manifest says {entry.get('nbytes')} bytes, crc32 {entry.get(HASH_ALGORITHM)}); it "
            "was not unpickled. Load another step, or use load(fallback=True)."
        )


def read_dcp_metadata(
    step_dir: str | os.PathLike, *, unsafe_pickle: bool | None = None, name: str = METADATA_NAME
) -> Metadata:
    """DCP metadata of ``step_dir``: checked against the manifest (when there is one), then
    unpickled through the allowlist. The one reader of ``.metadata`` in ckptguard (``name``:
    DCP's per-rank ``__R.metadata`` files)."""
    step_dir = Path(step_dir)
    path = step_dir / name
    with open(path, "rb") as f:
        data = f.read()
    _check_against_manifest(step_dir, name, data)
    metadata = loads_dcp_metadata(data, str(path), unsafe_pickle=unsafe_pickle)
    if getattr(metadata, "storage_meta", None) is None:  # as DCP's reader does
        metadata.storage_meta = StorageMeta()
    return metadata


def _metadata_name(reader: FileSystemReader, rank: int | None) -> str:
    """The name of DCP's metadata file that ``reader.read_metadata(rank=...)`` reads.

    ``FileSystemReader._get_metadata_path`` is private and newer than torch 2.7 (an
    AttributeError there); without it, the documented layout: ``.metadata``, or ``__R.metadata``
    for one rank's metadata (what torch 2.13's method returns; see docs/architecture.md)."""
    get_path = getattr(reader, "_get_metadata_path", None)
    if get_path is not None:
        return Path(get_path(rank)).name
    return ".metadata" if rank is None else f"__{rank}.metadata"


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with ``read_metadata`` going through ``read_dcp_metadata``.

    For the tools (DCP's own reads of tensors use ``torch.load(weights_only=True)`` already).
    ``metadata``: what the caller already read with ``read_dcp_metadata`` (DCP's loader turns
    any error of ``read_metadata`` into an opaque ``CheckpointException``, so callers read
    first to raise ours; the bytes are then not read twice).
    """

    def __init__(self, path: str | os.PathLike, *, metadata: Metadata | None = None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = getattr(self, "_metadata", None) if rank is None else None
        if metadata is None:
            name = _metadata_name(self, rank)
            metadata = read_dcp_metadata(self.path, name=name)
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------- non-tensor values in shards


class _WeightsOnlyBytes:
    """``load_bytes`` for DCP load planners: DCP's ``DefaultLoadPlanner`` reads every non-tensor
    value of a shard (optimizer hyperparameters, a raw checkpoint's extras) with
    ``torch.load(weights_only=False)``, a second way for a crafted checkpoint to run code. Here
    it is ``weights_only=True`` unless the caller opted in (``allow_unsafe_pickle``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        trusted = unsafe_pickle_allowed()
        try:
            obj = torch.load(value, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(
                f"the value '{fqn}' in the checkpoint's shards needs more than tensors and plain "
                f"values to unpickle ({str(e).splitlines()[0]}); it was not unpickled and nothing "
                "in it ran. If you trust the checkpoint, pass unsafe_pickle=True (CLI: "
                "--unsafe-pickle) or wrap the call in `with ckptguard.core.safe_pickle.allow_unsafe_pickle():`."
            ) from None
        if self.flatten_state_dict:  # type: ignore[attr-defined] - as DefaultLoadPlanner does
            set_element(self.original_state_dict, self.mappings[fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[fqn] = obj  # type: ignore[attr-defined]


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """DCP's default load planner, non-tensor values read with ``weights_only=True``."""


class SafeEmptyStateDictLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds a state dict from metadata (the tools), made safe likewise."""


def unsafe_pickle_cause(e: BaseException) -> UnsafePickleError | None:
    """The ``UnsafePickleError`` behind ``e``, if any: DCP's loader wraps what a reader or
    planner raises into a ``CheckpointException`` (on every rank, in ``failures``), and callers
    re-raise ours so the user reads which file or value was refused, not a traceback dump."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, UnsafePickleError):
            return cur
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [cur.__cause__, cur.__context__]
    return None
