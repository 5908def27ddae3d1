"""What every state adapter shares: the state names, the protocol, and its check.

The names are the keys under which the states are saved (DCP's top-level keys, a rank file's
``states`` keys, the manifest's ``components``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ckptguard.errors import UnsupportedStateError

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
DATALOADER = "dataloader"
RNG = "rng"
EXTRA_PREFIX = "extra."


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def require_stateful(obj: Any, setting: str) -> None:
    """Refuse, by setting name, an object that cannot report and restore its state."""
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
    if missing:
        raise UnsupportedStateError(
            f"{setting}={type(obj).__name__} has no {' or '.join(missing)}(); ckptguard can only "
            "checkpoint objects that can report and restore their state."
        )
