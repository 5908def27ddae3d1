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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
