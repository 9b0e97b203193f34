"""A laptop that sleeps finds its cluster again on wake.

The client (its own process: the scheduler and the cluster live there) is stopped with
SIGSTOP for 90 s, and its rentals' SSH connections are cut meanwhile (a real sleep kills
TCP). On SIGCONT the run completes on the same rentals: links made again as new
incarnations, 0 double rentals, 0 left rented after close.
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

    url, key, name, flag = sys.argv[1:5]

    def gpu_task(x):
        return x * 2

    with VastAICluster(gpu="RTX_3090", n=2, api_url=url, api_key=key, name=name, quiet=True,
                       boot_timeout=240) as cluster, Client(cluster) as client:
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


def test_a_client_stopped_90s_with_its_links_cut_finds_its_rentals(market: Emulator, tmp_path: Path) -> None:
    emu = market
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    flag = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, str(script), emu.url, emu.api_key, "sleepy", str(flag)],
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
        time.sleep(90)
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
    assert result["losses"] == 0, result["log"]
    assert "did not run for" in result["log"] and "reconnecting" in result["log"], result["log"]
    meter = emu.meter()["instances"]
    assert sorted(r["id"] for r in meter) == sorted(rentals)  # the same rentals: no double rental
    wait_until(lambda: all(r["destroyed"] for r in emu.meter()["instances"]), 30, "every rental destroyed")
