"""``dask-vastai emulator``: serve a local Vast marketplace until Ctrl-C or SIGTERM.

Also runs as ``python -m dask_vastai.emulator.main``. It prints the URL and the key it
accepts, with a line to paste for the official CLI, and on Ctrl-C/SIGTERM stops every
sandbox it started and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from . import Emulator


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
    return p


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Emulator(port=args.port, api_key=args.api_key, boot_delay_s=args.boot_delay,
                        catalog=args.catalog, rate_limits=not args.no_rate_limits,
                        runtime=args.runtime, state_dir=args.state_dir) as emu:
        print(f"Vast emulator serving {emu.url} (runtime: {emu.runtime_name}, {len(emu.offers)} offers)")
        print(f"API key: {emu.api_key}")
        print(f"try: export VAST_API_KEY={emu.api_key}; vastai --url {emu.url} search offers")
        print("Ctrl-C stops it and every instance it started.", flush=True)
        await stop.wait()
        print("stopping: destroying sandboxes...", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"dask-vastai emulator: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
