"""ckptguard: PyTorch training that resumes exactly where it stopped."""

from ckptguard._version import FORMAT_VERSION, __version__
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
from ckptguard.manager import CheckpointManager
from ckptguard.rng import WorkerRNGState

__all__ = [
    "CheckpointManager",
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
