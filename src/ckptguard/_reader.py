"""A DCP ``FileSystemReader`` that reads each tensor straight into its destination.

Why: with ``verify_on_load`` every file is read once to check its checksum before anything is
loaded, so DCP's own read must be cheap for a load to stay near raw DCP's speed. DCP's reader
deserializes every item with ``torch.load`` into a newly allocated tensor and then copies that
into the destination: an allocation (page faults) and a second copy per byte. Each item is a
small ``torch.save`` zip whose single storage record holds the raw bytes, so when the
destination is the whole saved chunk, contiguous, on the CPU and of the saved dtype, this reader
finds that record through the zip's directory and ``readinto``s the destination's memory: one
copy, from the page cache the verification just filled. Items are read in file order.

Anything else (a reshard that narrows a chunk, a dtype change, GPU destinations, stream
transforms, a zip that does not look as expected) goes through DCP's own per-item code, so the
fast path is an optimization with a complete fallback, never a second format.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import zipfile
from typing import Any, cast

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

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


def _storage_record(blob: _Slice) -> tuple[int, int] | None:
    """(offset, nbytes) of the raw bytes of the single storage in a ``torch.save`` zip blob, or
    ``None`` when the blob is not that simple (then DCP's own code reads it)."""
    try:
        with zipfile.ZipFile(blob) as zf:
            infos = zf.infolist()
            data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/")]
            if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED:
                return None
            order = [i for i in infos if i.filename.endswith("/byteorder")]
            if order:
                if zf.read(order[0]).decode(errors="replace") != sys.byteorder:
                    return None
            elif sys.byteorder != "little":
                return None
            info = data[0]
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return None
    blob.seek(info.header_offset)
    header = blob.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIGNATURE:
        return None
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, info.file_size


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
        blob = _Slice(stream, info.offset, info.length)
        record = _storage_record(blob)
        if record is None or record[1] != target.numel() * target.element_size():
            return False
        start, nbytes = record
        if nbytes:
            dest = memoryview(target.reshape(-1).view(torch.uint8).numpy())
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
        from torch.distributed._shard._utils import narrow_tensor_by_index

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
