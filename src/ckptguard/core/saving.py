"""Rank 0's part of a save: prepare ``.step-N.partial/``, commit it, set aside, retain.

``Committer`` holds what those phases share: the layout, the rollback a branch starts from
(``rollback_from``), the retention setting and the background deleter. Every method runs on
rank 0 only (the manager hands results and errors to the other ranks); nothing here runs a
collective. ``manifest_header_for`` builds the manifest's header from the live objects.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptguard.core import records
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import MANIFEST_NAME, manifest_header, read_manifest
from ckptguard.core.lifecycle import Resources
from ckptguard.core.policy import RetentionPolicy
from ckptguard.core.states import MODEL, OPTIMIZER, model_device_type, optimizer_hyperparameters
from ckptguard.errors import CommitError

logger = logging.getLogger(__name__)


def manifest_header_for(
    step: int, mode: str, *, world_size: int, model: nn.Module,
    optimizer: torch.optim.Optimizer | None, rank_states: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of ``step`` before its files are listed: what was saved and the settings a
    resume is checked against (``guard.checks``)."""
    opt = optimizer
    return manifest_header(
        step=step,
        world_size=world_size,
        save_mode=mode,
        components=[MODEL] + ([OPTIMIZER] if opt is not None else []) + list(rank_states),
        info={
            "model_training": model.training,
            "optimizer_class": type(opt).__name__ if opt is not None else None,
            "param_groups": optimizer_hyperparameters(opt) if opt is not None else [],
            "device_type": model_device_type(model),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
    )


class Committer:
    """The save phases that change the root (rank 0): create the ``.partial`` directory, commit
    it, set a rollback's abandoned branch aside, and apply retention.

    The caller must be the root's writer (``lifecycle.become_writer``): only the writer may
    remove what interrupted saves left. ``rollback_from`` is the step S of a rollback (``load(step=S)``
    while newer checkpoints exist); the next commit sets those newer checkpoints aside."""

    def __init__(
        self, layout: CheckpointLayout, resources: Resources, *, world_size: int,
        retention: RetentionPolicy, commit_timeout_s: float,
    ) -> None:
        self.layout = layout
        self.root = layout.root
        self.world_size = world_size
        self.retention = retention
        # metrics of the complete checkpoints (keep_best), read once from their manifests:
        # a committed manifest never changes, and only this writer commits (the root's lock)
        self._metrics: dict[int, dict[str, Any] | None] = {}
        self.commit_timeout_s = commit_timeout_s
        self.rollback_from: int | None = None
        # its deleter (rank 0), freed by Resources.release; never the manager, which a
        # reference from here would keep alive in a cycle (and with it the root's lock)
        self._resources = resources

    def prepare_partial(self, step: int, overwrite: bool) -> Path:
        """Create ``.step-N.partial/``. Leftovers of a save that failed in this process (e.g. on
        a full disk) go now, not at the next start; ``recover`` also puts back a checkpoint an
        interrupted overwrite moved."""
        try:
            # leftover .deleting directories go to the background deleter, not into this save
            self.delete_in_background(self.layout.recover(defer_deleting=True))
            # after a rollback, a step the abandoned run saved is set aside at commit, not replaced
            rollback = self.rollback_from is not None and step > self.rollback_from
            return self.layout.prepare_partial(step, overwrite or rollback)
        except OSError as e:
            raise CommitError(
                f"cannot create {self.layout.partial_dir(step)}: {e}. Nothing was written; the "
                "previous checkpoints are untouched."
            ) from e

    def commit(self, step: int, manifest: dict[str, Any]) -> Path:
        """Wait for every rank's done record, write the manifest, rename into place, retain."""
        partial = self.layout.partial_dir(step)
        try:
            manifest["files"] = records.collect_done_records(partial, self.world_size, self.commit_timeout_s)
            manifest["committed_unix"] = time.time()
            self.set_aside_abandoned(step)  # before the rename: a crash then resumes from S
            path = self.layout.commit(step, manifest)
            self._metrics[step] = manifest.get("metrics")
        except OSError as e:
            final = self.layout.step_dir(step)
            if not partial.exists() and (final / MANIFEST_NAME).is_file():
                raise CommitError(
                    f"{final} was renamed into place but {self.root} could not be fsynced: {e}. "
                    "It loads now but might not survive a power loss; save a later step to be sure."
                ) from e
            raise CommitError(
                f"could not commit {partial} as {self.layout.step_dir(step).name}: {e}. The "
                "checkpoint was not committed and the previous ones are untouched; fix the cause "
                "(e.g. free disk space) and save again."
            ) from e
        self.retain(step)
        return path

    def retain(self, step: int) -> None:
        """Retention after the commit of ``step``: the checkpoints no rule keeps
        (``core.policy.RetentionPolicy``: keep_last, keep_every, keep_best; never the newest,
        never ``step``) are made non-loadable now, in one atomic rename each and one fsync
        (``layout.doom``), and removed by the background deleter, so a save costs no ``rmtree``.
        The rules see every complete checkpoint of the live branch, whichever process wrote it.
        Never fails the save: the new checkpoint is committed, and an error here would make the
        caller think it was lost."""
        self.report_retention_failures()
        try:
            steps = self.layout.complete_steps()
            doomed = self.retention.decide(steps, self.metrics_of(steps), protect=[step]).doomed
            if doomed:
                logger.info("retention: deleting steps %s under %s (in the background)", doomed, self.root)
            self.delete_in_background(self.layout.doom(doomed), retry_failed=True)
        except OSError as e:
            # Leftover .deleting directories are removed after the next save's recover().
            logger.warning("retention: could not delete old checkpoints under %s: %s", self.root, e)
            if self._resources.deleter is not None:
                self._resources.deleter.record_failure(self.root, e)

    def metrics_of(self, steps: list[int]) -> dict[int, dict[str, Any] | None]:
        """The metrics saved with each of ``steps`` (only what ``keep_best`` needs). A manifest
        that cannot be read leaves its checkpoint unranked, which keep_last still covers."""
        if self.retention.keep_best is None:
            return {}
        for step in steps:
            if step not in self._metrics:
                try:
                    self._metrics[step] = read_manifest(self.layout.step_dir(step)).get("metrics")
                except (OSError, ValueError, AttributeError) as e:
                    logger.warning("retention: cannot read the metrics of %s (%s); it is not ranked "
                                   "by keep_best", self.layout.step_dir(step), e)
                    self._metrics[step] = None
        return {s: self._metrics[s] for s in steps}

    def delete_in_background(self, paths: list[Path], *, retry_failed: bool = False) -> None:
        deleter = self._resources.deleter
        if deleter is None:  # not rank 0: never reached (recover and retention run there)
            for path in paths:
                self.layout.remove_doomed(path)
            return
        deleter.submit(paths, retry_failed=retry_failed)

    def set_aside_abandoned(self, step: int) -> None:
        """The first commit after a rollback to S moves every checkpoint after S out of the
        root, so that "the latest checkpoint" is the new branch's from now on.

        It runs once the new checkpoint's files are durable and before its rename: a crash in
        between leaves S as the latest, never the abandoned branch (``layout.set_aside``).
        """
        start = self.rollback_from
        if start is None:
            return
        try:
            branch = self.layout.set_aside(
                start, reason=f"load(step={start}) then save({step}): a new branch from step {start}"
            )
        except OSError as e:
            raise CommitError(
                f"could not set aside the checkpoints after step {start} under {self.root} "
                f"(a rollback to step {start}): {e}. Step {step} was not committed; the next "
                "save, or the next start, finishes the set-aside."
            ) from e
        self.rollback_from = None
        if branch is not None:
            logger.warning(
                "rollback: set aside steps %s of the abandoned run under %s, because the run "
                "went back to step %d (load(step=%d)) and saved step %d; load() resumes the new "
                "branch from now on, and ckptguard never loads, prunes or deletes them",
                ", ".join(map(str, branch.steps)), branch.path, start, start, step,
            )

    def finish_deletions(self, timeout_s: float) -> None:
        """At close: wait, bounded, for the background deletions, and say what happened."""
        deleter = self._resources.deleter
        if deleter is None:
            return
        pending = deleter.pending()
        if pending:
            started = time.monotonic()
            if deleter.wait(timeout_s):
                logger.info(
                    "retention: close() waited %.2fs for the deletion of %d old checkpoint(s)",
                    time.monotonic() - started, len(pending),
                )
            else:
                left = deleter.stop()
                logger.warning(
                    "retention: close() waited %.0fs (timeout_s) and leaves %d old checkpoint(s) "
                    "to the next writer of %s, which removes them: %s. They are .deleting "
                    "directories: no load considers them.",
                    timeout_s, len(left), self.root, ", ".join(str(p) for p in left),
                )
        self.report_retention_failures()

    def report_retention_failures(self) -> None:
        """Log, once each, the retention deletions that failed since the last report."""
        deleter = self._resources.deleter
        for failure in deleter.take_unreported() if deleter is not None else []:
            logger.warning(
                "retention: an earlier deletion failed: %s: %s. Training went on and no load "
                "considers what was left (a .deleting directory, or an old checkpoint still "
                "complete), but it takes disk space; the next writer retries. See "
                "mgr.retention_errors.",
                failure.path, failure.error,
            )
