"""A laptop that sleeps finds its cluster again on wake.

The client (its own process: the scheduler and the cluster live there) is stopped with
SIGSTOP for 90 s, and its rentals' SSH connections are cut meanwhile (a real sleep kills
TCP). On SIGCONT the run completes on the same rentals: links made again as new
incarnations, 0 double rentals, 0 left rented after close. Stopped longer than a short
``orphan_timeout``, the rentals' watchdogs destroy them; on SIGCONT the cluster says so and
rents again to its size, and the run completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

CLIENT = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    from distributed import Client
    from dask_vastai import VastAICluster

    url, key, name, flag, orphan = sys.argv[1:6]

    def gpu_task(x):
        return x * 2

    with VastAICluster(gpu="RTX_3090", n=2, api_url=url, api_key=key, name=name, quiet=True,
                       boot_timeout=240, orphan_timeout=float(orphan)) as cluster, Client(cluster) as client:
        first = client.gather(client.map(gpu_task, range(20), resources={"GPU": 1}, key=[f"a-{i}" for i in range(20)]))
        print("READY", flush=True)
        while not Path(flag).exists():
            time.sleep(0.2)
        futures = client.map(gpu_task, range(20), resources={"GPU": 1}, key=[f"b-{i}" for i in range(20)])
        second = client.gather(futures, asynchronous=False)
        log = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        print("RESULT " + json.dumps({"ok": first == second == [x * 2 for x in range(20)],
                                      "log": log, "losses": cluster.losses["default"].lost}), flush=True)
''')


@pytest.mark.parametrize(("stopped_s", "orphan_timeout_s"), [(90, 600), (45, 20)], ids=["short", "past-orphan"])
def test_a_client_stopped_with_its_links_cut_finds_its_cluster(market: Emulator, tmp_path: Path, stopped_s: int,
                                                               orphan_timeout_s: int) -> None:
    emu = market
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    flag = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, str(script), emu.url, emu.api_key, "sleepy", str(flag), str(orphan_timeout_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY"):
                break
        else:
            pytest.fail(f"the client exited before its first results (rc={proc.wait()})")
        rentals = [r["id"] for r in emu.instances() if r["actual_status"] == "running"]
        assert len(rentals) == 2, emu.instances()
        proc.send_signal(signal.SIGSTOP)
        for rental in rentals:
            emu.faults.drop_ssh(rental)  # a sleeping machine's TCP connections die
        time.sleep(stopped_s)
        flag.touch()
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
    result = next((json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    assert result is not None, out[-4000:]
    assert result["ok"], result["log"]
    meter = emu.meter()["instances"]
    if stopped_s < orphan_timeout_s:
        assert result["losses"] == 0, result["log"]
        assert "did not run for" in result["log"] and "reconnecting" in result["log"], result["log"]
        assert sorted(r["id"] for r in meter) == sorted(rentals)  # the same rentals: no double rental
    else:
        # the watchdogs destroyed both; the cluster said so and rented 2 more, no more
        assert result["losses"] == 2, result["log"]
        assert "longer than orphan_timeout" in result["log"], result["log"]
        assert len(meter) == 4 and set(rentals) <= {r["id"] for r in meter}, meter
    wait_until(lambda: all(r["destroyed"] for r in emu.meter()["instances"]), 30, "every rental destroyed")
