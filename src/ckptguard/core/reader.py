"""A DCP ``FileSystemReader`` that reads each tensor straight into its destination.

Why: with ``verify_on_load`` every file is read once to check its checksum before anything is
loaded, so DCP's own read must be cheap for a load to stay near raw DCP's speed. DCP's reader
deserializes every item with ``torch.load`` into a newly allocated tensor and then copies that
into the destination: an allocation (page faults) and a second copy per byte. Each item is a
small ``torch.save`` zip whose single storage record holds the raw bytes, so when the
destination is the whole saved chunk, contiguous, on the CPU and of the saved dtype, this reader
finds that record through the zip's directory and ``readinto``s the destination's memory: one
copy, from the page cache the verification just filled. Items are read in file order.

The raw bytes are the tensor's *values* in row-major order only if the saved tensor was laid out
that way. DCP keeps the strides of a tensor whose storage holds exactly its elements (a
transposed parameter, a ``channels_last`` conv weight, the AdamW moments that inherit them), so
before copying bytes the reader reads the item's ``data.pkl`` (with an unpickler that can only
build a description of a plain tensor, never run code) and takes the fast path only when it
proves storage offset 0, row-major strides and a storage of exactly the tensor's elements.

Anything else (a saved layout that is not row-major, a reshard that narrows a chunk, a dtype
change, a non-contiguous or GPU destination, stream transforms, a zip or pickle that does not
look as expected) goes through DCP's own per-item code, which honours the saved strides, so the
fast path is an optimization with a complete fallback, never a second format.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ckptguard.core.safe_pickle import SafeFileSystemReader

logger = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_SIGNATURE = 0x04034B50


class _Slice(io.RawIOBase):
    """A seekable window ``[offset, offset + length)`` of a file, as ``zipfile`` needs it."""

    def __init__(self, raw: Any, offset: int, length: int) -> None:
        super().__init__()
        self._raw = raw
        self._offset = offset
        self._length = length
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._raw.fileno(), [memoryview(b)[:n]], self._offset + self._pos)
        self._pos += got
        return got


# The legacy storage class names ``torch.save`` writes for each dtype (``_rebuild_tensor_v2``);
# part of the serialization format, so stable. Other dtypes go through DCP's own path.
_STORAGE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
    torch.complex64: "ComplexFloatStorage",
    torch.complex128: "ComplexDoubleStorage",
}
_KNOWN_STORAGES = frozenset(_STORAGE_NAMES.values())


@dataclass(frozen=True, slots=True)
class _StoredTensor:
    """What an item's ``data.pkl`` says about its tensor, and where its raw bytes are."""

    storage_name: str  # e.g. "FloatStorage"
    storage_key: str  # the data record is ``<archive>/data/<storage_key>``
    storage_numel: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    data_offset: int = -1  # of the raw bytes, from the start of the item
    data_nbytes: int = -1

    def __setstate__(self, state: Any) -> None:
        # a frozen slots dataclass would otherwise accept BUILD: a record could rewrite its
        # own stride after _RecordRebuild checked it
        raise pickle.UnpicklingError("BUILD is not part of a plain tensor record")

    def is_row_major_whole_storage(self) -> bool:
        """True when the storage bytes, in order, are exactly the tensor's values in row-major
        order: offset 0, a storage of exactly ``numel`` elements, strides of a contiguous tensor
        (a dimension of size 1 may have any stride: it is never stepped over)."""
        numel = math.prod(self.size)
        if numel == 0:
            return True  # nothing to read
        if self.storage_offset != 0 or self.storage_numel != numel:
            return False
        expected = 1
        for n, s in zip(reversed(self.size), reversed(self.stride), strict=True):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True


class _Refuses:
    """No state can be set on these objects: the unpickler's BUILD opcode (``__setstate__``) is
    refused, so a crafted record cannot alter the recorders or what they return."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD is not part of a plain tensor record")


class _StorageRef(str):
    """The storage class named in a pickle (holds only its name)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD is not part of a plain tensor record")


class _RecordRebuild(_Refuses):
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records its arguments, builds nothing.
    A seventh argument (tensor metadata such as conj/neg bits) is not a plain tensor."""

    __slots__ = ()

    def __call__(self, *args: Any) -> _StoredTensor:
        if len(args) != 6:
            raise pickle.UnpicklingError(f"_rebuild_tensor_v2 with {len(args)} arguments")
        storage, offset, size, stride, _requires_grad, hooks = args
        if not (isinstance(storage, tuple) and len(storage) == 3) or hooks != {}:
            raise pickle.UnpicklingError("not a plain storage, or backward hooks")
        name, key, numel = storage
        if not (
            isinstance(name, _StorageRef)
            and isinstance(offset, int)
            and isinstance(size, tuple) and all(isinstance(n, int) for n in size)
            and isinstance(stride, tuple) and all(isinstance(n, int) for n in stride)
            and len(size) == len(stride)
        ):
            raise pickle.UnpicklingError("unexpected offset/size/stride types")
        return _StoredTensor(str(name), key, numel, offset, size, stride)


class _EmptyHooks(_Refuses):
    """Stands in for ``collections.OrderedDict``: the (always empty) backward hooks."""

    __slots__ = ()

    def __call__(self, *args: Any) -> dict:
        if args:
            raise pickle.UnpicklingError("non-empty OrderedDict")
        return {}


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads the ``data.pkl`` of a ``torch.save``-d plain CPU tensor into a ``_StoredTensor``.

    Every global it may look up is replaced by a recorder above, so unpickling runs no code of
    the file's choosing and can set no attribute anywhere; anything else (a tensor subclass, a
    parameter, metadata, a storage of another kind) raises ``UnpicklingError`` and the item
    takes DCP's path."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _RecordRebuild()
        if (module, name) == ("collections", "OrderedDict"):
            return _EmptyHooks()
        if module == "torch" and name in _KNOWN_STORAGES:
            return _StorageRef(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor record")

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageRef) and isinstance(pid[2], str)
            and pid[3] == "cpu" and isinstance(pid[4], int)
        ):
            return (pid[1], pid[2], pid[4])
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")


_MAX_RECORD_NBYTES = 64 * 1024  # a plain tensor's data.pkl is ~150 bytes


def _parse_tensor_record(pkl: bytes) -> _StoredTensor | None:
    try:
        record = _TensorRecordUnpickler(io.BytesIO(pkl)).load()
    except Exception:  # noqa: BLE001 - whatever a malformed record raises, DCP's path reads it
        return None
    return record if type(record) is _StoredTensor else None


def _member_bytes_at(blob: _Slice, info: zipfile.ZipInfo) -> int | None:
    """Where an uncompressed zip member's bytes start in ``blob`` (from its local header)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    blob.seek(info.header_offset)
    header = blob.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIGNATURE:
        return None
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _read_member(blob: _Slice, info: zipfile.ZipInfo) -> bytes | None:
    start = _member_bytes_at(blob, info)
    if start is None:
        return None
    blob.seek(start)
    data = blob.read(info.file_size)
    return data if len(data) == info.file_size else None


def _stored_tensor(blob: _Slice) -> _StoredTensor | None:
    """The layout and raw-byte location of the tensor in a ``torch.save`` zip blob, or ``None``
    when the blob is not that simple (then DCP's own code reads it). Members are read through
    their local headers, not ``ZipFile.read``: this runs once per item of every load."""
    try:
        with zipfile.ZipFile(blob) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return None
    data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/")]
    pkls = [i for i in infos if i.filename.endswith("/data.pkl")]
    order = [i for i in infos if i.filename.endswith("/byteorder")]
    if len(data) != 1 or len(pkls) != 1 or pkls[0].file_size > _MAX_RECORD_NBYTES:
        return None
    if order:
        byteorder = _read_member(blob, order[0])
        if byteorder is None or byteorder.decode(errors="replace") != sys.byteorder:
            return None
    elif sys.byteorder != "little":
        return None
    pkl = _read_member(blob, pkls[0])
    record = _parse_tensor_record(pkl) if pkl is not None else None
    if record is None or not data[0].filename.endswith(f"/data/{record.storage_key}"):
        return None
    start = _member_bytes_at(blob, data[0])
    if start is None:
        return None
    return replace(record, data_offset=start, data_nbytes=data[0].file_size)


def _saved_dtype(planner: LoadPlanner, req: ReadItem) -> torch.dtype | None:
    metadata = getattr(planner, "metadata", None)
    entry = getattr(metadata, "state_dict_metadata", {}).get(req.storage_index.fqn)
    props = getattr(entry, "properties", None)
    return getattr(props, "dtype", None)


class DirectFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that reads whole-chunk CPU tensors directly into their destination.

    Same constructor as DCP's reader. ``fast_items`` / ``fallback_items`` count what took which
    path during the last ``read_data`` (for tests and benchmarks).
    """

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fast_items = 0
        self.fallback_items = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """DCP's ``.metadata``, checked against the manifest and unpickled through the
        allowlist (``ckptguard.core.safe_pickle``): DCP's own reader runs ``pickle.load`` on it."""
        return SafeFileSystemReader.read_metadata(self, *args, **kwargs)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)

        for relative_path, reqs in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            with self.fs.create_stream(path, "rb") as stream:
                for req in reqs:
                    if not self._read_direct(stream, req, planner):
                        self.fallback_items += 1
                        self._read_with_dcp(stream, req, planner)
                    else:
                        self.fast_items += 1

        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_direct(self, stream: Any, req: ReadItem, planner: LoadPlanner) -> bool:
        """Read one tensor item straight into its destination; False if it does not qualify."""
        info = self.storage_data[req.storage_index]
        if req.type == LoadItemType.BYTE_IO or info.transform_descriptors:
            return False
        if any(o != 0 for o in req.storage_offsets):
            return False
        target = planner.resolve_tensor(req).detach()
        if (
            target.device.type != "cpu"
            or not target.is_contiguous()
            or tuple(target.shape) != tuple(req.lengths)
            or _saved_dtype(planner, req) != target.dtype
        ):
            return False
        stored = _stored_tensor(_Slice(stream, info.offset, info.length))
        nbytes = target.numel() * target.element_size()
        if (
            stored is None
            or stored.storage_name != _STORAGE_NAMES.get(target.dtype)
            or stored.size != tuple(target.shape)
            or not stored.is_row_major_whole_storage()
            or stored.data_nbytes != nbytes
        ):
            return False
        start = stored.data_offset
        if nbytes:
            # view(), not reshape(): a copy here would swallow the bytes without an error
            dest = memoryview(target.view(-1).view(torch.uint8).numpy())
            done = 0
            fd = stream.fileno()
            while done < nbytes:
                got = os.preadv(fd, [dest[done:]], info.offset + start + done)
                if got <= 0:
                    raise OSError(
                        f"{self.path}/{info.relative_path}: unexpected end of file reading "
                        f"{req.storage_index.fqn} ({done} of {nbytes} bytes)"
                    )
                done += got
        planner.commit_tensor(req, target)
        return True

    def _read_with_dcp(self, stream: Any, req: ReadItem, planner: LoadPlanner) -> None:
        """DCP's own per-item read (``FileSystemReader.read_data``'s loop body)."""
        info = self.storage_data[req.storage_index]
        file_slice = self._slice_file(stream, info)
        transform_from = self.transforms.transform_load_stream(
            req, info.transform_descriptors or (), file_slice
        )
        if req.type == LoadItemType.BYTE_IO:
            read_bytes = io.BytesIO(transform_from.read(-1))
            read_bytes.seek(0)
            planner.load_bytes(req, read_bytes)
            return
        if transform_from.seekable():
            seekable = transform_from
        else:
            seekable = io.BytesIO(transform_from.read(-1))
            seekable.seek(0)
        tensor = cast(torch.Tensor, torch.load(seekable, map_location="cpu", weights_only=True))
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise AssertionError(
                f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}"
            )
        target.copy_(tensor)
        planner.commit_tensor(req, target)
