"""Convert old index-keyed checkpoints into ckptguard checkpoints keyed by parameter FQN.

The old format (see ``ckptguard.tools.legacy``) keeps the optimizer's raw ``state_dict()``,
whose ``state`` is keyed by each parameter's integer position in ``param_groups``. Position ``i`` means "the i-th parameter the
optimizer was given", which is *not* ``named_parameters()`` order once the optimizer is built
from decay / no-decay groups, and tied weights appear in it once. So the mapping from position to
name is taken from how the optimizer is built (a model and its optimizer, a list of names in
optimizer order), validated against the old checkpoint (counts, group sizes, every moment's
shape), and refused with the offending parameter named when it does not fit; nothing is
written until the whole mapping checks out.

What the old format never held cannot be migrated: the RNG streams and the dataloader position.
The migrated checkpoint has no ``rng`` state (a resumed run keeps the RNG its own seeding gave
it, as the old trainer did) and no ``dataloader`` state; the report says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import manifest_header, rank_filename
from ckptguard.core.integrity import hash_files
from ckptguard.core.lock import RootLock
from ckptguard.core.records import read_rank_file
from ckptguard.core.safe_pickle import honours_unsafe_pickle
from ckptguard.core.states import DATALOADER, LR_SCHEDULER, MODEL, OPTIMIZER, RNG
from ckptguard.errors import CheckpointExistsError, CheckpointFormatError, StateMismatchError
from ckptguard.tools._progress import progress
from ckptguard.tools.legacy import LegacyState, read_legacy
from ckptguard.tools.step_inference import infer_step

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------- the mapping


@dataclass
class ParamSlot:
    """One parameter of the old optimizer: its integer position and the name it gets."""

    index: int
    group: int
    name: str
    shape: list[int]
    state_keys: list[str]


@dataclass
class MigrationReport:
    """What ``migrate`` read, how it named every parameter, and what it wrote (or would)."""

    source: str
    source_kind: str
    destination: str | None
    step: int
    mapping_source: str
    slots: list[ParamSlot]
    group_sizes: list[int]
    model_tensors: int
    stripped_prefix: str | None = None
    filled_hyperparameters: dict[str, list[str]] = field(default_factory=dict)
    params_without_state: list[str] = field(default_factory=list)
    params_not_in_optimizer: list[str] = field(default_factory=list)
    migrated_states: list[str] = field(default_factory=list)
    not_recovered: list[str] = field(default_factory=list)
    unused_keys: list[str] = field(default_factory=list)
    dry_run: bool = False
    step_source: str = ""  # "--step", or where in the old checkpoint the step was found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"{'would migrate' if self.dry_run else 'migrated'} {self.source} ({self.source_kind}) "
            f"as step {self.step}" + (f" (from {self.step_source})" if self.step_source else ""),
            f"  parameter names from: {self.mapping_source}",
            f"  {len(self.slots)} optimizer parameters in {len(self.group_sizes)} group(s) of sizes "
            f"{self.group_sizes}; {self.model_tensors} model tensors",
            "  position  group  parameter                      shape         state",
        ]
        for s in self.slots:
            lines.append(
                f"  {s.index:>8}  {s.group:>5}  {s.name:<30} {str(s.shape):<13} {', '.join(s.state_keys) or '-'}"
            )
        if self.stripped_prefix:
            lines.append(f"  stripped the wrapper prefix '{self.stripped_prefix}' from the model keys")
        for where, keys in self.filled_hyperparameters.items():
            lines.append(f"  {where}: added {keys} (missing from the old groups) from the optimizer you built")
        if self.params_without_state:
            lines.append(f"  no optimizer state yet (never stepped): {self.params_without_state}")
        if self.params_not_in_optimizer:
            lines.append(f"  not in the optimizer (frozen?): {self.params_not_in_optimizer}")
        lines.append(f"  migrated: {', '.join(self.migrated_states)}")
        lines.append(
            f"  NOT recovered (the old format does not hold them): {', '.join(self.not_recovered)}"
        )
        if self.unused_keys:
            lines.append(f"  left behind (unknown keys of the old checkpoint): {self.unused_keys}")
        lines.append(f"  written: {self.destination}" if self.destination else "  nothing written (dry run)")
        return "\n".join(lines)


@dataclass
class _ModelSpec:
    """Names, shapes and dtypes a parameter mapping is checked against."""

    tensors: dict[str, tuple[list[int], torch.dtype]]  # every state-dict entry
    params: list[str]  # canonical parameter names, named_parameters() order
    alias: dict[str, str]  # any name of a parameter -> its canonical name
    by_id: dict[int, str]  # id(parameter) -> canonical name
    from_model: bool


def _spec_from_model(model: nn.Module) -> _ModelSpec:
    by_id = {id(p): n for n, p in model.named_parameters()}
    alias = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    tensors = {k: (list(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return _ModelSpec(tensors, list(by_id.values()), alias, by_id, True)


def _spec_from_state(model_sd: dict[str, torch.Tensor]) -> _ModelSpec:
    tensors = {k: (list(v.shape), v.dtype) for k, v in model_sd.items()}
    return _ModelSpec(tensors, list(tensors), {k: k for k in tensors}, {}, False)


def _strip_wrapper_prefix(model_sd: dict, spec: _ModelSpec) -> tuple[dict, str | None]:
    """Drop a DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefix the live model lacks."""
    if not spec.from_model or set(model_sd) == set(spec.tensors):
        return model_sd, None
    for prefix in _WRAPPER_PREFIXES:
        if model_sd and all(k.startswith(prefix) for k in model_sd):
            stripped = {k[len(prefix):]: v for k, v in model_sd.items()}
            if set(stripped) == set(spec.tensors):
                return stripped, prefix
    return model_sd, None


def _check_model(model_sd: dict[str, torch.Tensor], spec: _ModelSpec, source: Path) -> None:
    missing = sorted(set(spec.tensors) - set(model_sd))
    unexpected = sorted(set(model_sd) - set(spec.tensors))
    if missing or unexpected:
        raise StateMismatchError(
            f"the model state dict in {source} does not match the model: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}. Build the model exactly as the old trainer did."
        )
    for name, (shape, dtype) in spec.tensors.items():
        t = model_sd[name]
        if list(t.shape) != shape or t.dtype != dtype:
            raise StateMismatchError(
                f"parameter '{name}': the model has {shape} {dtype}, {source} has "
                f"{list(t.shape)} {t.dtype}. Build the model exactly as the old trainer did."
            )


def _names_from_optimizer(optimizer: torch.optim.Optimizer, spec: _ModelSpec) -> list[list[str]]:
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        names = []
        for pi, p in enumerate(group["params"]):
            if id(p) not in spec.by_id:
                raise StateMismatchError(
                    f"optimizer param_groups[{gi}]['params'][{pi}] (shape {list(p.shape)}) is not a "
                    "parameter of the model; build the optimizer from the model you pass"
                )
            names.append(spec.by_id[id(p)])
        groups.append(names)
    return groups


def _resolve_names(names: list[str], spec: _ModelSpec, what: str) -> list[str]:
    out = []
    for i, name in enumerate(names):
        if name not in spec.alias:
            known = "parameters of the model" if spec.from_model else "keys of the old model state dict"
            raise StateMismatchError(
                f"{what}: name #{i} '{name}' is not among the {known} "
                f"(e.g. {spec.params[:5]})"
            )
        out.append(spec.alias[name])
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        if name in seen:
            tied = f" ('{names[i]}' is tied to '{name}')" if names[i] != name else ""
            raise StateMismatchError(
                f"{what}: parameter '{name}' appears at positions {seen[name]} and {i}{tied}; an "
                "optimizer holds each parameter once, so this mapping is ambiguous"
            )
        seen[name] = i
    return out


def plan_mapping(
    legacy: LegacyState,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    param_names: list[str] | None = None,
) -> tuple[list[ParamSlot], str, _ModelSpec]:
    """Name every integer position of the old optimizer; raise naming the first misfit."""
    if optimizer is not None and model is None:
        raise ValueError("an optimizer needs its model (pass model= too)")
    spec = _spec_from_model(model) if model is not None else _spec_from_state(legacy.model)
    old_groups = [g["params"] for g in legacy.optimizer["param_groups"]]
    sizes = [len(g) for g in old_groups]
    order = [pid for g in old_groups for pid in g]
    if len(set(order)) != len(order):
        raise CheckpointFormatError(f"{legacy.source}: a parameter position appears in two param_groups")
    stray = sorted(set(legacy.optimizer["state"]) - set(order))
    if stray:
        raise CheckpointFormatError(
            f"{legacy.source}: optimizer state for positions {stray} that no param_group lists; "
            "the optimizer state dict is inconsistent"
        )

    saved_names = [g.get("param_names") for g in legacy.optimizer["param_groups"]]
    if optimizer is not None:
        new_groups = _names_from_optimizer(optimizer, spec)
        new_sizes = [len(g) for g in new_groups]
        if new_sizes != sizes:
            raise StateMismatchError(
                f"{legacy.source}: the old optimizer has {len(sizes)} param group(s) of sizes "
                f"{sizes}; the optimizer you built has {len(new_sizes)} of sizes {new_sizes}. "
                "Build it exactly as the old trainer did (same groups, same order)."
            )
        source = f"optimizer ({type(optimizer).__name__}) param_groups"
        names = _resolve_names([n for g in new_groups for n in g], spec, source)
        if param_names is not None:  # both given: they must agree, or which one is right?
            listed = _resolve_names(list(param_names), spec, "--param-names")
            if listed != names:
                first = next(
                    (i for i, (a, b) in enumerate(zip(listed, names, strict=False)) if a != b),
                    min(len(listed), len(names)),
                )
                raise StateMismatchError(
                    f"--param-names and the optimizer disagree at position {first}: the names "
                    f"file says {listed[first] if first < len(listed) else 'nothing'!r}, the "
                    f"optimizer {names[first] if first < len(names) else 'nothing'!r}; pass one of them"
                )
    elif param_names is not None:
        names, source = _resolve_names(list(param_names), spec, "--param-names"), "names file"
    elif all(isinstance(n, list) for n in saved_names):
        names = _resolve_names([n for g in saved_names for n in g], spec, "saved param_names")
        source = "param_names saved in the old param_groups"
    elif model is not None and len(sizes) == 1:
        names, source = list(spec.params), "model.named_parameters() order (single param group)"
    elif model is not None:
        raise StateMismatchError(
            f"{legacy.source}: the old optimizer has {len(sizes)} param groups of sizes {sizes}; a "
            "model alone does not say which parameter sits at which position. Return (model, "
            "optimizer) from the factory, or pass --param-names FILE."
        )
    else:
        raise ValueError("migrate needs a model, a model and optimizer, or param_names")

    if len(names) != len(order):
        raise StateMismatchError(
            f"{legacy.source}: the old optimizer has {len(order)} parameters (groups of sizes "
            f"{sizes}); the {source} gives {len(names)}"
        )
    # torch >= 2.6 saves param_names when the optimizer was given named parameters: a free
    # cross-check of any other source, when they name the model's parameters.
    for gi, saved in enumerate(saved_names):
        if isinstance(saved, list) and all(n in spec.alias for n in saved):
            start = sum(sizes[:gi])
            if [spec.alias[n] for n in saved] != names[start : start + len(saved)]:
                raise StateMismatchError(
                    f"{legacy.source}: param_groups[{gi}] saved the names {saved}, but the "
                    f"{source} puts {names[start : start + len(saved)]} there"
                )

    slots = []
    group_of = {pid: gi for gi, g in enumerate(old_groups) for pid in g}
    for pid, name in zip(order, names, strict=True):
        if name not in spec.tensors:
            raise StateMismatchError(f"parameter '{name}' is not in the model's state_dict()")
        shape = spec.tensors[name][0]
        state = legacy.optimizer["state"].get(pid, {})
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1 and list(value.shape) != shape:
                raise StateMismatchError(
                    f"{legacy.source}: optimizer state '{key}' at position {pid} has shape "
                    f"{list(value.shape)}, but the {source} puts parameter '{name}' of shape "
                    f"{shape} there; the mapping is wrong (different group order or model)"
                )
        slots.append(ParamSlot(pid, group_of[pid], name, shape, sorted(state)))
    return slots, source, spec


# ---------------------------------------------------------------------- writing


def _new_optimizer_state(
    legacy: LegacyState, slots: list[ParamSlot], optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The FQN-keyed form that ``get_optimizer_state_dict`` produces and the manager loads."""
    state = {s.name: legacy.optimizer["state"][s.index] for s in slots if s.index in legacy.optimizer["state"]}
    groups, filled = [], {}
    for gi, old in enumerate(legacy.optimizer["param_groups"]):
        group = {k: v for k, v in old.items() if k != "params"}
        if optimizer is not None:
            # Hyperparameters a newer torch added (e.g. AdamW's decoupled_weight_decay) are missing
            # from an old group; optimizer.load_state_dict would default them, DCP's strict load
            # would fail on them, so take them from the optimizer built like the old one.
            for k, v in optimizer.param_groups[gi].items():
                if k not in group and k != "params" and not isinstance(v, torch.Tensor):
                    group[k] = v
                    filled.setdefault(f"param_groups[{gi}]", []).append(k)
        group["params"] = [s.name for s in slots if s.group == gi]
        groups.append(group)
    return {"state": state, "param_groups": groups}, filled


def _write_checkpoint(
    root: Path, step: int, tensors: dict[str, Any], rank_states: dict[str, Any],
    header: dict[str, Any], overwrite: bool,
) -> Path:
    """Write a one-rank ckptguard checkpoint with the manager's commit protocol."""
    layout = CheckpointLayout(root)
    lock = RootLock(root)
    lock.acquire()  # refuses while a training job's manager holds this root
    try:
        partial = layout.prepare_partial(step, overwrite)
        buf = io.BytesIO()
        torch.save({"step": step, "rank": 0, "world_size": 1, "states": rank_states}, buf)
        with open(partial / rank_filename(0), "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        # The manager loads rank files with weights_only=True: fail now, not at the resume.
        read_rank_file(partial / rank_filename(0))
        writer = dcp.FileSystemWriter(partial, single_file_per_rank=True, sync_files=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(tensors, storage_writer=writer, no_dist=True)
        names = sorted(n for n in os.listdir(partial) if n.endswith(".distcp"))
        names += [".metadata", rank_filename(0)]
        manifest = dict(header, files=hash_files(partial, names), committed_unix=time.time())
        return layout.commit(step, manifest)
    finally:
        lock.release()


def _header(step: int, legacy: LegacyState, optimizer: Any, groups: list[dict], components: list[str]) -> dict:
    """The manifest fields ``CheckpointManager`` writes (kept in step by a test), plus provenance."""
    hyper = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
         if k not in ("params", "param_names") and isinstance(v, (int, float, bool, str, type(None), tuple, list))}
        for g in groups
    ]
    header = manifest_header(
        step=step,
        world_size=1,
        save_mode="migrate",
        components=components,
        info={
            "model_training": None,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
            "param_groups": hyper,
            "device_type": None,  # unknown: the old trainer's device is not recorded
            "deterministic_algorithms": None,
        },
    )
    header["migrated_from"] = {"path": str(legacy.source.resolve()), "format": legacy.kind, "keys": legacy.keys}
    header["metrics"] = {}  # none known; keep_best does not rank it
    header["retention"] = None  # no writer's rules yet: the next save records its own
    return header


@honours_unsafe_pickle
def migrate(
    old: str | os.PathLike,
    new: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    param_names: list[str] | None = None,
    step: int | None = None,
    model_key: str | None = None,
    optimizer_key: str | None = None,
    scheduler_key: str | None = None,
    unsafe_pickle: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
) -> MigrationReport:
    """Convert the old checkpoint ``old`` into ``new/step-NNNNNNNN`` (``new`` is a checkpoint root).

    The integer positions of the old optimizer are named by ``optimizer`` (built from ``model``
    exactly as the old trainer built it; meta-device tensors are fine), else by ``param_names``
    (names in optimizer order), else by ``param_names`` saved in the old groups, else, for a
    single param group only, by ``model.named_parameters()`` order. Every check runs before
    anything is written; ``dry_run`` stops there. ``step`` overrides the step found in ``old``.
    """
    # The work is three bulk phases (read, check + map, write + hash): the bar names the phase.
    with progress(total=3, desc="migrate", unit="phase") as bar:
        bar.set_postfix_str("reading")
        return _migrate(
            old, new, bar, model=model, optimizer=optimizer, param_names=param_names, step=step,
            model_key=model_key, optimizer_key=optimizer_key, scheduler_key=scheduler_key,
            unsafe_pickle=unsafe_pickle, overwrite=overwrite, dry_run=dry_run,
        )


def _step_records(legacy: LegacyState) -> dict[str, Any]:
    """The parts of the old checkpoint that record its step, under their own keys (so that
    ``infer_step`` names them as the user knows them)."""
    keys = legacy.keys
    records: dict[str, Any] = {keys["optimizer"] or "optimizer": legacy.optimizer}
    if legacy.lr_scheduler is not None:
        records[keys["lr_scheduler"] or "lr_scheduler"] = legacy.lr_scheduler
    if legacy.step is not None:
        records[keys["step"] or "step"] = legacy.step
    return records


def _migrate(  # noqa: ANN001 - ``migrate``'s own arguments, typed there
    old, new, bar, *, model, optimizer, param_names, step, model_key, optimizer_key, scheduler_key,
    unsafe_pickle, overwrite, dry_run,
) -> MigrationReport:
    """``migrate``'s work; ``bar`` advances once per phase."""
    legacy = read_legacy(
        old, model_key=model_key, optimizer_key=optimizer_key, scheduler_key=scheduler_key,
        unsafe_pickle=unsafe_pickle,
    )
    bar.update()
    bar.set_postfix_str("mapping")
    if step is not None:
        step_source = "--step"
    else:  # from what the old checkpoint holds; refused, naming the sources, if they disagree
        step, step_source = infer_step(_step_records(legacy))
        logger.info("migrate: %s was saved at step %d, from %s", legacy.source, step, step_source)
    spec_for_prefix = _spec_from_model(model) if model is not None else _spec_from_state(legacy.model)
    model_sd, stripped = _strip_wrapper_prefix(legacy.model, spec_for_prefix)
    legacy.model = model_sd
    if spec_for_prefix.from_model:  # a different model explains everything after: say so first
        _check_model(model_sd, spec_for_prefix, legacy.source)
    slots, source, spec = plan_mapping(legacy, model=model, optimizer=optimizer, param_names=param_names)
    osd, filled = _new_optimizer_state(legacy, slots, optimizer)

    rank_states = {LR_SCHEDULER: legacy.lr_scheduler} if legacy.lr_scheduler is not None else {}
    components = [MODEL, OPTIMIZER, *rank_states]
    in_optimizer = {s.name for s in slots}
    report = MigrationReport(
        source=str(legacy.source), source_kind=legacy.kind, destination=None, step=step,
        mapping_source=source, slots=slots, group_sizes=[len(g["params"]) for g in osd["param_groups"]],
        model_tensors=len(model_sd), stripped_prefix=stripped, filled_hyperparameters=filled,
        params_without_state=[s.name for s in slots if not s.state_keys],
        params_not_in_optimizer=[n for n in spec.params if n not in in_optimizer],
        migrated_states=components,
        not_recovered=[RNG, DATALOADER] + ([] if rank_states else [LR_SCHEDULER]),
        unused_keys=legacy.unused_keys, dry_run=dry_run, step_source=step_source,
    )
    if dry_run:
        return report
    root = Path(new)
    if root.resolve() == legacy.source.resolve():
        raise CheckpointExistsError(f"the destination {root} is the old checkpoint itself; choose a new root")
    header = _header(step, legacy, optimizer, osd["param_groups"], components)
    bar.update()
    bar.set_postfix_str("writing")
    path = _write_checkpoint(root, step, {MODEL: model_sd, OPTIMIZER: osd}, rank_states, header, overwrite)
    report.destination = str(path)
    bar.update()
    logger.info("migrated %s -> %s (%d parameters named by %s)", legacy.source, path, len(slots), source)
    return report


# ---------------------------------------------------------------------- the --factory option


def load_factory(spec: str) -> Any:
    """The callable named by ``package.module:fn`` or ``path/to/file.py:fn``."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"--factory {spec!r}: expected 'package.module:function' or 'file.py:function'")
    if module_name.endswith(".py") or os.sep in module_name:
        file = Path(module_name)
        if not file.is_file():
            raise ValueError(f"--factory {spec!r}: {file} does not exist")
        mod_spec = importlib.util.spec_from_file_location(file.stem, file)
        if file.suffix != ".py" or mod_spec is None or mod_spec.loader is None:
            raise ValueError(
                f"--factory {spec!r}: {file} is not a Python file; expected path/to/file.py:function "
                "or package.module:function"
            )
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        # Like `python -m`, modules next to you import; but only for this import: a working
        # directory left on sys.path would shadow later imports (a stray torch.py, say).
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--factory {spec!r}: {module_name} has no callable '{fn_name}'")
    return fn


def build_from_factory(spec: str, meta: bool = True) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """Call the factory once (on the meta device unless ``meta=False``) and split what it returns.

    Only names, shapes, dtypes and param-group membership are read from the objects, so meta
    tensors suffice and a large model costs no memory.
    """
    fn = load_factory(spec)
    # Called exactly once: a factory may have side effects (open a run, allocate a GPU), so a
    # failure on the meta device is reported with the way out instead of retried.
    if meta:
        try:
            with torch.device("meta"):
                out = fn()
        except Exception as e:
            raise ValueError(
                f"--factory {spec!r} failed on the meta device ({type(e).__name__}: {e}); if it "
                "needs real tensors, pass --no-meta (Python: build_from_factory(spec, meta=False))"
            ) from e
    else:
        out = fn()
    if isinstance(out, nn.Module):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) >= 2 and isinstance(out[0], nn.Module):
        if out[1] is None or isinstance(out[1], torch.optim.Optimizer):
            return out[0], out[1]
    raise ValueError(
        f"--factory {spec!r} returned {type(out).__name__}; expected a torch.nn.Module or a tuple "
        "(model, optimizer)"
    )


def read_param_names(path: str | os.PathLike) -> list[str]:
    """Parameter names in optimizer order, one per line; blank lines and ``#`` comments skipped."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise ValueError(f"--param-names {path}: no names in the file")
    return names
