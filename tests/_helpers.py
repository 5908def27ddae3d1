"""Builders and assertions shared by the test suites (import as ``tests._helpers``)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ckptguard.demo import TinyLM, build_optimizer


def make_training_objects(seed: int = 0, dropout: float = 0.1):
    """A TinyLM with AdamW (decay/no-decay groups) and a LambdaLR warmup, like the demo."""
    torch.manual_seed(seed)
    model = TinyLM(dropout=dropout)
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return model, optimizer, scheduler


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 33, (n, 4), generator=g)
    return x, (x[:, -1] + x[:, -2]) % 33


def train_steps(model: nn.Module, optimizer, scheduler, steps: int, first_seed: int = 0) -> list[float]:
    """Run ``steps`` optimizer steps on deterministic batches; returns the losses."""
    return train_on_batches(model, optimizer, scheduler, (batch(first_seed + i) for i in range(steps)))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer state, keyed ``"<param index>.<name>"``."""
    return {
        f"{pid}.{name}": value
        for pid, state in optimizer.state_dict()["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def assert_tensors_equal(a: dict[str, Any], b: dict[str, Any], what: str = "state") -> None:
    """``torch.equal`` on every key; fails naming the keys that differ or are missing."""
    assert set(a) == set(b), f"{what}: keys differ: only left {set(a) - set(b)}, only right {set(b) - set(a)}"
    bad = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not bad, f"{what}: tensors differ: {bad}"


def assert_model_equal(m1: nn.Module, m2: nn.Module) -> None:
    assert_tensors_equal(dict(m1.state_dict()), dict(m2.state_dict()), "model")


# --- builders for the core manager's unit and e2e tests -------------------------------------


def token_dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``n`` (4 tokens, next token) pairs for TinyLM, fixed by ``seed``."""
    x, y = batch(seed, n)
    return torch.utils.data.TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 4, shuffle: bool = True, num_workers: int = 0):
    """A shuffling torchdata ``StatefulDataLoader`` over ``token_dataset(n)``."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(
        token_dataset(n), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers
    )


def train_on_batches(model: nn.Module, optimizer, scheduler, batches) -> list[float]:
    """One optimizer (and scheduler) step per ``(x, y)`` batch; returns the losses."""
    losses = []
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


class Counter:
    """A small user-defined Stateful: what a trainer keeps besides model and optimizer."""

    def __init__(self) -> None:
        self.tokens_seen = 0
        self.history: list[int] = []

    def add(self, n: int) -> None:
        self.tokens_seen += n
        self.history.append(n)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_seen = state["tokens_seen"]
        self.history = list(state["history"])


def rng_draws() -> dict[str, Any]:
    """The next value of every global RNG stream (consumes one draw of each)."""
    import random

    import numpy as np

    return {
        "python": random.random(),
        "numpy": float(np.random.rand()),
        "numpy_gauss": float(np.random.randn()),
        "torch": torch.rand(4),
    }


def assert_draws_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    bad = [
        k for k in a
        if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])
    ]
    assert not bad, f"RNG streams differ: {bad}: {a} vs {b}"


def clone_tensors(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


_LAUNCHER_VARS = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
}


def launcher_free_env() -> dict[str, str]:
    """``os.environ`` minus what torchrun sets, for a child that must start as a lone process
    (or launch its own torchrun) even when the test itself runs under torchrun."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))
    }


# --- old-format checkpoints and a tied-weight model (migrate and the checkpoint tools) -------


class TiedLM(nn.Module):
    """A tiny LM whose output layer shares the embedding matrix (tied weights) and has no
    dropout, so training is a pure function of the data and the state."""

    def __init__(self, vocab: int = 33, dim: int = 16, context: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(context * dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.hidden(self.embed(x).flatten(1))))


def build_tied_optimizer(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW with decay / no-decay groups in an order unlike ``named_parameters()``: position 0
    is ``hidden.weight``, position 1 the shared embedding/head matrix (listed once)."""
    decay = [model.hidden.weight, model.embed.weight]
    no_decay = [model.head.bias, model.hidden.bias]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def build_tied_training(seed: int = 0):
    """(model, optimizer, scheduler) of the tied model, seeded."""
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = build_tied_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler


def tied_factory():
    """``--factory tests._helpers:tied_factory``: how the old trainer built its objects."""
    model = TiedLM()
    return model, build_tied_optimizer(model)


def save_legacy_checkpoint(path, model: nn.Module, optimizer, scheduler=None, step: int | None = None,
                           fmt: str = "dcp", **extra: Any) -> None:
    """Write the old index-keyed format: raw ``optimizer.state_dict()`` next to the model, with
    ``dcp.save`` (a directory) or ``torch.save`` (a file), as pre-ckptguard trainers did."""
    sd: dict[str, Any] = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
    if step is not None:
        sd["step"] = step
    if scheduler is not None:
        sd["lr_scheduler"] = scheduler.state_dict()
    if fmt == "dcp":
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    else:
        torch.save(sd, path)


def make_ckptguard_checkpoint(root, steps: tuple[int, ...] = (2, 4), seed: int = 0, **mgr_kwargs: Any):
    """A root with ckptguard checkpoints of TinyLM (dropout, AdamW groups, scheduler, loader)
    saved after each step in ``steps``; returns the root."""
    from ckptguard import CheckpointManager

    model, optimizer, scheduler = make_training_objects(seed)
    loader = make_loader()
    it = iter(loader)
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=loader, keep_last=None, **mgr_kwargs) as mgr:
        done = 0
        for target in steps:
            train_on_batches(model, optimizer, scheduler, [next(it) for _ in range(target - done)])
            done = target
            mgr.save(target)
    return root


def flip_byte(path, offset: int | None = None) -> None:
    """Corrupt a file in place without changing its size (bit rot): invert one byte."""
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def set_manifest_field(step_dir, key: str, value: Any) -> None:
    """Rewrite one top-level field of a checkpoint's manifest (e.g. a newer format_version)."""
    import json
    from pathlib import Path

    path = Path(step_dir) / "ckptguard.json"
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest))


class RecordingBar:
    """Stands in for ``tools._progress.progress``: records the phases a long operation reports."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.phases: list[str] = []
        self.updates = 0

    def __call__(self, iterable=None, **kwargs):
        self.calls.append(kwargs)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        self.phases.append(s)

    def update(self, n: float = 1) -> None:
        self.updates += n

    def close(self) -> None:
        pass


# --- learnable data for the e2e trainer matrix (tests/e2e/trainers) --------------------------


def progression_windows(
    n: int = 512, vocab: int = 33, context: int = 4, seed: int = 0
) -> torch.utils.data.TensorDataset:
    """``n`` (``context`` tokens, next token) pairs cut from arithmetic progressions modulo
    ``vocab`` (random start, stride 1-3). A tiny model learns it within a dozen steps, so a lost
    optimizer moment or a repeated batch changes the losses instead of hiding in noise."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + stride * torch.arange(context + 1)) % vocab
    return torch.utils.data.TensorDataset(seq[:, :context], seq[:, context])
