"""ckptguard: PyTorch training that resumes exactly where it stopped."""

from ckptguard._version import FORMAT_VERSION, __version__
from ckptguard.core.states.rng import WorkerRNGState
from ckptguard.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CommitError,
    ResumeError,
    StateMismatchError,
    UnsupportedStateError,
)
from ckptguard.guard.findings import Finding, GuardReport
from ckptguard.guard.resume_guard import GuardOptions
from ckptguard.manager import CheckpointManager

__all__ = [
    "CheckpointManager",
    "GuardOptions",
    "WorkerRNGState",
    "GuardReport",
    "Finding",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CommitError",
    "ResumeError",
    "StateMismatchError",
    "UnsupportedStateError",
    "FORMAT_VERSION",
    "__version__",
]
