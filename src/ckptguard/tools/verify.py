"""``ckptguard verify``: re-check a checkpoint's files against the checksums committed with it.

The manager hashes every file it writes (``ckptguard.core.integrity``) and commits the entries in the
manifest, so verification needs nothing but the directory: each listed file must exist, have
the recorded size and the recorded CRC-32. Missing, truncated and corrupted files are reported
by name; files the manifest does not list are reported too (they are never loaded, but their
presence means someone wrote into a committed checkpoint). ``CheckpointManager.load()`` runs
the same check before loading unless ``verify_on_load=False``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import MANIFEST_NAME
from ckptguard.core.integrity import verify_files
from ckptguard.core.safe_pickle import METADATA_NAME, honours_unsafe_pickle, read_dcp_metadata
from ckptguard.errors import CheckpointCorruptError, CheckpointFormatError
from ckptguard.tools._progress import progress
from ckptguard.tools.inspect import format_nbytes
from ckptguard.tools.reader import find_checkpoint, is_root, read_checked_manifest


@dataclass
class StepVerification:
    """The verdict on one checkpoint directory."""

    path: str
    step: int | None
    files: int = 0
    nbytes: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)  # name, kind, detail
    unlisted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    target: str
    checked: list[StepVerification]
    incomplete: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.checked)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for d, s in zip(out["checked"], self.checked, strict=True):
            d["ok"] = s.ok
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        lines = []
        for s in self.checked:
            head = f"{'OK     ' if s.ok else 'FAILED '} {s.path}  ({s.files} files, {format_nbytes(s.nbytes)})"
            lines.append(head)
            lines += [f"    {p['kind']:<10} {p['name']}: {p['detail']}" for p in s.problems]
            lines += [f"    unlisted   {n}: not in the manifest (ignored by load)" for n in s.unlisted]
        for name in self.incomplete:
            lines.append(f"skipped {name}: incomplete (no manifest; never loaded)")
        bad = sum(not s.ok for s in self.checked)
        lines.append(
            f"{len(self.checked)} checkpoint(s) verified, "
            + (f"{bad} FAILED" if bad else "all match their manifests")
        )
        return "\n".join(lines)


def verify_step_dir(step_dir: str | os.PathLike, threads: int = 4) -> StepVerification:
    """Check every file of one complete checkpoint against its manifest."""
    step_dir = Path(step_dir)
    try:
        manifest = read_checked_manifest(step_dir)
    except CheckpointFormatError as e:
        if "format_version" in str(e):
            raise  # a newer format: we cannot judge it, which is not the same as damage
        return StepVerification(
            str(step_dir), None, problems=[{"name": MANIFEST_NAME, "kind": "manifest", "detail": str(e)}]
        )
    entries = manifest.get("files")
    result = StepVerification(str(step_dir), manifest.get("step"))
    if not isinstance(entries, dict) or not entries:
        result.problems.append(
            {"name": MANIFEST_NAME, "kind": "manifest", "detail": "lists no files to check"}
        )
        return result
    result.files = len(entries)
    result.nbytes = sum(int(e.get("nbytes", 0)) for e in entries.values())
    on_disk = {n for n in os.listdir(step_dir) if n != MANIFEST_NAME}
    result.unlisted = sorted(on_disk - set(entries))

    names = sorted(entries, key=lambda n: -int(entries[n].get("nbytes", 0)))
    bar = progress(total=result.nbytes, desc=f"verify {step_dir.name}", unit="B", unit_scale=True)
    with bar, ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        futures = {pool.submit(verify_files, step_dir, entries, [n]): n for n in names}
        for fut in as_completed(futures):
            result.problems += [
                {"name": p.name, "kind": p.kind, "detail": p.detail} for p in fut.result()
            ]
            bar.update(int(entries[futures[fut]].get("nbytes", 0)))
    result.problems.sort(key=lambda p: p["name"])
    return result


@honours_unsafe_pickle
def verify_path(
    path: str | os.PathLike, step: int | None = None, *, unsafe_pickle: bool = False
) -> VerifyReport:
    """Verify one checkpoint, or every complete checkpoint of a root (or only ``step``).

    Each intact checkpoint's ``.metadata`` is then unpickled through the allowlist
    (``ckptguard.core.safe_pickle``): a crafted one raises ``CheckpointFormatError`` here, before
    anyone loads it. ``unsafe_pickle=True`` lifts the allowlist (trusted files only).
    """
    report = _verify_path(Path(path), step)
    for checked in report.checked:
        if checked.ok and (Path(checked.path) / METADATA_NAME).is_file():
            read_dcp_metadata(checked.path)
    return report


def _verify_path(path: Path, step: int | None) -> VerifyReport:
    if path.is_dir() and not (path / MANIFEST_NAME).is_file() and is_root(path):
        layout = CheckpointLayout(path)
        steps = [step] if step is not None else layout.complete_steps()
        if step is not None:
            find_checkpoint(path, step)  # raises naming what exists
        incomplete = [p.name for p in layout.transient_dirs()]
        incomplete += sorted(p.name for p in path.glob("step-*") if not (p / MANIFEST_NAME).is_file())
        if not steps:
            find_checkpoint(path)  # raises: no complete checkpoint, naming the incomplete ones
        return VerifyReport(str(path), [verify_step_dir(layout.step_dir(s)) for s in steps], incomplete)
    return VerifyReport(str(path), [verify_step_dir(find_checkpoint(path, step))])


def require_intact(step_dir: str | os.PathLike, action: str) -> None:
    """Raise ``CheckpointCorruptError`` naming every damaged file of ``step_dir``."""
    result = verify_step_dir(step_dir)
    if not result.ok:
        raise CheckpointCorruptError(
            f"{step_dir} does not match its manifest; {action}:\n  "
            + "\n  ".join(f"{p['name']}: {p['kind']} ({p['detail']})" for p in result.problems)
        )
