"""Async saves copy the bulk of the state in the background (``ckptguard.core.staging``).

The caller gets control back before the parameters and moments are copied; the next
``optimizer.step()`` waits for the copy; the checkpoint is bit-exactly the saved step although
training went on; a trainer that writes the weights in place meanwhile gets a failed save, never
a checkpoint that mixes two steps.

Each test holds the background copy behind a gate, so the interleavings are forced, not timed.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from ckptguard import CheckpointManager
from ckptguard.core.staging import BackgroundStager, cuda_devices, record_events
from ckptguard.demo import TinyLM, build_optimizer
from ckptguard.errors import CommitError
from tests._helpers import assert_tensors_equal, clone_tensors, optimizer_tensors, train_steps

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def _objects(seed: int = 0):
    """TinyLM big enough that its hidden weight (256x256 floats) is copied in the background."""
    torch.manual_seed(seed)
    model = TinyLM(dim=64, hidden=256, dropout=0.0)
    return model, build_optimizer(model)


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    """Hold every background copy until the test sets the returned event."""
    event = threading.Event()
    original = BackgroundStager._copy_all

    def gated(self, *args, **kwargs):
        assert event.wait(timeout=60), "test never opened the gate"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BackgroundStager, "_copy_all", gated)
    return event


def _open_later(event: threading.Event, delay_s: float = 0.3) -> threading.Timer:
    timer = threading.Timer(delay_s, event.set)
    timer.start()
    return timer


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    return clone_tensors(dict(model.state_dict())), clone_tensors(optimizer_tensors(optimizer))


def _load_fresh(root, step: int):
    model, optimizer = _objects(seed=1)
    with CheckpointManager(root, model=model, optimizer=optimizer) as mgr:
        assert mgr.load(step) == step
    return model, optimizer


def test_caller_returns_before_the_copy_and_the_next_step_waits_for_it(tmp_path, gate):
    model, optimizer = _objects()
    train_steps(model, optimizer, None, 3)
    saved_model, saved_opt = _snapshot(model, optimizer)

    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(3, blocking=False)
        # the bulk is not copied yet: the caller did not wait for it
        assert mgr._stager is not None and mgr._stager._future is not None
        assert not mgr._stager._future.done()
        timer = _open_later(gate)
        train_steps(model, optimizer, None, 2, first_seed=3)  # step() blocks until the copy is done
        mgr.wait()
        timer.join()

    loaded_model, loaded_opt = _load_fresh(tmp_path, 3)
    assert_tensors_equal(saved_model, dict(loaded_model.state_dict()), "model")
    assert_tensors_equal(saved_opt, optimizer_tensors(loaded_opt), "optimizer")


def test_without_the_step_hook_the_save_fails_instead_of_mixing_steps(tmp_path, gate):
    """The fail-on-bug side: with the optimizer hook gone, step() overwrites the weights before
    the background copy reads them. The version check catches it: no checkpoint is committed."""
    model, optimizer = _objects()
    train_steps(model, optimizer, None, 2)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(1)
        mgr.save(2, blocking=False)
        mgr._stager._hook.remove()
        train_steps(model, optimizer, None, 1, first_seed=2)  # not held back
        gate.set()
        with pytest.raises(CommitError, match="modified in place while an async save"):
            mgr.wait()
        assert mgr.steps() == [1]


def test_in_place_write_outside_optimizer_step_fails_the_save(tmp_path, gate):
    model, optimizer = _objects()
    train_steps(model, optimizer, None, 2)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(1)
        mgr.save(2, blocking=False)
        with torch.no_grad():
            model.hidden.weight.mul_(0.5)  # e.g. weight clipping or an EMA written into the model
        gate.set()
        with pytest.raises(CommitError, match="hidden.weight"):
            mgr.wait()
        assert mgr.steps() == [1]
    # the earlier checkpoint is intact and loads
    _load_fresh(tmp_path, 1)


class _Normed(nn.Module):
    """A large BatchNorm: its running statistics (128 KiB each) change in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 32768)
        self.norm = nn.BatchNorm1d(32768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def test_buffers_changed_by_forward_are_saved_as_of_the_save(tmp_path, gate):
    torch.manual_seed(0)
    model = _Normed()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    saved = clone_tensors(dict(model.state_dict()))

    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(1, blocking=False)
        model(torch.randn(4, 8))  # updates running_mean/var in place, before the copy ran
        assert not torch.equal(model.norm.running_mean, saved["norm.running_mean"])
        gate.set()
        mgr.wait()

    torch.manual_seed(1)
    fresh = _Normed()
    with CheckpointManager(tmp_path, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters())) as mgr:
        mgr.load(1)
    assert_tensors_equal(saved, dict(fresh.state_dict()), "model")


def test_buffers_are_reused_across_saves_and_close_removes_the_hook(tmp_path):
    model, optimizer = _objects()
    train_steps(model, optimizer, None, 1)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, keep_last=None) as mgr:
        mgr.save(1, blocking=False)
        mgr.wait()
        first = {k: v.data_ptr() for k, v in mgr._stager._buffers.items()}
        train_steps(model, optimizer, None, 1, first_seed=1)
        saved_model, saved_opt = _snapshot(model, optimizer)
        mgr.save(2, blocking=False)
        mgr.wait()
        assert {k: v.data_ptr() for k, v in mgr._stager._buffers.items()} == first
        assert len(optimizer._optimizer_step_pre_hooks) == 1
    assert len(optimizer._optimizer_step_pre_hooks) == 0

    loaded_model, loaded_opt = _load_fresh(tmp_path, 2)
    assert_tensors_equal(saved_model, dict(loaded_model.state_dict()), "model")
    assert_tensors_equal(saved_opt, optimizer_tensors(loaded_opt), "optimizer")


def _cuda_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 33, (8, 4), generator=g).cuda()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_staged_into_pinned_memory_and_saved_exactly(tmp_path, gate):
    torch.manual_seed(0)
    model = TinyLM(dim=64, hidden=256, dropout=0.0).cuda()
    optimizer = build_optimizer(model)
    _cuda_steps(model, optimizer, 2, seed=0)
    saved_model, saved_opt = (
        {k: v.cpu() for k, v in d.items()} for d in _snapshot(model, optimizer)
    )
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(2, blocking=False)
        assert not mgr._stager._future.done()  # the device-to-host copy runs in the background
        timer = _open_later(gate)
        _cuda_steps(model, optimizer, 2, seed=1)  # step() waits for the copy
        mgr.wait()
        timer.join()
        big = mgr._stager._buffers["/model/hidden.weight"]
        assert big.device.type == "cpu" and big.is_pinned()

    torch.manual_seed(1)
    fresh = TinyLM(dim=64, hidden=256, dropout=0.0).cuda()
    fresh_opt = build_optimizer(fresh)
    with CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt) as mgr:
        mgr.load(2)
    assert_tensors_equal(saved_model, {k: v.cpu() for k, v in fresh.state_dict().items()}, "model")
    assert_tensors_equal(
        saved_opt, {k: v.cpu() for k, v in optimizer_tensors(fresh_opt).items()}, "optimizer"
    )


# ---------------------------------------------------------------------- CUDA device selection
# The copy runs in a worker thread whose current CUDA device is cuda:0 whatever the trainer set;
# streams and events must come from the staged tensors' device (issue 11, point 4).


class _FakeCudaTensor:
    """Stands in for a CUDA tensor where only ``is_cuda`` and ``device`` are read."""

    def __init__(self, index: int) -> None:
        self.is_cuda = True
        self.device = torch.device("cuda", index)


class _FakeCuda:
    """Records which device each stream/event was made on and used under (no CUDA needed)."""

    def __init__(self) -> None:
        self.current_device = torch.device("cuda", 0)  # a worker thread's default
        self.current_stream = None
        self.log: list[tuple] = []
        cuda = self

        class Stream:
            def __init__(self, device=None) -> None:
                self.device = torch.device(device) if device is not None else cuda.current_device
                cuda.log.append(("stream", self.device))

            def wait_event(self, event) -> None:
                cuda.log.append(("wait", self.device, event.device))

            def synchronize(self) -> None:
                cuda.log.append(("synchronize", self.device))

        class Event:
            def __init__(self) -> None:
                self.device = None

            def record(self, stream=None) -> None:
                self.device = stream.device if stream is not None else cuda.current_device
                cuda.log.append(("record", self.device))

        self.Stream, self.Event = Stream, Event

    def current_stream_of(self, device=None):
        return self.Stream(device if device is not None else self.current_device)

    def device_ctx(self, device):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            before, self.current_device = self.current_device, torch.device(device)
            try:
                yield
            finally:
                self.current_device = before

        return ctx()

    def stream_ctx(self, stream):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            before, self.current_stream = self.current_stream, stream
            try:
                yield
            finally:
                self.current_stream = before

        return ctx()


@pytest.fixture
def fake_cuda(monkeypatch) -> _FakeCuda:
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "Stream", fake.Stream)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream_of)
    monkeypatch.setattr(torch.cuda, "device", fake.device_ctx)
    monkeypatch.setattr(torch.cuda, "stream", fake.stream_ctx)
    return fake


def test_devices_come_from_the_tensors_not_the_current_device():
    tensors = [_FakeCudaTensor(1), torch.zeros(2), _FakeCudaTensor(3), _FakeCudaTensor(1)]
    assert cuda_devices(tensors) == [torch.device("cuda", 1), torch.device("cuda", 3)]
    assert cuda_devices([torch.zeros(1)]) == []


def test_events_are_recorded_on_the_tensors_device(fake_cuda):
    events = record_events([_FakeCudaTensor(1), _FakeCudaTensor(1)])
    assert list(events) == [torch.device("cuda", 1)]
    assert events[torch.device("cuda", 1)].device == torch.device("cuda", 1)
    assert ("record", torch.device("cuda", 0)) not in fake_cuda.log


def test_copy_stream_is_created_waited_on_and_synchronized_on_the_tensors_device(fake_cuda):
    """The worker thread's current device is cuda:0; rank 1's tensors live on cuda:1."""
    device = torch.device("cuda", 1)
    seen = []

    class Dst:
        def copy_(self, src, non_blocking=False) -> None:
            seen.append((fake_cuda.current_device, fake_cuda.current_stream.device, non_blocking))

    class Copy:
        name, src, dst = "w", _FakeCudaTensor(1), Dst()

        def changed(self) -> bool:
            return False

    stager = BackgroundStager(None)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    fake_cuda.log.clear()
    stager._copy_all([Copy(), Copy()], {}, {device: event})
    assert fake_cuda.log == [("stream", device), ("wait", device, device), ("synchronize", device)]
    assert seen == [(device, device, True)] * 2
    stager._copy_all([Copy()], {}, {device: event})  # the stream is kept from save to save
    assert [e for e in fake_cuda.log if e[0] == "stream"] == [("stream", device)]


def _stage_on_own_device(rank: int, root: str, results) -> None:
    """One process of the 2-GPU test: a trainer on ``cuda:rank`` that saves asynchronously."""
    torch.cuda.set_device(rank)
    torch.manual_seed(rank)
    model = TinyLM(dim=64, hidden=256, dropout=0.0).cuda()
    optimizer = build_optimizer(model)
    _cuda_steps(model, optimizer, 2, seed=rank)
    saved_model, saved_opt = ({k: v.cpu() for k, v in d.items()} for d in _snapshot(model, optimizer))
    root = f"{root}/rank{rank}"  # two independent trainers, one per GPU
    with CheckpointManager(root, model=model, optimizer=optimizer) as mgr:
        mgr.save(2, blocking=False)
        _cuda_steps(model, optimizer, 2, seed=rank + 10)  # step() waits for the copy
        mgr.wait()
        stream_devices = sorted(str(d) for d in mgr._stager._streams)
    torch.manual_seed(100 + rank)
    fresh = TinyLM(dim=64, hidden=256, dropout=0.0).cuda()
    fresh_opt = build_optimizer(fresh)
    with CheckpointManager(root, model=fresh, optimizer=fresh_opt) as mgr:
        mgr.load(2)
    assert_tensors_equal(saved_model, {k: v.cpu() for k, v in fresh.state_dict().items()}, "model")
    assert_tensors_equal(saved_opt, {k: v.cpu() for k, v in optimizer_tensors(fresh_opt).items()}, "optimizer")
    results[rank] = stream_devices


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_processes_on_distinct_devices_stage_on_their_own_device(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_stage_on_own_device, args=(str(tmp_path), results), nprocs=2, join=True)
        results = dict(results)
    assert results == {0: ["cuda:0"], 1: ["cuda:1"]}
