"""Saved values come back whatever the memory layouts on either side of a save/load.

A trainer may build a parameter as a non-contiguous view (``nn.Parameter(w.t())``, a slice of a
fused weight, a ``channels_last`` conv weight); AdamW's moments inherit that layout. DCP keeps a
tensor's strides when its storage holds exactly its elements, so the bytes on disk are not
always in row-major order. The resumed trainer may build the same model the plain way, or the
other way round. Each case here is a trainer: build the model with one set of layouts, step
AdamW, ``mgr.save``; build it again with other layouts (other seed), ``mgr.load``; every
parameter, buffer and moment must be ``torch.equal`` to what was saved, in the live tensors the
trainer built (same storage, same strides), and the next step must match too.

The layouts are drawn per tensor and per side from a seeded generator (property-style, fixed
seeds so that a failure reproduces), plus the corners where every tensor is plain on one side
and strided on the other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ckptguard import CheckpointManager
from tests._helpers import assert_tensors_equal, optimizer_tensors

pytestmark = pytest.mark.timeout(120)

PLAIN = "contiguous"


@dataclass(frozen=True)
class Spec:
    """One tensor of the model: shape, what it is, and the layouts it can be built with."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "param" (float dtype of the case), "int64" or "bool" buffer
    saved_layouts: tuple[str, ...]
    loaded_layouts: tuple[str, ...]


_MATRIX = (PLAIN, "transposed", "fused_rows", "fused_cols")
SPECS = (
    Spec("lin_w", (6, 10), "param", _MATRIX, _MATRIX),
    Spec("conv_w", (4, 3, 3, 3), "param", (PLAIN, "channels_last", "transposed"),
         (PLAIN, "channels_last", "transposed")),
    Spec("fused", (2, 3, 4), "param", (PLAIN, "permuted"), (PLAIN, "permuted")),
    # stride 0 on a dimension of size 1, like an expanded position-ids buffer
    Spec("pos", (1, 7), "param", (PLAIN, "expanded"), (PLAIN, "expanded")),
    Spec("scale", (), "param", (PLAIN,), (PLAIN,)),
    Spec("empty", (0, 5), "param", (PLAIN, "transposed"), (PLAIN, "transposed")),
    Spec("mask", (5, 6), "bool", (PLAIN, "transposed"), (PLAIN, "transposed")),
    Spec("index", (3, 4), "int64", (PLAIN, "transposed", "fused_cols"),
         (PLAIN, "transposed", "fused_cols")),
    # equal rows broadcast from one (stride 0, overlapping memory): only a saved layout, since
    # no tensor can be loaded into overlapping memory (torch's own copy_ refuses)
    Spec("table", (3, 4), "int64", (PLAIN, "broadcast"), (PLAIN,)),
)
STRIDED = {s.name: s.saved_layouts[-1] for s in SPECS}
STRIDED_DEST = {s.name: s.loaded_layouts[-1] for s in SPECS}
ALL_PLAIN = {s.name: PLAIN for s in SPECS}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def with_layout(value: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``value`` whose memory is arranged as ``layout`` says."""
    if layout == PLAIN:
        return value.clone()
    if layout == "transposed":  # the last two dims swapped in memory; storage = the tensor
        return value.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "permuted":  # all dims reversed in memory: a view of a whole fused storage
        dims = list(range(value.dim()))[::-1]
        return value.permute(dims).contiguous().permute(dims)
    if layout == "channels_last":
        return value.contiguous(memory_format=torch.channels_last)
    if layout == "fused_rows":  # the middle third of a fused (3r, c) weight: contiguous, offset
        r = value.shape[0]
        fused = torch.zeros((3 * r, *value.shape[1:]), dtype=value.dtype)
        fused[r : 2 * r] = value
        return fused[r : 2 * r]
    if layout == "fused_cols":  # the middle third of a fused (r, 3c) weight: strided, offset
        c = value.shape[-1]
        fused = torch.zeros((*value.shape[:-1], 3 * c), dtype=value.dtype)
        fused[..., c : 2 * c] = value
        return fused[..., c : 2 * c]
    if layout == "expanded":  # (1, n) expanded from (n,): stride 0 on the size-1 dim
        row = value[0].clone()
        return row.as_strided(value.shape, (0, *row.stride()))
    if layout == "broadcast":  # every row the same memory
        assert torch.equal(value, value[:1].expand(value.shape))
        return value[0].clone().expand(value.shape)
    raise ValueError(layout)


def _value(spec: Spec, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, spec.name)))
    if spec.kind == "bool":
        return torch.rand(spec.shape, generator=g) > 0.5
    if spec.kind == "int64":
        if spec.name == "table":  # equal rows (see Spec "table")
            row = torch.randint(-(2**40), 2**40, spec.shape[-1:], generator=g)
            return row.expand(spec.shape).clone()
        return torch.randint(-(2**40), 2**40, spec.shape, generator=g)
    return torch.randn(spec.shape, generator=g).to(dtype)


class LayoutNet(nn.Module):
    """A model whose parameters and buffers are built in the layouts ``layouts`` names."""

    def __init__(self, layouts: dict[str, str], dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        for spec in SPECS:
            t = with_layout(_value(spec, dtype, seed), layouts[spec.name])
            if spec.kind == "param":
                self.register_parameter(spec.name, nn.Parameter(t))
            else:
                self.register_buffer(spec.name, t)

    def forward(self) -> torch.Tensor:
        """A quadratic pull of every parameter towards ``arange % 5 - 2``: learnable, and every
        parameter (the empty one included) gets a gradient, so AdamW keeps moments for all."""
        loss = torch.zeros((), dtype=torch.float32)
        for p in self.parameters():
            target = (torch.arange(p.numel()) % 5 - 2).reshape(p.shape).float()
            loss = loss + ((p.float() - target) ** 2).sum()
        return loss


def build_trainer(layouts: dict[str, str], dtype: torch.dtype, seed: int):
    model = LayoutNet(layouts, dtype, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _layout_of(model: nn.Module) -> dict[str, tuple]:
    return {
        n: (t.data_ptr(), t.stride(), t.storage_offset())
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }


def _check_case(root, saved: dict[str, str], loaded: dict[str, str], dtype: torch.dtype) -> None:
    model, optimizer = build_trainer(saved, dtype, seed=0)
    train(model, optimizer, 2)
    with CheckpointManager(root, model=model, optimizer=optimizer) as mgr:
        mgr.save(2)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_optim = {k: v.clone() for k, v in optimizer_tensors(optimizer).items()}

    resumed, resumed_opt = build_trainer(loaded, dtype, seed=1)
    live_layout = _layout_of(resumed)
    with CheckpointManager(root, model=resumed, optimizer=resumed_opt) as mgr:
        assert mgr.load() == 2
    what = f"saved {saved} -> loaded {loaded}, {dtype}"
    assert_tensors_equal(expected_model, dict(resumed.state_dict()), f"model ({what})")
    assert_tensors_equal(expected_optim, optimizer_tensors(resumed_opt), f"optimizer ({what})")
    # loaded into the trainer's own tensors, whose layouts it chose (not replaced by copies)
    assert _layout_of(resumed) == live_layout, what
    # and the run goes on identically (the loss floats only where the layouts agree: a sum
    # over a tensor adds in memory order, so another layout may round differently)
    losses = train(resumed, resumed_opt, 1), train(model, optimizer, 1)
    if saved == loaded:
        assert losses[0] == losses[1], what
    assert_tensors_equal(dict(model.state_dict()), dict(resumed.state_dict()), f"after a step ({what})")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "saved,loaded",
    [(STRIDED, ALL_PLAIN), (ALL_PLAIN, STRIDED_DEST), (STRIDED, STRIDED_DEST)],
    ids=["strided->plain", "plain->strided", "strided->strided"],
)
def test_every_layout_loads_the_saved_values(tmp_path, saved, loaded, dtype):
    _check_case(tmp_path, saved, loaded, dtype)


@pytest.mark.parametrize("seed", range(10))
def test_random_layouts_on_both_sides_load_the_saved_values(tmp_path, seed):
    rng = random.Random(seed)
    saved = {s.name: rng.choice(s.saved_layouts) for s in SPECS}
    loaded = {s.name: rng.choice(s.loaded_layouts) for s in SPECS}
    _check_case(tmp_path, saved, loaded, rng.choice(FLOAT_DTYPES))


def test_layouts_are_what_their_names_say():
    """Guards the test itself: each layout really is non-row-major / offset / overlapping, and
    DCP keeps the strides of those whose storage is exactly the tensor (the trap)."""
    v = torch.arange(24.0).reshape(2, 3, 4)
    assert not with_layout(v[0], "transposed").is_contiguous()
    assert not with_layout(v, "permuted").is_contiguous()
    assert not with_layout(v.reshape(1, 2, 3, 4), "channels_last").is_contiguous()
    rows = with_layout(v[0], "fused_rows")
    assert rows.is_contiguous() and rows.storage_offset() > 0
    cols = with_layout(v[0], "fused_cols")
    assert not cols.is_contiguous() and cols.storage_offset() > 0
    assert with_layout(v[0, :1], "expanded").stride()[0] == 0
    t = with_layout(v[0], "transposed")
    assert t.untyped_storage().nbytes() == t.nbytes  # so DCP writes it without a clone
