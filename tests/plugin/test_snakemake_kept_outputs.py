"""temp() outputs stay on the worker that made them: the job that needs one gets it from that
worker, never through this machine, which only keeps a stand-in that Snakemake deletes.

The producer and the consumer are forced onto different workers (the producer needs the GPU
only worker A has, the consumer two CPUs only worker B has), so the intermediate must cross
from worker to worker.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.checkout import checkout_env
from tests.helpers.dask_workers import scheduler_with, start_worker
from tests.helpers.peak_rss import run_measured

pytestmark = pytest.mark.slow

MID_BYTES = 48_000_000

SNAKEFILE = f"""
rule all:
    input: "final.txt", "mid.sha"

rule make:
    output: mid=temp("mid.bin"), sha="mid.sha"
    resources: gpu=1
    shell: "head -c {MID_BYTES} /dev/urandom > {{output.mid}}; sha256sum {{output.mid}} | cut -d' ' -f1 > {{output.sha}}"

rule use:
    input: "mid.bin"
    output: "final.txt"
    threads: 2
    shell: "sha256sum {{input}} | cut -d' ' -f1 > {{output}}; wc -c < {{input}} >> {{output}}"
"""


_KINDS = {"a": "GPU=1 CPU=1 MEMORY=4e9", "b": "CPU=2 MEMORY=4e9"}


@pytest.fixture(scope="module")
def two_kinds_of_worker() -> Iterator[str]:
    """A scheduler with worker a (the GPU, one CPU) and worker b (two CPUs, no GPU)."""
    with scheduler_with(_KINDS) as (address, _procs):
        yield address


def _transfers(workdir: Path) -> dict[str, dict]:
    lines = [json.loads(x) for x in (workdir / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    roles = {}
    for line in lines:  # the producer keeps the intermediate, the consumer fetched it
        role = "make" if line["kept"] else "use" if any(n == MID_BYTES for _, n in line["fetched"]) else "other"
        roles[role] = line
    return roles


def test_temp_output_goes_worker_to_worker(two_kinds_of_worker: str, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2",
         "--vastaidask-scheduler-address", two_kinds_of_worker,
         "--vastaidask-worker-cache-dir", str(tmp_path / "cache"), "--vastaidask-chunk-mb", "16"],
        cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    sha = (tmp_path / "mid.sha").read_text().strip()
    assert (tmp_path / "final.txt").read_text().split() == [sha, str(MID_BYTES)], "the consumer read the real data"
    assert not (tmp_path / "mid.bin").exists(), "Snakemake deleted the temp() stand-in once its consumer was done"
    jobs = _transfers(tmp_path)
    assert jobs["make"]["worker_name"] == "a" and jobs["use"]["worker_name"] == "b"
    assert jobs["make"]["kept"] == [["mid.bin", sha, MID_BYTES]]
    assert jobs["make"]["returned_bytes"] < 100_000, "the intermediate did not come back to this machine"
    assert [sha, MID_BYTES] in jobs["use"]["fetched"] and jobs["use"]["chunks"] == 3, "fetched from worker a"
    # This machine's own counters: what it sent and received, and what went worker to worker.
    [(sent, received, between)] = re.findall(
        r"data: ([\d.]+) MB staged from this machine, ([\d.]+) MB of results received; "
        r"([\d.]+) MB of temp\(\) outputs went worker to worker", run.stderr)
    assert float(sent) < 1 and float(received) < 1, run.stderr[-3000:]
    assert float(between) == pytest.approx(MID_BYTES / 1e6, abs=0.1)


def test_a_stale_stand_in_is_refused_with_its_fix(two_kinds_of_worker: str, tmp_path: Path) -> None:
    """An earlier run's stand-in (its worker gone, say) must not be staged as if it were data."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "mid.sha").write_text("x\n")
    (tmp_path / "mid.bin").write_bytes(b"vastaidask: this temp() output stayed on a worker (its data is not on "
                                       b"this machine)\n{}\n")
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2", "final.txt",
         "--vastaidask-scheduler-address", two_kinds_of_worker,
         "--vastaidask-worker-cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode != 0
    assert "rm 'mid.bin'" in run.stderr and "earlier run" in run.stderr, run.stderr[-3000:]


def _snakemake(workdir: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2", *extra,
            "--vastaidask-scheduler-address", address, "--vastaidask-worker-cache-dir", str(workdir / "cache")]


def test_a_temp_output_asked_for_as_a_target_comes_back(two_kinds_of_worker: str, tmp_path: Path) -> None:
    """Snakemake keeps a temp() file the user names as a target: its data must be on the disk."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    run = subprocess.run(_snakemake(tmp_path, two_kinds_of_worker, "mid.bin"), cwd=tmp_path, env=checkout_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    data = (tmp_path / "mid.bin").read_bytes()
    assert len(data) == MID_BYTES and hashlib.sha256(data).hexdigest() == (tmp_path / "mid.sha").read_text().strip()


GATED = SNAKEFILE.replace('    input: "mid.bin"\n', '    input: "mid.bin", "gate.txt"\n').replace(
    "< {input}", "< {input[0]}").replace("sha256sum {input}", "sha256sum {input[0]}") + """
rule gate:
    input: "mid.sha"
    output: "gate.txt"
    threads: 2
    shell: "touch {STARTED}; while [ ! -e {STOP} ]; do sleep 0.2; done; touch {output}"
"""


def test_a_temp_output_whose_worker_is_gone_is_made_again(tmp_path: Path) -> None:
    """Worker a, holding the intermediate, dies before its consumer starts: the consumer fails
    saying so, the stand-in is gone, and the next run makes the intermediate again."""
    stop, started = tmp_path / "stop", tmp_path / "gate-started"
    (tmp_path / "Snakefile").write_text(GATED.replace("{STOP}", str(stop)).replace("{STARTED}", str(started)))
    with scheduler_with(_KINDS) as (address, procs):
        proc = subprocess.Popen(_snakemake(tmp_path, address), cwd=tmp_path, env=checkout_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while not started.exists() and time.monotonic() < deadline:  # its inputs are staged
                time.sleep(0.2)
            procs["a"].kill()
            procs["a"].wait(timeout=30)
            stop.touch()
            output, _ = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode != 0
        assert "stayed on worker" in output and "run snakemake again" in output, output[-4000:]
        assert not (tmp_path / "mid.bin").exists(), "the stand-in of lost data is deleted"
        procs["a"] = start_worker(address, "a", _KINDS["a"])
        again = subprocess.run(_snakemake(tmp_path, address), cwd=tmp_path, env=checkout_env(),
                               capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-5000:]
    sha = (tmp_path / "mid.sha").read_text().strip()
    assert (tmp_path / "final.txt").read_text().split() == [sha, str(MID_BYTES)]


#: The consumer waits for a gate job on its own pool that outlasts the producer's instance,
#: which goes once idle (``--vastaidask-idle-timeout 1``) with the intermediate on it.
TWO_POOLS = GATED.replace('    threads: 2\n', '    resources: gpu=1, gpu_model="RTX_4090"\n').replace(
    "touch {STARTED}; while [ ! -e {STOP} ]; do sleep 0.2; done", "sleep 8")


@pytest.mark.sandbox
@pytest.mark.parametrize("network", ["direct", "tunnel"])
def test_temp_output_between_rented_instances(market, tmp_path: Path, network: str) -> None:
    """Producer on an RTX 3090 instance, consumer on an RTX 4090 one; the producer's instance is
    released (idle) before the consumer runs, so the intermediate must move off it to the
    consumer's worker as it retires (directly in direct mode). This machine's counters say
    the intermediate never crossed it; so do the client process's TCP sockets (``ss``), counted
    without the plugin: in direct mode far fewer bytes than the intermediate, while in tunnel
    mode, where worker-to-worker bytes relay through this machine's SSH tunnels, at least it."""
    market.variants.set(destroy_linger_s=0)
    (tmp_path / "Snakefile").write_text(TWO_POOLS)
    args = [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2",
            "--vastaidask-api-url", market.url, "--vastaidask-api-key", market.api_key,
            "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "2", "--vastaidask-boot-timeout", "240",
            "--vastaidask-chunk-mb", "16", "--vastaidask-idle-timeout", "1"]
    run, usage = run_measured(args, tmp_path, {**checkout_env(), "DASK_VASTAI__NETWORK": network}, timeout=480)
    assert run.returncode == 0, run.stderr[-5000:]
    sha = (tmp_path / "mid.sha").read_text().strip()
    assert (tmp_path / "final.txt").read_text().split() == [sha, str(MID_BYTES)]
    # The producer's instance went idle at once: kept while it was the only worker (it holds
    # the intermediate), released once the consumer's registered, handing the data over first.
    producer = re.search(r"instance (\d+) registered \(workers smk-\w+-0\)", run.stderr)
    assert producer, run.stderr[-3000:]
    destroyed = run.stderr.find(f"instance {producer[1]} destroyed")
    assert 0 < destroyed < run.stderr.find("Finished jobid: 1 "), "released before the consumer was done"
    jobs = _transfers(tmp_path)
    assert jobs["make"]["worker_name"] != jobs["use"]["worker_name"], "two instances"
    assert [sha, MID_BYTES] in jobs["use"]["fetched"] and jobs["use"]["chunks"] == 3
    [(sent, received, between)] = re.findall(
        r"data: ([\d.]+) MB staged from this machine, ([\d.]+) MB of results received; "
        r"([\d.]+) MB of temp\(\) outputs went worker to worker", run.stderr)
    assert float(sent) < 1 and float(received) < 1 and float(between) == pytest.approx(MID_BYTES / 1e6, abs=0.1)
    sockets = f"the client's sockets sent {usage.net_sent / 1e6:.1f} MB, received {usage.net_received / 1e6:.1f} MB"
    print(network, sockets)
    if network == "direct":
        assert usage.net_sent < MID_BYTES / 2 and usage.net_received < MID_BYTES / 2, sockets
    else:
        assert usage.net_sent >= MID_BYTES and usage.net_received >= MID_BYTES, sockets
    assert market.instances() == []
