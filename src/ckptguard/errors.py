"""Exceptions raised by ckptguard.

Every message names the path, key or setting at fault, what was expected and what was found,
and what to do, so that a failed resume can be fixed without reading ckptguard's source.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error ckptguard raises on purpose."""


class CheckpointNotFoundError(CheckpointError):
    """A requested step, or any complete checkpoint, does not exist under the root."""


class CheckpointExistsError(CheckpointError):
    """A complete checkpoint for this step exists already and overwriting was not asked for."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files do not match the manifest written when it was committed."""


class CheckpointFormatError(CheckpointError):
    """A directory is not a ckptguard checkpoint, or is in a format this version cannot read."""


class CheckpointLockedError(CheckpointError):
    """Another manager (maybe another job) holds the root's lock."""


class CommitError(CheckpointError):
    """A save could not be committed: some rank did not finish writing, or the disk refused."""


class UnsupportedStateError(CheckpointError):
    """An object handed to the manager cannot be checkpointed exactly (e.g. a plain DataLoader)."""


class StateMismatchError(CheckpointError):
    """The live objects do not match the checkpoint (missing/unexpected keys, shapes, dtypes)."""


class ResumeError(CheckpointError):
    """A strict resume check failed (see ``ckptguard.guard``)."""
