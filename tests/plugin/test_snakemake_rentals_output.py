"""What a Snakemake user sees of the rentals: what was rented at what $/h, how it booted, what it cost.

Real sandboxes from the emulator, Vast's rate limits on; the final cost line must equal the
emulator's own meter, and the run must not drown Snakemake's output in ours.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.checkout import checkout_env

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

#: Python's logging format, as distributed's handler writes it
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ")

_WORKFLOW = """
rule all:
    input: "out/a.txt", "out/b.txt", "big.txt"

rule work:
    output: "out/{s}.txt"
    resources: gpu=1
    shell: "nvidia-smi --query-gpu=name --format=csv,noheader > {output}"

rule big:
    output: "big.txt"
    resources: gpu=1, disk_mb=60000
    shell: "df -k . | tail -1 > {output}"
"""
REMOTE_JOBS = 3


def test_rentals_boot_progress_and_a_final_cost_equal_to_the_meter(market, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(_WORKFLOW)
    # It asserts no row is left right after the run; strict keeps destroyed rows listed a while.
    market.variants.set(destroy_linger_s=0)
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "4",
         "--vastaidask-api-url", market.url, "--vastaidask-api-key", market.api_key,
         "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "1", "--vastaidask-boot-timeout", "240",
         "--vastaidask-reliability", "0.95", "--vastaidask-order", "dlperf_usd-"],
        cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=420,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    assert market.instances() == [], "0 rentals remain"
    meter = market.meter()
    rentals = meter["instances"]
    assert len(rentals) == 2, "one instance for the default pool, one for the 60 GB rule"
    lines = run.stderr.splitlines()
    ours = [line for line in lines if line.startswith("vastaidask: ")]

    # what was rented: id, GPU, $/h; and its boot, one line per state, ending registered
    for rental in rentals:
        rid = rental["id"]
        assert f"vastaidask: rented instance {rid}: 1x RTX 3090, ${rental['dph']:.3f}/h" in run.stderr, ours
        mine = [line for line in ours if f"instance {rid} " in line or f"instance {rid}:" in line]
        assert any("registered" in line for line in mine), mine
        assert len(mine) == len(set(mine)) <= 7, f"one line per phase change, not per poll: {mine}"

    # the bill: the cluster's meter after every destroy, equal to the emulator's
    last = ours[-1]
    assert "2 instances rented" in last and "all destroyed" in last, last
    cost = float(re.search(r"cost \$(\d+\.\d+)$", last).group(1))
    assert abs(cost - meter["total_usd"]) <= 0.005 * meter["total_usd"], (cost, meter["total_usd"])

    # quiet by default: no distributed INFO lines, nothing on stdout, at most 10 lines of ours per job
    assert not [line for line in lines if LOG_LINE.match(line)], [line for line in lines if LOG_LINE.match(line)]
    assert run.stdout.strip() == "", run.stdout
    assert len(ours) <= 10 * REMOTE_JOBS, ours

    # the options and the rule's disk reached the offer search and the rental
    bodies = [(r["endpoint"], r["body"]) for r in market.requests if "body" in r]
    searches = [b for e, b in bodies if e == "search"]
    assert searches and all(float(b["reliability"]["gte"]) == 0.95 for b in searches), searches
    # dlperf_per_dphtotal: the field the SDK sends for dlperf_usd
    assert all(b["order"] == [["dlperf_per_dphtotal", "desc"]] for b in searches), [b["order"] for b in searches]
    assert any(float(b["disk_space"]["gte"]) == 60 for b in searches), [b["disk_space"] for b in searches]
    disks = sorted(float(b["disk"]) for e, b in bodies if e == "create")
    assert disks == [40.0, 60.0], disks
