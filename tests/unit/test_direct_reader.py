"""DirectFileSystemReader reads tensors straight into their destination; what it loads must be
bit-identical to DCP's own reader, and anything it cannot read directly must fall back."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptguard._reader import DirectFileSystemReader
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


def test_a_truncated_shard_raises_instead_of_loading_garbage(tmp_path):
    dcp.save({"a": torch.randn(1000, 100)}, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(dcp.CheckpointException, match="distcp|zip|end of file"):
        dcp.load({"a": torch.zeros(1000, 100)}, storage_reader=DirectFileSystemReader(tmp_path), no_dist=True)
