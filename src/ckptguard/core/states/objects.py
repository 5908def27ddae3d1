"""Objects that report and restore their own state: an LR scheduler, a grad scaler, extras.
Replicated state: any rank's copy may stand in after a world-size change."""

from __future__ import annotations

from typing import Any

from ckptguard.core.states.base import require_stateful


class ObjectState:
    """Any object with ``state_dict()``/``load_state_dict()`` (scheduler, grad scaler, ...)."""

    per_rank = False

    def __init__(self, obj: Any, setting: str) -> None:
        require_stateful(obj, setting)
        self.obj = obj

    def state_dict(self) -> Any:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        self.obj.load_state_dict(state_dict)
