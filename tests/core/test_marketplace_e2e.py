"""A cluster against every plausible Vast, end to end: real sandboxes, rate limits on, strict profile.

For every variant of Vast's undocumented behaviour (``docs/emulator-variants.md``), a cluster
of 4 comes up, runs GPU tasks and closes, and the emulator's meter shows nothing billing and
no instance billed longer than the cluster lived. The variants are grouped into a few cases
(each on top of the strict profile) so that every value is met once without a cluster per
value. Then what a user meets beyond that: a client killed with SIGKILL (the watchdog, or
``dask-vastai cleanup`` where the template gave the instance no key, after a loud warning),
a host whose direct SSH port is blocked (the proxy, within the direct timeout), a box that
shows more CPUs and memory than it rents (the offer's are advertised), a box whose driver is
older than the packages' CUDA, and two clusters with a ``dask-vastai ls`` loop on one account.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import dask.config
import pytest

from dask_vastai.emulator import Emulator

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

#: the suite's silent-direct-port timeout (tests/conftest.py)
DIRECT_TIMEOUT_S = float(dask.config.get("vastai.ssh-direct-timeout"))

#: Each case turns on variants over the strict profile; together they meet every value.
#: ``instances:7000001``: the first rental stalls (deterministic), another machine replaces it.
CASES: dict[str, dict[str, Any]] = {
    "bulk-results,created-stall": dict(
        bulk_create="results", bulk_destroy="results", missing_route="json", trailing_slash="lenient",
        ssh_env="container", cpu_view="host", destroy_linger_status="destroying", onstart_max_chars=None,
        seed=7, boot_stall="created", boot_stall_hosts="instances:7000001"),
    "bulk-ids-refused,scheduling-stall": dict(
        bulk_create="ids", bulk_create_refused="0.5", trailing_slash="redirect_308", ssh_env="image",
        cpu_view="honest", retry_after_s=2, boot_stall="scheduling", boot_stall_hosts="instances:7000001",
        boot_stall_s=math.inf),
    "bulk-id-list,survivors,frozen-stall": dict(
        bulk_create="id_list", bulk_destroy_survivors="all", missing_route="text", trailing_slash="strict",
        boot_stall="frozen", boot_stall_hosts="instances:7000001"),
    "bulk-absent,no-instance-key": dict(
        bulk_create="absent", bulk_destroy="absent", missing_route="html", trailing_slash="off_origin",
        container_api_key="absent", direct_blocked_ports="all"),
    "bare-partial-bulk,interruptible": dict(
        bulk_create="success_only", bulk_create_refused="0.5", outbid_intended="stopped", outbid_msg="outbid"),
    "direct-refused,proxy-dead": dict(
        direct_blocked="all", direct_blocked_mode="refuse", proxy_broken="all", proxy_broken_mode="dead"),
    "direct-hangs,proxy-refuses-forwards": dict(
        direct_blocked="all", direct_blocked_mode="hang", proxy_broken="all", proxy_broken_mode="no_remote_forward"),
}
#: graces short enough for a test, long enough for a loaded 2-core machine
TEST_CONFIG = {
    "vastai.boot-state-grace": {"created": 2, "scheduling": 2, "frozen": 0},
    "vastai.api.ambiguous-create-grace": 2,
}


@pytest.fixture
def strict_market(sandbox: None, tmp_path: Any) -> Iterator[Emulator]:
    with Emulator(runtime="sandbox", boot_delay_s=0.5, rate_limits=True, state_dir=tmp_path / "emu",
                  profile="strict") as emu:
        yield emu


def billed_s(record: dict[str, Any]) -> float:
    return float(record["seconds"]) + float(record["storage_seconds"])


def assert_nothing_billing(emu: Emulator, lived_s: float, slack_s: float = 1.0) -> list[dict[str, Any]]:
    meter = emu.meter()["instances"]
    assert [r["id"] for r in meter if not r["destroyed"]] == [], "every rental destroyed"
    assert [r for r in emu.instances() if r["cur_state"] != "unloaded"] == [], "nothing listed but teardowns"
    too_long = [(r["id"], billed_s(r)) for r in meter if billed_s(r) > lived_s + slack_s]
    assert too_long == [], f"billed longer than the cluster lived ({lived_s:.1f} s): {too_long}"
    return meter


@pytest.mark.parametrize("case", list(CASES))
def test_a_cluster_of_four_survives_every_variant(strict_market: Emulator, case: str) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    def square(x: int) -> int:  # defined here: pickled by value (the tests package is not shipped)
        return x * x

    emu = strict_market
    variants = CASES[case]
    emu.variants.set(variants)
    interruptible = "interruptible" in case
    started = time.monotonic()
    with dask.config.set(TEST_CONFIG), VastAICluster(
        gpu="RTX_3090", n=4, api_url=emu.url, api_key=emu.api_key, name="v", boot_timeout=240, quiet=True,
        interruptible=interruptible,
    ) as cluster, Client(cluster) as client:
        up_s = time.monotonic() - started
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 4 and all(w["resources"]["GPU"] == 1 for w in workers)
        assert client.gather(client.map(square, range(24), resources={"GPU": 1})) == [x * x for x in range(24)]
        rows = {r["label"].rsplit(":", 1)[1]: r for r in emu.instances() if r["cur_state"] != "unloaded"}
        for w in workers:  # never more than the rental says, whatever the box shows
            row = rows[w["name"]]
            assert w["resources"]["MEMORY"] <= row["cpu_ram"] * 2**20
            assert w["resources"]["CPU"] <= row["cpu_cores_effective"] and w["nthreads"] <= row["cpu_cores_effective"]
        log = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
    lived_s = time.monotonic() - started
    meter = assert_nothing_billing(emu, lived_s)
    stalled = 1 if "stall" in case else 0
    assert len(meter) == 4 + stalled, f"{len(meter)} rentals for 4 instances ({stalled} replaced)"
    if stalled:
        assert "7000001" in log and "failed" in log
    if variants.get("container_api_key") == "absent":
        assert len(set(re.findall(r"instance (\d+) has no CONTAINER_API_KEY.*orphan backstop is OFF", log))) == 4
    if variants.get("direct_blocked") == "all":
        assert log.count("through Vast's proxy") >= 4 and "rebooting it once" in log
    if interruptible:
        assert all(emu.market.ledger[r["id"]].is_bid for r in meter)
    print(f"\n{case}: up in {up_s:.1f} s, {lived_s:.1f} s in all, {len(meter)} rentals")


# --------------------------------------------------------------------------- SIGKILL
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from dask_vastai import VastAICluster
    url, key, n, orphan = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    cluster = VastAICluster(gpu="RTX_3090", n=n, api_url=url, api_key=key, name="held",
                            orphan_timeout=orphan, boot_timeout=240)
    print("READY", flush=True)
    time.sleep(600)
    """
)


def hold(emu: Emulator, n: int, orphan_s: float) -> tuple[subprocess.Popen[str], str]:
    """A process holding a cluster of ``n``, started and READY; its output so far."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, emu.url, emu.api_key, str(n), str(orphan_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out, deadline = "", time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        out += line
        if "READY" in line or not line:
            break
    if "READY" not in out:
        proc.kill()
        raise AssertionError(f"cluster holder did not start:\n{out}")
    return proc, out


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.5)


def live(emu: Emulator) -> list[int]:
    return [r["id"] for r in emu.meter()["instances"] if not r["destroyed"]]


def test_sigkill_leaves_it_to_the_watchdog_though_ssh_sees_no_container_env(strict_market: Emulator) -> None:
    emu = strict_market
    assert emu.variants["ssh_env"] == "none"  # the watchdog's key comes from the onstart's env, not SSH's
    orphan_s = 15  # longer than a boot through a blocked direct port (5 s) and the proxy
    proc, out = hold(emu, 4, orphan_s)
    assert "orphan backstop is OFF" not in out
    assert len(live(emu)) == 4
    killed = time.monotonic()
    proc.kill()
    proc.wait(timeout=10)
    wait_until(lambda: not live(emu), orphan_s + 60, "the watchdogs to destroy their instances")
    gone_after_s = time.monotonic() - killed
    assert gone_after_s < orphan_s + 60
    print(f"\nwatchdogs destroyed 4 instances {gone_after_s:.1f} s after SIGKILL (orphan timeout {orphan_s} s)")


def test_without_an_instance_key_the_user_is_warned_and_cleanup_finds_what_is_left(strict_market: Emulator) -> None:
    emu = strict_market
    emu.variants.set(container_api_key="absent")
    orphan_s = 15
    proc, out = hold(emu, 4, orphan_s)
    warned = set(re.findall(r"instance (\d+) has no CONTAINER_API_KEY.*orphan backstop is OFF", out))
    assert len(warned) == 4, out  # at rent time, for each instance
    proc.kill()
    proc.wait(timeout=10)
    time.sleep(orphan_s + 5)
    left = live(emu)
    assert len(left) == 4, "no watchdog could destroy them: they bill on"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    listed = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "ls", "--api-url", emu.url, "--api-key",
                             emu.api_key], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0 and all(str(i) in listed.stdout for i in left), listed.stdout
    cleaned = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "cleanup", "--yes", "--api-url", emu.url,
                              "--api-key", emu.api_key], capture_output=True, text=True, timeout=180, env=env)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert "destroyed 4 rentals" in cleaned.stdout
    assert live(emu) == [], "cleanup destroyed what the missing watchdog left"


# --------------------------------------------------------------------------- SSH paths and sizes
def registered_after(log: str, name: str) -> float:
    m = re.search(rf"{name}: instance \d+ ready, workers .* registered (\d+)s after renting", log)
    assert m, log
    return float(m.group(1))


def test_a_blocked_direct_port_goes_through_the_proxy_in_time_and_soft_limits_show_the_offer(
    strict_market: Emulator,
) -> None:
    """Two must-shows on one cluster of 2 (to keep the suite lean): a host whose direct SSH port is
    blocked registers through Vast's proxy within the direct timeout plus a healthy boot, not after
    ``boot_timeout``; and boxes that show the host's CPUs and memory (soft limits) advertise the
    offer's."""
    from distributed import Client

    from dask_vastai import VastAICluster

    emu = strict_market
    emu.variants.set(direct_blocked="instances:7000001", proxy_broken="none")
    assert emu.variants["cpu_view"].kind == "soft"  # 384 cores and 1 TB in /proc
    with VastAICluster(gpu="RTX_3090", n=2, api_url=emu.url, api_key=emu.api_key, name="blk", boot_timeout=240,
                       quiet=True) as cluster, Client(cluster) as client:
        log = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        workers = client.scheduler_info()["workers"].values()
        rows = {r["label"].rsplit(":", 1)[1]: r for r in emu.instances() if r["cur_state"] != "unloaded"}
        seen = client.run(lambda: (os.cpu_count(), open("/proc/meminfo").readline()))
    # the blocked host, through the proxy, in time
    blocked = next(m.group(1) for m in re.finditer(r"(blk-\d+): SSH to instance 7000001 through Vast's proxy", log))
    healthy = "blk-1" if blocked == "blk-0" else "blk-0"
    assert re.search(rf"{healthy}: SSH to instance \d+ direct", log), log
    t_blocked, t_healthy = registered_after(log, blocked), registered_after(log, healthy)
    assert t_blocked <= DIRECT_TIMEOUT_S + t_healthy + 10, (t_blocked, t_healthy, log)
    assert t_blocked < 60, "long before boot_timeout (240 s)"
    print(f"\nblocked direct port: registered {t_blocked:.0f} s after renting (healthy: {t_healthy:.0f} s, "
          f"direct timeout {DIRECT_TIMEOUT_S:.0f} s)")
    # soft limits: the boxes show the host, the workers say the offer
    assert all(cores == 384 and str(1024 * 2**20) in meminfo for cores, meminfo in seen.values()), seen
    machine_cpus = len(os.sched_getaffinity(0))  # the sandbox cannot run on more than this machine has
    for w in workers:
        row = rows[w["name"]]
        assert w["resources"]["MEMORY"] == row["cpu_ram"] * 2**20, "the offer's memory (MB), not the host's TB"
        assert w["memory_limit"] == row["cpu_ram"] * 2**20
        assert w["resources"]["CPU"] == min(row["cpu_cores_effective"], machine_cpus) and w["nthreads"] < 384


def test_a_box_whose_driver_is_older_than_the_packages_cuda_fails_naming_both(strict_market: Emulator) -> None:
    from dask_vastai import BootFailed, VastAICluster

    emu = strict_market
    with dask.config.set({"vastai.max-boot-attempts": 1}), pytest.raises(BootFailed) as e:
        VastAICluster(gpu="RTX_3090", n=1, api_url=emu.url, api_key=emu.api_key, name="cuda", boot_timeout=240,
                      quiet=True, packages=["torch==2.4.0+cu128"])
    message = str(e.value.__cause__ or e.value)
    assert "needs CUDA 12.8" in message and "supports CUDA 12.4" in message, message
    created = emu.market.ledger
    assert all(r.offer["cuda_max_good"] >= 12.8 for r in created.values()), "the query asked cuda_max_good>=12.8"
    assert live(emu) == []


# --------------------------------------------------------------------------- one account, many clients
_LS_LOOP = textwrap.dedent(
    """
    import subprocess, sys, time
    url, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    end, runs, failures = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        p = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "ls", "--api-url", url, "--api-key", key],
                           capture_output=True, text=True)
        runs += 1
        if p.returncode != 0:
            failures.append(p.stdout[-300:] + p.stderr[-300:])
    print("RUNS", runs, "FAILURES", len(failures), failures[:2])
    """
)


def test_two_clusters_and_an_ls_loop_on_one_account_never_meet_a_429(strict_market: Emulator) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from distributed import Client

    from dask_vastai import VastAICluster

    emu = strict_market
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    loop = subprocess.Popen([sys.executable, "-c", _LS_LOOP, emu.url, emu.api_key, "40"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)

    def square(x: int) -> int:
        return x * x

    def one(name: str) -> int:
        with VastAICluster(gpu="RTX_3090", n=2, api_url=emu.url, api_key=emu.api_key, name=name, boot_timeout=240,
                           quiet=True) as cluster, Client(cluster) as client:
            return sum(client.gather(client.map(square, range(10), resources={"GPU": 1})))

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(one, ["one", "two"])) == [285, 285]
    out, _ = loop.communicate(timeout=120)
    runs, failures = map(int, re.search(r"RUNS (\d+) FAILURES (\d+)", out).groups())  # type: ignore[union-attr]
    assert runs >= 3 and failures == 0, out
    refused = [r for r in emu.requests if r["status"] == 429]
    print(f"\ntwo clusters + {runs} `dask-vastai ls`: {len(refused)} answers 429 of {len(emu.requests)} calls")
    assert refused == [], "one schedule per account: nobody called too early"
