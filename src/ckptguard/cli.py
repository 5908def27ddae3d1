"""``ckptguard`` command line: one subcommand per tool, each a thin wrapper that prints."""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from ckptguard.demo import run_demo

    report = run_demo(
        nproc=args.nproc, total_steps=args.steps, stop_at=args.stop_at,
        num_workers=args.num_workers, device=args.device, workdir=args.workdir,
    )
    print(report.format())
    return 0 if report.exact else 1


# ------------------------------------------------------------------ checkpoint tools
# Exit codes: 0 = fine (equal, verified, written); 1 = the answer is "no" (diff found a
# difference, verify found damage); 2 = could not do it (not a checkpoint, refused, bad input).


def _tool(fn):
    """Run a tool command; report our errors (and bad input) as one line and exit code 2."""
    import functools
    import json

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from ckptguard.errors import CheckpointError

        try:
            return fn(args)
        except (CheckpointError, ValueError, ImportError, OSError) as e:
            print(f"ckptguard {args.command}: error: {e}", file=sys.stderr)
            if getattr(args, "json", False):
                print(json.dumps({"error": str(e), "error_type": type(e).__name__}))
            return 2

    return wrapper


def _print_json(obj: object) -> None:
    import json

    print(json.dumps(obj, indent=1, default=str))


@_tool
def _cmd_inspect(args: argparse.Namespace) -> int:
    from ckptguard.tools.inspect import inspect_path

    info = inspect_path(args.path, step=args.step, unsafe_pickle=args.unsafe_pickle)
    _print_json(info.to_dict()) if args.json else print(info.format())
    return 0


@_tool
def _cmd_diff(args: argparse.Namespace) -> int:
    from ckptguard.tools.diff import diff_checkpoints

    report = diff_checkpoints(
        args.a, args.b, atol=args.atol, rtol=args.rtol, ignore=args.ignore, verify=not args.no_verify,
        unsafe_pickle=args.unsafe_pickle,
    )
    _print_json(report.to_dict()) if args.json else print(report.format())
    return 0 if report.equal else 1


@_tool
def _cmd_verify(args: argparse.Namespace) -> int:
    from ckptguard.tools.verify import verify_path

    report = verify_path(args.path, step=args.step, unsafe_pickle=args.unsafe_pickle)
    _print_json(report.to_dict()) if args.json else print(report.format())
    return 0 if report.ok else 1


@_tool
def _cmd_migrate(args: argparse.Namespace) -> int:
    from ckptguard.tools.migrate import build_from_factory, migrate, read_param_names

    if args.factory is None and args.param_names is None:
        raise ValueError(
            "say how the old optimizer was built: --factory MODULE:FN (returns the model, or "
            "(model, optimizer)) and/or --param-names FILE (names in optimizer order)"
        )
    model = optimizer = None
    if args.factory is not None:
        model, optimizer = build_from_factory(args.factory, meta=not args.no_meta)
    report = migrate(
        args.old, args.new, model=model, optimizer=optimizer,
        param_names=read_param_names(args.param_names) if args.param_names else None,
        step=args.step, model_key=args.model_key, optimizer_key=args.optimizer_key,
        scheduler_key=args.scheduler_key, unsafe_pickle=args.unsafe_pickle,
        overwrite=args.overwrite, dry_run=args.dry_run,
    )
    _print_json(report.to_dict()) if args.json else print(report.format())
    return 0


@_tool
def _cmd_export(args: argparse.Namespace) -> int:
    from ckptguard.tools.export import export_model

    report = export_model(
        args.path, args.out, step=args.step, dtype=args.dtype, fmt=args.format,
        verify=not args.no_verify, overwrite=args.overwrite, unsafe_pickle=args.unsafe_pickle,
    )
    _print_json(report.to_dict()) if args.json else print(report.format_text())
    return 0


@_tool
def _cmd_audit(args: argparse.Namespace) -> int:
    from ckptguard.guard.audit import audit

    result = audit(args.root, rtol=args.rtol)
    if args.plot:
        result.plot(args.plot)  # before printing: a missing matplotlib is an error, exit 2
    _print_json(result.to_dict()) if args.json else print(result.format())
    if args.plot and not args.json:
        print(f"loss plot written to {args.plot}")
    return 0 if result.ok else 1


def _add_audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="for each resume in ROOT's run trace: the load checks' findings and the first divergence"
    )
    p.add_argument("root", help="the checkpoint root holding trace.jsonl (written by mgr.record)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for losses and LRs [0: exact]")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="draw loss (earlier vs resumed run) around each resume point (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_audit)


def _add_unsafe_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--unsafe-pickle", action="store_true",
        help="unpickle DCP .metadata and old torch.save files without the allowlist of safe types: "
             "they can run any code, so only for files you trust (docs/reliability.md, Security)",
    )


def _add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list steps, versions and every stored tensor, by component")
    p.add_argument("path", help="a checkpoint directory (step-NNNNNNNN) or a root of them")
    p.add_argument("--step", type=int, default=None, help="step to detail in a root [newest]")
    _add_unsafe_pickle(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor; exit 0 only if equal")
    p.add_argument("a", help="checkpoint directory or root (its newest step)")
    p.add_argument("b", help="checkpoint directory or root (its newest step)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance [0: exact]")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance [0: exact]")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="skip keys matching GLOB, e.g. 'rank*.rng.*' (repeatable)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of A and B")
    _add_unsafe_pickle(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("verify", help="re-check every file against the checksums saved with it")
    p.add_argument("path", help="a checkpoint directory, or a root (verifies every complete step)")
    p.add_argument("--step", type=int, default=None, help="only this step of a root")
    _add_unsafe_pickle(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("migrate", help="convert an old index-keyed checkpoint into a ckptguard one")
    p.add_argument("old", help="old checkpoint: a DCP directory or a torch.save file")
    p.add_argument("new", help="ckptguard root to write step-NNNNNNNN into")
    p.add_argument("--factory", metavar="MODULE:FN",
                   help="builds the model, or (model, optimizer), as the old trainer did")
    p.add_argument("--param-names", metavar="FILE", help="parameter names in optimizer order")
    p.add_argument("--step", type=int, default=None,
                   help="step to save as [found in the old checkpoint: the optimizer's per-parameter "
                        "step, the scheduler's last_epoch or a step key; needed when they disagree]")
    p.add_argument("--model-key", help="key of the model state dict in the old checkpoint")
    p.add_argument("--optimizer-key", help="key of the optimizer state dict (dotted if nested)")
    p.add_argument("--scheduler-key", help="key of the LR scheduler state dict")
    p.add_argument("--no-meta", action="store_true", help="build the factory's objects on CPU")
    _add_unsafe_pickle(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing step in NEW")
    p.add_argument("--dry-run", action="store_true", help="check and show the mapping; write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("export", help="consolidated model weights for inference (.pt or .safetensors)")
    p.add_argument("path", help="a checkpoint directory or a root (its newest step)")
    p.add_argument("out", help="output file; .safetensors writes safetensors, anything else torch.save")
    p.add_argument("--step", type=int, default=None, help="step of a root to export [newest]")
    p.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16, float16")
    p.add_argument("--format", choices=["pt", "safetensors"], default=None, help="[from OUT's suffix]")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    _add_unsafe_pickle(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptguard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="train, stop, resume in a new process, and compare with an uninterrupted run"
    )
    demo.add_argument("--nproc", type=int, default=1, help="ranks (torchrun, FSDP2 on gloo) [1]")
    demo.add_argument("--steps", type=int, default=60, help="total training steps [60]")
    demo.add_argument("--stop-at", type=int, default=23, help="step to save at and stop [23]")
    demo.add_argument("--num-workers", type=int, default=0, help="dataloader workers [0]")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="[cpu]")
    demo.add_argument("--workdir", default=None, help="keep the runs here instead of a temp dir")
    demo.set_defaults(func=_cmd_demo)
    _add_tool_parsers(sub)
    _add_audit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
