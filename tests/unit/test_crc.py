"""Parallel CRC-32 (``ckptguard.core.crc``): segments combined must equal zlib's one pass exactly,
or every checkpoint written with it would fail verification (and a wrong combine would hide
damage)."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from ckptguard.core import crc as _crc
from ckptguard.core.integrity import crc32_file


def test_combine_equals_one_pass():
    rng = random.Random(0)
    for _ in range(300):
        a = rng.randbytes(rng.randint(0, 3000))
        b = rng.randbytes(rng.randint(0, 3000))
        assert _crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _backends() -> list:
    out = [pytest.param(zlib.crc32, id="zlib")]
    try:
        from isal.isal_zlib import crc32 as isal_crc32
    except ImportError:
        out.append(pytest.param(None, id="isal", marks=pytest.mark.skip(reason="isal not installed")))
    else:
        out.append(pytest.param(isal_crc32, id="isal"))
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8])
def test_parallel_file_crc_equals_zlib(tmp_path, monkeypatch, threads, backend):
    monkeypatch.setattr(_crc, "crc32", backend)
    monkeypatch.setattr(_crc, "_MIN_SEGMENT", 4096)  # many segments on a small file
    monkeypatch.setattr(_crc, "_CHUNK", 1000)  # several reads per segment, odd sizes
    data = random.Random(threads).randbytes(123_457)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert crc32_file(path, threads=threads) == (len(data), f"{zlib.crc32(data):08x}")

    damaged = bytearray(data)
    damaged[100_000] ^= 1  # a flipped bit in a later segment changes the combined value
    path.write_bytes(bytes(damaged))
    assert crc32_file(path, threads=threads)[1] != f"{zlib.crc32(data):08x}"


def test_empty_and_tiny_files(tmp_path):
    for n in (0, 1, 4095):
        p = tmp_path / f"f{n}"
        p.write_bytes(os.urandom(n))
        assert crc32_file(p, threads=4) == (n, f"{zlib.crc32(p.read_bytes()):08x}")
