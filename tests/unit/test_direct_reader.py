"""DirectFileSystemReader reads tensors straight into their destination; what it loads must be
bit-identical to DCP's own reader, and anything it cannot read directly must fall back."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptguard.core.reader import DirectFileSystemReader
from tests._helpers import assert_tensors_equal

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(300, 97, generator=g),
        "bf16": torch.randn(64, 33, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (1000,), generator=g),
        "bool": torch.rand(77, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 5),
        "nested": {"moment": torch.randn(5, 7, generator=g), "step": 12, "name": "adamw"},
    }


def _zeros_like(obj):
    if isinstance(obj, dict):
        return {k: _zeros_like(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    return obj


def _flat(sd: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("thread_count", [1, 3])
def test_direct_read_equals_dcp_reader(tmp_path, thread_count):
    saved = _state()
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path, thread_count=thread_count), no_dist=True)

    direct, plain = _zeros_like(saved), _zeros_like(saved)
    reader = DirectFileSystemReader(tmp_path)
    dcp.load(direct, storage_reader=reader, no_dist=True)
    dcp.load(plain, storage_reader=dcp.FileSystemReader(tmp_path), no_dist=True)

    assert_tensors_equal(_flat(saved), _flat(direct), "direct reader")
    assert_tensors_equal(_flat(plain), _flat(direct), "direct vs DCP reader")
    assert direct["nested"]["step"] == 12 and direct["nested"]["name"] == "adamw"
    # every non-empty tensor took the direct path (fail-on-bug: a reader that silently always
    # falls back would pass the equality checks above without being any faster)
    assert reader.fast_items >= 6, (reader.fast_items, reader.fallback_items)


def test_other_dtype_or_non_contiguous_destination_falls_back(tmp_path):
    saved = {"a": torch.randn(40, 30), "b": torch.randn(30, 40)}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)

    template = {"a": torch.zeros(40, 30, dtype=torch.float64), "b": torch.zeros(40, 30).t()}
    reader = DirectFileSystemReader(tmp_path)
    dcp.load(template, storage_reader=reader, no_dist=True)

    assert reader.fast_items == 0 and reader.fallback_items == 2
    assert torch.equal(template["a"], saved["a"].double())
    assert torch.equal(template["b"], saved["b"])


def _layouts(value: torch.Tensor) -> dict[str, torch.Tensor]:
    """``value`` in memory layouts a trainer's tensors have (all equal to ``value``)."""
    out = {"contiguous": value.clone()}
    if value.dim() >= 2:
        out["transposed"] = value.transpose(-1, -2).contiguous().transpose(-1, -2)
        dims = list(range(value.dim()))[::-1]
        out["permuted"] = value.permute(dims).contiguous().permute(dims)
        fused = torch.zeros((*value.shape[:-1], 3 * value.shape[-1]), dtype=value.dtype)
        c = value.shape[-1]
        fused[..., c : 2 * c] = value
        out["fused_cols"] = fused[..., c : 2 * c]
    if value.dim() == 4:
        out["channels_last"] = value.contiguous(memory_format=torch.channels_last)
    if value.dim() >= 1 and value.shape[0] == 1:
        row = value[0].clone()
        out["expanded"] = row.as_strided(value.shape, (0, *row.stride()))
    if value.dim() >= 1 and value.numel() and bool((value == value[:1]).all()):
        out["broadcast"] = value[:1].clone().expand(value.shape)
    return out


_VALUES = {
    "f32": torch.randn(6, 10),
    "bf16_conv": torch.randn(4, 3, 3, 3).to(torch.bfloat16),
    "f16_3d": torch.randn(2, 3, 4).to(torch.float16),
    "i64": torch.randint(-(2**40), 2**40, (5, 7)),
    "bool": torch.rand(5, 6) > 0.5,
    "row": torch.randn(1, 7),
    "equal_rows": torch.arange(4).expand(3, 4).clone(),
    "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 5),
}


@pytest.mark.parametrize("name", sorted(_VALUES))
def test_the_fast_path_is_taken_only_when_the_raw_bytes_are_the_values(tmp_path, name):
    """The property the fast path rests on, for every layout as ``torch.save`` (DCP's item
    format) writes it: when ``_stored_tensor`` says row-major, the raw storage bytes are the
    values in row-major order; and plain contiguous tensors are always recognised."""
    from ckptguard.core.reader import _Slice, _stored_tensor

    for layout, t in _layouts(_VALUES[name]).items():
        path = tmp_path / f"{layout}.pt"
        torch.save(t, path)
        with open(path, "rb") as f:
            stored = _stored_tensor(_Slice(f, 0, path.stat().st_size))
            assert stored is not None, layout
            assert stored.size == tuple(t.shape) and stored.stride == t.stride(), layout
            if stored.is_row_major_whole_storage():
                raw = path.read_bytes()[stored.data_offset : stored.data_offset + stored.data_nbytes]
                expected = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                assert raw == expected, f"{name}/{layout}: raw bytes are not the values"
            else:
                assert layout not in ("contiguous", "expanded"), f"{name}/{layout}"


def test_saved_strided_layouts_load_their_values_into_contiguous_destinations(tmp_path):
    saved = {
        f"{name}/{layout}": t
        for name, value in _VALUES.items()
        for layout, t in _layouts(value).items()
    }
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    template = {k: torch.zeros_like(v, memory_format=torch.contiguous_format) for k, v in saved.items()}
    reader = DirectFileSystemReader(tmp_path)
    dcp.load(template, storage_reader=reader, no_dist=True)

    assert_tensors_equal(saved, template, "direct reader")
    # the plain ones still go the fast way (fail-on-bug: always falling back also loads right)
    plain = [k for k in saved if k.endswith("/contiguous") and saved[k].numel()]
    assert reader.fast_items >= len(plain), (reader.fast_items, reader.fallback_items)
    assert reader.fallback_items >= 8, (reader.fast_items, reader.fallback_items)


def test_a_crafted_tensor_record_runs_no_code_and_falls_back(tmp_path, monkeypatch):
    """``data.pkl`` is only ever read by the recorders: a global outside the plain-tensor
    vocabulary, or an opcode that mutates objects, makes the item take DCP's path."""
    import io
    import pickletools
    import zipfile

    from ckptguard.core.reader import _parse_tensor_record

    calls = []
    monkeypatch.setattr("os.system", lambda cmd: calls.append(cmd))

    # os.system("echo pwned") in opcodes a tensor record uses (GLOBAL, BINUNICODE, TUPLE1, REDUCE)
    call = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwned\x85R."
    assert [op.name for op, _, _ in pickletools.genops(call)][1] == "GLOBAL"
    assert _parse_tensor_record(call) is None
    # a parameter (or any tensor subclass) is not a plain tensor record either
    buf = io.BytesIO()
    torch.save(torch.nn.Parameter(torch.ones(3)), buf)
    with zipfile.ZipFile(buf) as zf:
        assert _parse_tensor_record(zf.read("archive/data.pkl")) is None
    # BUILD (setattr through the unpickler) is refused on the recorders and on the record: a
    # pickle may neither alter the recorders for later loads nor rewrite its stride afterwards
    build_on_recorder = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(N}X\x08\x00\x00\x00__call__"
        b"X\x01\x00\x00\x00xstb."
    )
    assert _parse_tensor_record(build_on_recorder) is None
    buf = io.BytesIO()
    torch.save(torch.zeros(3, 4).t(), buf)
    with zipfile.ZipFile(buf) as zf:
        transposed = zf.read("archive/data.pkl")
    assert _parse_tensor_record(transposed).stride == (1, 4)
    rewrite_stride = transposed[:-1] + b"(N}X\x06\x00\x00\x00stride(K\x03K\x01tstb."
    assert _parse_tensor_record(rewrite_stride) is None
    assert _parse_tensor_record(transposed).stride == (1, 4) and calls == []


def test_a_truncated_shard_raises_instead_of_loading_garbage(tmp_path):
    dcp.save({"a": torch.randn(1000, 100)}, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(dcp.CheckpointException, match="distcp|zip|end of file"):
        dcp.load({"a": torch.zeros(1000, 100)}, storage_reader=DirectFileSystemReader(tmp_path), no_dist=True)


def test_verify_roundtrip_reads_through_the_reader_load_uses(tmp_path, monkeypatch):
    """A bug in the read path ``load()`` uses must show in ckptguard's own round-trip check:
    here a reader whose fast path gets the first value of every float tensor wrong."""
    from ckptguard import CheckpointManager
    from tests._helpers import make_training_objects, train_steps

    real = DirectFileSystemReader._read_direct

    def first_value_wrong(self, stream, req, planner):
        if not real(self, stream, req, planner):
            return False
        target = planner.resolve_tensor(req).detach()
        if target.numel() and target.is_floating_point():
            target.view(-1)[0] += 1
        return True

    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    monkeypatch.setattr(DirectFileSystemReader, "_read_direct", first_value_wrong)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, lr_scheduler=scheduler) as mgr:
        result = mgr.verify_roundtrip()
    assert result.changed_components == ["model", "optimizer"], result.format()
    assert "DIFFERS model" in result.format()
