"""``ckptguard export``: the model weights of a (sharded) checkpoint as one file for inference.

Only the ``model`` entries are read (the optimizer, often twice the model's size, is never
touched), each gathered to its full shape whatever the world size that wrote it, and written
as a ``torch.save`` file of a plain ``state_dict`` or as ``.safetensors`` (optional dependency:
``pip install safetensors``). Floating-point tensors can be cast (``dtype``); integer and bool
tensors keep their dtype. The checkpoint's checksums are verified first, and the output file
appears atomically (written aside, then renamed), so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ckptguard.core.safe_pickle import honours_unsafe_pickle
from ckptguard.core.states import MODEL
from ckptguard.errors import CheckpointExistsError, CheckpointFormatError
from ckptguard.tools._progress import progress
from ckptguard.tools.inspect import format_nbytes
from ckptguard.tools.reader import find_checkpoint, load_tensor_state, read_checked_manifest
from ckptguard.tools.verify import require_intact

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
FORMATS = ("pt", "safetensors")


@dataclass
class ExportReport:
    source: str
    destination: str
    format: str
    step: int | None
    tensors: int
    nbytes: int
    dtype: str | None
    kept_dtype: list[str]  # non-floating tensors left as they were

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        cast = f", floating tensors cast to {self.dtype}" if self.dtype else ""
        kept = f" ({len(self.kept_dtype)} non-floating kept as they were)" if self.kept_dtype and self.dtype else ""
        return (
            f"exported {self.tensors} model tensors ({format_nbytes(self.nbytes)}{cast}{kept}) of step "
            f"{self.step}\n  from {self.source}\n  to   {self.destination} [{self.format}]"
        )


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"--dtype {name!r}: expected one of {sorted(_DTYPES)}") from None


def _save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError(
            "writing .safetensors needs the safetensors package: pip install safetensors "
            "(or pip install 'ckptguard[safetensors]'); or export to a .pt file instead"
        ) from e
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(
            f"the model state holds non-tensor entries {bad[:5]} that safetensors cannot store; "
            "export to a .pt file instead"
        )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


@honours_unsafe_pickle
def export_model(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str | torch.dtype | None = None,
    fmt: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
) -> ExportReport:
    """Write the model weights of checkpoint ``path`` (or a root's newest / ``step``) to ``out``.

    ``fmt`` is ``"pt"`` or ``"safetensors"``; by default taken from ``out``'s suffix.
    ``unsafe_pickle=True`` unpickles ``.metadata`` without the allowlist (trusted files only).
    """
    out = Path(out)
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "pt")
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    target_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if out.exists() and not overwrite:
        raise CheckpointExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    step_dir = find_checkpoint(path, step)
    manifest = read_checked_manifest(step_dir)
    with progress(total=3, desc="export", unit="phase") as bar:  # verify, read, write: bulk phases
        bar.set_postfix_str("verifying")
        if verify:
            require_intact(step_dir, "not exporting it")
        bar.update()
        bar.set_postfix_str("reading")
        sd = load_tensor_state(step_dir, keys={MODEL}).get(MODEL)
        bar.update()
        bar.set_postfix_str("writing")
        report = _export_state(sd, step_dir, manifest, out, fmt, target_dtype)
        bar.update()
    return report


def _export_state(
    sd: Any, step_dir: Path, manifest: dict, out: Path, fmt: str, target_dtype: Any
) -> ExportReport:
    """Cast (if asked) and write ``sd`` atomically (temp file, rename)."""
    if not sd:
        raise CheckpointFormatError(f"{step_dir} holds no '{MODEL}' entries to export")
    kept = []
    if target_dtype is not None:
        for k, v in sd.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                sd[k] = v.to(target_dtype)
            else:
                kept.append(k)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if fmt == "safetensors":
            meta = {"format": "pt", "ckptguard_step": str(manifest.get("step")), "source": str(step_dir)}
            _save_safetensors(sd, tmp, meta)
        else:
            torch.save(sd, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    tensors = [v for v in sd.values() if isinstance(v, torch.Tensor)]
    return ExportReport(
        str(step_dir), str(out), fmt, manifest.get("step"), len(tensors),
        sum(t.numel() * t.element_size() for t in tensors),
        str(target_dtype).removeprefix("torch.") if target_dtype else None, kept,
    )
