"""RNG capture and restore: python, numpy (incl. its cached gaussian), torch CPU, CUDA."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.core.states.rng import capture_rng_state, restore_rng_state
from tests._helpers import assert_draws_equal, make_training_objects, rng_draws

pytestmark = pytest.mark.timeout(60)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _through_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_capture_restore_gives_the_same_next_draws():
    _seed_all(0)
    rng_draws()
    state = capture_rng_state()
    expected = rng_draws()
    _seed_all(99)
    rng_draws()
    assert restore_rng_state(state) == []
    assert_draws_equal(expected, rng_draws())


def test_numpy_cached_gaussian_survives():
    """Legacy ``np.random.randn`` draws pairs and caches the second: lose the cache, shift by one."""
    np.random.seed(0)
    np.random.randn()  # now one gaussian is cached
    state = capture_rng_state()
    assert state["numpy"]["has_gauss"] == 1
    expected = np.random.randn(3)
    np.random.seed(5)
    restore_rng_state(state)
    assert np.array_equal(np.random.randn(3), expected)


def test_state_loads_with_weights_only():
    """The per-rank file is read with ``weights_only=True``: the state must be plain values."""
    _seed_all(3)
    state = _through_torch_save(capture_rng_state())
    expected = rng_draws()
    _seed_all(4)
    restore_rng_state(state)
    assert_draws_equal(expected, rng_draws())


def test_python_state_as_lists_is_accepted():
    random.seed(1)
    state = capture_rng_state()
    version, internal, gauss = state["python"]
    state["python"] = [version, list(internal), gauss]  # e.g. after a JSON round trip
    expected = random.random()
    random.seed(2)
    restore_rng_state(state)
    assert random.random() == expected


def test_cuda_state_for_another_device_count_is_skipped_not_misapplied():
    state = capture_rng_state()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (n + 1)
    expected_torch = torch.rand(2)
    torch.manual_seed(7)
    assert restore_rng_state(state) == ["cuda"]
    assert torch.equal(torch.rand(2), expected_torch)  # the other streams were restored


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_are_captured_and_restored():
    torch.cuda.init()
    torch.cuda.manual_seed_all(0)
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(1)
    assert restore_rng_state(state) == []
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_manager_restores_every_stream(tmp_path):
    model, optimizer, _ = make_training_objects()
    _seed_all(11)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(1)
    expected = rng_draws()
    _seed_all(12)
    m2, o2, _ = make_training_objects(seed=2)
    with CheckpointManager(tmp_path, model=m2, optimizer=o2) as mgr:
        mgr.load()
    assert_draws_equal(expected, rng_draws())


def test_save_draws_nothing_from_the_rngs(tmp_path):
    """Saving must not perturb the run it checkpoints."""
    model, optimizer, _ = make_training_objects()
    _seed_all(13)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        state = capture_rng_state()
        mgr.save(1)
        mgr.save(2, blocking=False)
        mgr.wait()
    after = rng_draws()
    restore_rng_state(state)
    assert_draws_equal(rng_draws(), after)


def test_worker_rng_state_is_empty_in_the_main_process():
    """With ``num_workers=0`` the manager's own RNG state covers the dataset's draws; the mixin
    must neither save nor restore (and so never rewind) the main process's streams."""
    from ckptguard.core.states.rng import WorkerRNGState

    ds = WorkerRNGState()
    assert ds.state_dict() == {}
    saved = capture_rng_state()
    first = torch.rand(2)
    ds.load_state_dict({"worker_rng": saved})
    ds.load_state_dict({})
    assert not torch.equal(torch.rand(2), first)  # nothing was rewound
