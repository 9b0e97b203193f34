"""``dask-vastai ls`` tells what each rental costs: $/h, uptime and dollars so far, and the total."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

from dask_vastai.emulator import Emulator, ManualClock
from dask_vastai.labels import rental_label
from dask_vastai.vast import CreateRequest, VastAPI


def _rent(emu: Emulator, gpus: list[str], cluster: str) -> list[int]:
    async def main() -> list[int]:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            ids = []
            for k, gpu in enumerate(gpus):
                [offer] = await api.search_offers(f"gpu_name={gpu}", limit=1)
                label = rental_label(cluster, f"{cluster}-{k}")
                ids.append((await api.create_instance(offer.id, CreateRequest(image="img", disk_gb=10, label=label)))
                           .instance_id)
            return ids

    return asyncio.run(main())


def _dollars(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\$(\d+\.\d+)(?!/h)\b", text)]


def test_ls_shows_rate_uptime_and_cost_per_rental_and_in_total() -> None:
    # Rentals made two hours ago (the emulator's clock, which dates them, runs two hours behind).
    clock = ManualClock(start=time.time() - 7200)
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0, clock=clock) as emu:
        ids = _rent(emu, ["RTX_3090", "RTX_4090"], "alpha")
        clock.advance(7200)
        proc = subprocess.run(
            [sys.executable, "-m", "dask_vastai.cli", "ls", "--api-url", emu.url, "--api-key", emu.api_key],
            capture_output=True, text=True, timeout=60,
        )
        meter = {row["id"]: row for row in emu.meter()["instances"]}
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for rid in ids:
        [row] = [line for line in lines if str(rid) in line]
        dph = meter[rid]["dph"]
        assert f"${dph:.3f}/h" in row, row
        assert "2h00m" in row or "2h01m" in row, row
        [cost] = _dollars(row)
        assert abs(cost - dph * 2) / (dph * 2) < 0.005, (row, dph * 2)
    [total_row] = [line for line in lines if "total" in line]
    total_rate = sum(m["dph"] for m in meter.values())
    assert f"${total_rate:.3f}/h" in total_row, total_row
    [total_cost] = _dollars(total_row)
    assert abs(total_cost - total_rate * 2) / (total_rate * 2) < 0.005, total_row
    assert "so far" in lines[-1] and f"${total_rate:.3f}/h" in lines[-1], lines[-1]
