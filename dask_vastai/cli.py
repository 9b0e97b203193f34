"""``dask-vastai``: offers | gpus | ls | cleanup | emulator | demo.

Each subcommand imports what it needs when it runs, so ``dask-vastai --help`` stays fast
and the emulator's dependencies never load for ``ls``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence


def _add_api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=None,
        help="Vast API origin (default: config vastai.api-url, https://console.vast.ai)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="Vast API key; prefer VAST_API_KEY: a command line is visible to every user of the "
        "machine (ps) and stays in shell history (default: VAST_API_KEY, then the vastai CLI's key file)",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="dask-vastai",
        description="Dask clusters on rented Vast.ai GPUs, and a local Vast marketplace to try them on.",
    )
    parser.add_argument("--version", action="version", version=f"dask-vastai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    offers = sub.add_parser(
        "offers", help="show what would be rented, and at what price",
        description="The offers a cluster with these options would rent now. Unset options come from "
        "the dask config (vastai: in ~/.config/dask/*.yaml, DASK_VASTAI__* variables), as for the cluster.",
    )
    _add_api_options(offers)
    offers.add_argument("--gpu", action="append", default=None, help="GPU model, e.g. RTX_4090 (repeatable)")
    offers.add_argument("--num-gpus", type=int, default=None, help="GPUs per instance")
    offers.add_argument("--max-price", type=float, default=None, help="$/h per instance, at most")
    offers.add_argument("--region", default=None, help="EU, NA, AS, ... or country codes DE,PL")
    offers.add_argument("--disk", type=float, default=None, help="GB of disk per instance")
    offers.add_argument("--reliability", type=float, default=None, help="host reliability, at least (0 to 1)")
    offers.add_argument("--order", default=None, help="the order offers are taken in (default dph_total)")
    offers.add_argument("--no-datacenter", action="store_true", help="also hobbyist (non-datacenter) hosts")
    offers.add_argument("--interruptible", action="store_true", help="interruptible (bid) offers")
    offers.add_argument("--query", default=None, help="extra `vastai search offers` filters")
    offers.add_argument("--limit", type=int, default=10)
    offers.add_argument("--json", action="store_true", help="the query and the offers as JSON")

    sub.add_parser("gpus", help="list the GPU model names Vast uses (what --gpu and gpu= accept)")

    ls = sub.add_parser("ls", help="list the rentals dask-vastai made (labels dask-vastai:...)")
    _add_api_options(ls)
    ls.add_argument("--cluster", default=None, help="only this cluster's rentals")

    cleanup = sub.add_parser("cleanup", help="destroy rentals dask-vastai left behind")
    _add_api_options(cleanup)
    cleanup.add_argument("--cluster", default=None, help="only this cluster's rentals")
    cleanup.add_argument("--yes", action="store_true", help="destroy without asking")

    sub.add_parser("emulator", help="run a local Vast marketplace (see `dask-vastai emulator --help`)", add_help=False)

    demo = sub.add_parser("demo", help="rent GPU workers on an embedded emulator and run tasks on them")
    demo.add_argument("-n", "--instances", type=int, default=2, help="instances to rent (default 2)")
    demo.add_argument("--tasks", type=int, default=20, help="GPU tasks to run (default 20)")
    demo.add_argument("--gpu", default="RTX_3090")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:
        # The emulator parses its own options (it also runs as `python -m dask_vastai.emulator.main`).
        from .emulator.main import main as emulator_main

        return emulator_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "api_key", None):
        print(
            "dask-vastai: warning: --api-key puts your Vast API key where every user of this machine can "
            "read it (ps, /proc/<pid>/cmdline) and in your shell history; export VAST_API_KEY instead "
            "(or run `vastai set api-key` once)",
            file=sys.stderr,
        )
    if args.command == "gpus":
        from .offers import KNOWN_GPU_NAMES

        print("\n".join(name.replace(" ", "_") for name in KNOWN_GPU_NAMES))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(instances=args.instances, tasks=args.tasks, gpu=args.gpu)
    from . import commands

    try:
        return asyncio.run(commands.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
