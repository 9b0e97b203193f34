"""``dask-vastai emulator``: serve a local Vast marketplace until Ctrl-C or SIGTERM.

Also runs as ``python -m dask_vastai.emulator.main``. It prints the URL and the key it
accepts, with the two ``export`` lines that point dask-vastai at it, and on Ctrl-C/SIGTERM
stops every sandbox it started and exits 0.

Where Vast's behaviour is unknown it plays the variants asked for: ``--profile strict``
(the defensible ones at once) and ``--variant NAME[=VALUE]`` (repeatable, over the
profile); ``--list-variants`` prints them all with their values.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
from pathlib import Path

from . import Emulator
from .variants import PROFILES, Variants, describe_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dask-vastai emulator",
                                description="Serve a local Vast.ai marketplace on 127.0.0.1.")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--api-key", default=None, help="the API key it accepts (default: a random one, printed)")
    p.add_argument("--boot-delay", type=float, default=2.0, metavar="S",
                   help="seconds a rental spends loading before it runs (default 2)")
    p.add_argument("--catalog", type=Path, default=None, metavar="FILE",
                   help="JSON list of offers (partial records are completed); default: the shipped catalog")
    p.add_argument("--no-rate-limits", action="store_true", help="answer every call (no 429 for fast callers)")
    p.add_argument("--runtime", choices=("auto", "sandbox", "record"), default="auto",
                   help="what a rental runs: a namespace sandbox, records only, or the best available (default)")
    p.add_argument("--state-dir", type=Path, default=None, help="where sandboxes keep logs (default: a temp dir)")
    p.add_argument("--profile", choices=tuple(PROFILES), default=None,
                   help="a set of variants: strict turns on every defensible one (default: none)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[=VALUE]", type=_variant,
                   help="play this variant of Vast's unknown behaviour (repeatable; see --list-variants)")
    p.add_argument("--list-variants", action="store_true", help="print the variants and their values, then exit")
    return p


def _variant(text: str) -> tuple[str, object]:
    try:
        return Variants.parse_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Emulator(port=args.port, api_key=args.api_key, boot_delay_s=args.boot_delay,
                        catalog=args.catalog, rate_limits=not args.no_rate_limits,
                        runtime=args.runtime, state_dir=args.state_dir,
                        variants=dict(args.variant), profile=args.profile) as emu:
        print(f"Vast emulator serving {emu.url} (runtime: {emu.runtime_name}, {len(emu.offers)} offers)")
        print(f"API key: {emu.api_key}")
        changed = emu.variants.changed()
        if changed:
            print(f"variants ({emu.variants.profile} profile): "
                  + ", ".join(f"{k}={v}" for k, v in changed.items()))
        print("Point dask-vastai at it (VastAICluster, dask-vastai offers/ls, snakemake --executor "
              "vastaidask) with, in your shell:")
        print(export_lines(emu.url, emu.api_key))
        print("Ctrl-C stops it and every instance it started.", flush=True)
        await stop.wait()
        print("stopping: destroying sandboxes...", flush=True)


def export_lines(url: str, api_key: str) -> str:
    """The two lines that point dask-vastai (the library, the CLI, the Snakemake plugin) here."""
    return f"export VAST_API_KEY={shlex.quote(api_key)}\nexport DASK_VASTAI__API_URL={shlex.quote(url)}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_variants:
        print(describe_table())
        return 0
    try:
        asyncio.run(_serve(args))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"dask-vastai emulator: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
