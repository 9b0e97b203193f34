"""How long does ``VastAICluster.close()`` take when Vast answers 503 from just before it?

The scenario of ``tests/core/test_close_through_outage.py``: a cluster of one instance (real
sandbox, strict profile, Vast's rate limits) booted, then Vast answers every call 503 for
``--outage`` seconds from just before ``close()``. Prints the close's seconds, whether it
said what may still bill, and the rentals still running once Vast is back (before any
watchdog could act), for

* ``--settings test``: that test's ``api.outage-timeout: 4`` and ``api.backoff-max: 2``;
* ``--settings defaults``: the shipped ``vastai.yaml``.

    python -m benchmarks.close_outage --settings test --outage 600
    python -m benchmarks.close_outage --settings defaults --outage 20

Uses only the public API, so the same file measures an older checkout
(``PYTHONPATH=<checkout> python -m benchmarks.close_outage ...``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import dask.config

SETTINGS = {
    "test": {"vastai.api.outage-timeout": 4, "vastai.api.backoff-max": 2},
    "defaults": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="test")
    parser.add_argument("--outage", type=float, default=600.0, help="seconds Vast answers 503 from before close")
    args = parser.parse_args()

    from dask_vastai import VastAICluster
    from dask_vastai.emulator import Emulator

    errors: list[str] = []

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger().addHandler(Errors())
    with tempfile.TemporaryDirectory() as tmp, Emulator(
        runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=Path(tmp) / "emu", profile="strict",
    ) as emu, dask.config.set(SETTINGS[args.settings]):
        cluster = VastAICluster(gpu="RTX_3090", n=1, api_url=emu.url, api_key=emu.api_key, name="bench",
                                boot_timeout=240, orphan_timeout=600, quiet=True)
        cluster.wait_for_workers(1, timeout=240)
        emu.faults.outage(args.outage)
        started = time.monotonic()
        cluster.close(timeout=900)
        took = time.monotonic() - started
        emu.faults.outage(0)
        running = [r["id"] for r in emu.instances() if r["actual_status"] == "running"]
        said = "said what may bill" if any("may still bill" in e for e in errors) else "said nothing"
        print(f"settings={args.settings} outage={args.outage:.0f}s: close took {took:.1f} s, {said}, "
              f"{len(running)} rental(s) running once Vast is back {running}")


if __name__ == "__main__":
    main()
