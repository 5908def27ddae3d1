"""Progress bars for the long tool operations: tqdm on a terminal, silence everywhere else.

A bar written into a log file or a CI transcript is noise (one line per refresh), and ``--json``
output must stay machine-readable, so a bar is drawn only when stderr is a terminal, tqdm is
installed and ``CKPTGUARD_NO_PROGRESS`` is not set. Callers use the same object either way.

tqdm stays optional (the ``progress`` extra, and dev) rather than a plain dependency: the library
itself runs inside training jobs, where nothing draws a bar, and only these tools use it. With
tqdm installed every bar is a tqdm bar (``disable=True`` when silent, which tqdm makes a no-op);
``_Silent`` is the minimal stand-in for when it is absent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # the ``progress`` extra is not installed: no bars
    _tqdm = None


def progress_enabled() -> bool:
    if os.environ.get("CKPTGUARD_NO_PROGRESS") or _tqdm is None:
        return False
    return sys.stderr.isatty()


class _Silent:
    """The part of tqdm's interface the tools use, doing nothing (tqdm not installed)."""

    disable = True

    def __init__(self, iterable: Iterable | None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    unit_scale: bool = False,
    enabled: bool | None = None,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``); silent unless enabled."""
    if _tqdm is None:
        return _Silent(iterable)
    return _tqdm(
        iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False,
        file=sys.stderr, dynamic_ncols=True,
        disable=not (progress_enabled() if enabled is None else enabled),
    )
