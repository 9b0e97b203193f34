"""A Snakemake run with one instance preempted mid-run completes with the pool back at its size.

``snakemake --executor vastaidask --vastaidask-interruptible yes`` on the user's marketplace
(real sandboxes, rate limits on, the strict profile), 2 instances running short GPU jobs;
while jobs run, one rental is outbid (Vast shows it ``stopped``). Every output must be
right (the jobs lost with it rerun), the lost rental destroyed and a replacement rented and
registered (the run's own output counts the preemption and the replacement), and nothing
left rented after the run.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.checkout import checkout_env
from tests.helpers.waiting import wait_until
from tests.plugin.test_snakemake_emulator import _args

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

N_JOBS = 8
#: long enough that the one instance left is still busy when the replacement registers
JOB_S = 8

_WORKFLOW = f"""
rule all:
    input: expand("out/{{i}}.txt", i=range({N_JOBS}))

rule square:
    output: "out/{{i}}.txt"
    resources: gpu=1
    shell: "sleep {JOB_S}; echo $(( {{wildcards.i}} * {{wildcards.i}} )) > {{output}}"
"""


def _running(market) -> list[dict]:
    return [r for r in market.instances() if r["actual_status"] == "running"]


def test_an_instance_preempted_mid_run_is_replaced_and_the_run_completes(market, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(_WORKFLOW)
    proc = subprocess.Popen(_args(market, "--vastaidask-interruptible", "yes", "--vastaidask-keep-instances"),
                            cwd=tmp_path, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # both instances rented and running jobs: the first outputs are written
        wait_until(lambda: len(_running(market)) == 2 and len(list((tmp_path / "out").glob("*.txt"))) >= 1, 300,
                   "2 running rentals and a first output")
        first = [r["id"] for r in _running(market)]
        victim = first[0]
        market.faults.preempt(victim)
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-5000:]
    outputs = {i: (tmp_path / "out" / f"{i}.txt").read_text().strip() for i in range(N_JOBS)}
    assert outputs == {i: str(i * i) for i in range(N_JOBS)}, outputs

    rentals = market.meter()["instances"]
    assert len(rentals) == 3, f"2 rentals and 1 replacement, not {[r['id'] for r in rentals]}"
    assert [r["id"] for r in rentals if not r["destroyed"]] == [], "0 rentals remain"
    lost = next(r for r in rentals if r["id"] == victim)
    assert lost["destroyed"], lost
    replacement = next(r for r in rentals if r["id"] not in first)
    ours = [line for line in stderr.splitlines() if line.startswith("vastaidask: ")]
    # the replacement was rented and registered: the pool was back at its size of 2
    assert any(f"instance {replacement['id']} registered" in line for line in ours), ours
    assert any(f"instance {victim} lost" in line and "outbid" in line for line in ours), ours
    last = ours[-1]
    assert "3 instances rented" in last and "all destroyed" in last, last
    assert re.search(r"1 preempted, 1 replaced", last), last
    print(f"\n{last}")
