"""The emulated Vast control plane over HTTP, as any client sees it (no oracle needed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator, ManualClock
from tests.helpers.control_plane import ScriptedRuntime, call, rent, search, show, wait_status


# --------------------------------------------------------------------------- protocol basics
def test_auth_content_type_and_trailing_slashes(emulator: Emulator) -> None:
    status, body, headers = call(emulator, "GET", "/api/v0/users/current")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["balance"] == pytest.approx(100.0)
    assert call(emulator, "GET", "/api/v0/users/current/", auth="query")[0] == 200
    status, body, headers = call(emulator, "GET", "/api/v1/instances", key="wrong")
    assert status == 401 and headers["Content-Type"] == "application/json"
    assert body == {"success": False, "error": "auth_error", "msg": "Invalid user key"}
    assert call(emulator, "GET", "/api/v0/users/current", auth="none")[0] == 401
    status, body, _ = call(emulator, "GET", "/api/v0/no/such/thing/")
    assert status == 404 and "no such API route" in body["msg"]
    # the log shows the endpoint names and which key, never the key itself
    assert emulator.api_key not in json.dumps(emulator.requests)
    assert [r["status"] for r in emulator.requests][:3] == [200, 200, 401]
    status, over_http, _ = call(emulator, "GET", "/_emulator/requests")
    assert status == 200 and over_http == emulator.requests and len(over_http) == 5
    assert call(emulator, "GET", "/_emulator/meter", key="wrong")[0] == 401


def test_search_filters_like_the_server(emulator: Emulator) -> None:
    base = {"verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}}
    twos = search(emulator, **base, gpu_name={"eq": "RTX 3090"}, num_gpus={"gte": "2"},
                  order=[["dph_total", "asc"]])
    assert twos and all(o["gpu_name"] == "RTX 3090" and o["num_gpus"] >= 2 for o in twos)
    assert [o["dph_total"] for o in twos] == sorted(o["dph_total"] for o in twos)
    eu = search(emulator, geolocation={"in": ["DE", "PL"]}, datacenter={"eq": True})
    assert eu and {o["geolocation"][-2:] for o in eu} <= {"DE", "PL"} and all(o["hosting_type"] == 1 for o in eu)
    assert all(o["geolocation"][-2:] != "US" for o in search(emulator, geolocation={"notin": ["US"]}))
    hobby = search(emulator, datacenter={"eq": "false"}, reliability={"lt": "0.98"})
    assert hobby and all(o["hosting_type"] == 0 and o["reliability"] < 0.98 for o in hobby)
    big = search(emulator, cpu_ram={"gte": 500_000.0}, gpu_name={"in": ["H100_SXM", "A100 SXM4"]})
    assert big and all(o["cpu_ram"] >= 500_000 and o["gpu_name"] in ("H100 SXM", "A100 SXM4") for o in big)
    assert len(search(emulator, limit=3, order=[["dlperf", "desc"]])) == 3
    assert search(emulator, no_such_field={"eq": 1}), "unknown fields are ignored, as the server does"
    status, body, _ = call(emulator, "POST", "/api/v0/bundles/", {"num_gpus": {"about": 1}})
    assert status == 400 and "about" in body["msg"]
    # allocated storage is priced into dph_total; bid searches price the minimum bid
    one = search(emulator, id={"eq": 1000001}, allocated_storage=720)[0]
    assert one["dph_total"] == pytest.approx(one["dph_base"] + one["storage_cost"], abs=1e-6)
    bid = search(emulator, id={"eq": 1000001}, allocated_storage=0.0001, type="bid")[0]
    assert bid["is_bid"] and bid["dph_total"] == pytest.approx(bid["min_bid"], abs=1e-5)
    # the other search routes answer the same
    status, body, _ = call(emulator, "PUT", "/api/v0/search/asks/", {"select_cols": ["*"], "q": {"num_gpus": {"eq": 8}}})
    assert status == 200 and body["offers"] and all(o["num_gpus"] == 8 for o in body["offers"])
    q = urllib.request.quote(json.dumps({"gpu_name": {"eq": "L40S"}}))
    status, body, _ = call(emulator, "GET", f"/api/v0/bundles?q={q}")
    assert status == 200 and {o["gpu_name"] for o in body["offers"]} == {"L40S"}


def test_default_catalog_has_a_pool_of_reliable_3090s_and_the_regions(emulator: Emulator) -> None:
    pool = search(emulator, verified={"eq": True}, gpu_name={"eq": "RTX 3090"}, num_gpus={"eq": 1},
                  datacenter={"eq": True}, reliability={"gt": 0.98}, direct_port_count={"gte": 10})
    assert len(pool) >= 24
    offers = search(emulator)
    assert {o["gpu_name"] for o in offers} >= {"RTX 3090", "RTX 4090", "A100 PCIE", "A100 SXM4", "H100 SXM"}
    assert {o["num_gpus"] for o in offers} >= {1, 2, 4, 8}
    assert {o["geolocation"][-2:] for o in offers} >= {"US", "CA", "DE", "PL", "NL", "SE", "JP"}


def test_catalog_from_a_file_completes_partial_records(tmp_path: Path) -> None:
    path = tmp_path / "offers.json"
    path.write_text(json.dumps([{"id": 5, "gpu_name": "RTX 4090", "dph_base": 0.5}, {"num_gpus": 2}]))
    with Emulator(catalog=path, runtime="record", rate_limits=False, boot_delay_s=0) as emu:
        offers = {o["id"]: o for o in search(emu)}
        assert offers[5]["gpu_name"] == "RTX 4090" and offers[5]["gpu_total_ram"] == 24564
        assert len(offers) == 2 and any(o["num_gpus"] == 2 and o["gpu_total_ram"] == 2 * o["gpu_ram"] for o in offers.values())
    path.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="offers.json must be a JSON list"):
        Emulator(catalog=path)


# --------------------------------------------------------------------------- rentals
def test_offers_are_single_use_until_destroyed(emulator: Emulator) -> None:
    offer = search(emulator, gpu_name={"eq": "RTX_4090"}, num_gpus={"eq": 1})[0]
    iid = rent(emulator, offer["id"], label="mine")
    assert offer["id"] not in {o["id"] for o in search(emulator)}
    status, body, _ = call(emulator, "PUT", f"/api/v0/asks/{offer['id']}/", {"image": "x"})
    assert status == 404 and body["error"] == "no_such_ask" and str(offer["id"]) in body["msg"]
    assert call(emulator, "DELETE", f"/api/v0/instances/{iid}/")[0] == 200
    assert offer["id"] in {o["id"] for o in search(emulator)}
    assert show(emulator, iid) is None
    status, body, _ = call(emulator, "DELETE", f"/api/v0/instances/{iid}/")
    assert status == 404 and body == {"success": False, "error": "not_found", "msg": "Instance not found"}


def test_life_cycle_with_boot_delay_and_what_the_runtime_gets() -> None:
    runtime = ScriptedRuntime()
    with Emulator(runtime=runtime, rate_limits=False, boot_delay_s=0.4) as emu:
        call(emu, "POST", "/api/v0/ssh/", {"ssh_key": "ssh-ed25519 AAAAaccount me@laptop"})
        offer = search(emu, gpu_name={"eq": "RTX 3090"}, num_gpus={"eq": 2})[0]
        status, created, _ = call(emu, "PUT", f"/api/v0/asks/{offer['id']}/", {
            "image": "img:1", "label": "w1", "onstart": "echo hi", "runtype": "ssh_proxy", "disk": 20,
            "env": {"-p 8786:8786": "1", "-p 9000:9000/udp": "1", "FOO": "bar"}, "cancel_unavail": True})
        iid = created["new_contract"]
        row = show(emu, iid)
        assert row["actual_status"] in (None, "loading") and "ports" not in row
        assert isinstance(row["start_date"], float) and row["extra_env"][0] == ["-p 8786:8786", "1"]
        assert wait_status(emu, iid, "loading", 0.3)["status_msg"].startswith("Pulling image img:1")
        row = wait_status(emu, iid, "running", 3)
        assert row["ports"]["8786/tcp"] == [{"HostIp": "0.0.0.0", "HostPort": "41001"}]
        assert row["ports"]["22/tcp"][0]["HostPort"] == "41000"
        assert (row["ssh_host"], row["ssh_port"]) == ("127.0.0.1", 42022)
        assert row["status_msg"] == "success, running img:1/ssh" and row["label"] == "w1"
        spec = runtime.specs[-1]
        assert spec.container_ports == (22, 8786) and spec.num_gpus == 2 and spec.disk_gb == 20
        assert spec.env["FOO"] == "bar" and spec.env["CONTAINER_ID"] == str(iid)
        assert spec.env["CONTAINER_API_KEY"] == created["instance_api_key"] and spec.env["GPU_COUNT"] == "2"
        assert spec.env["VAST_CONTAINERLABEL"] == f"C.{iid}" and spec.api_url == emu.url
        assert spec.authorized_keys == ("ssh-ed25519 AAAAaccount me@laptop",)
        # attached keys reach authorized_keys at the next start; stop/start/reboot
        assert call(emu, "POST", f"/api/v0/instances/{iid}/ssh/", {"ssh_key": "ssh-rsa AAAAextra x"})[0] == 200
        assert call(emu, "PUT", f"/api/v0/instances/{iid}/", {"state": "stopped"})[0] == 200
        row = show(emu, iid)
        assert row["actual_status"] == "stopped" and "ports" not in row and runtime.stopped == [iid]
        assert call(emu, "PUT", f"/api/v0/instances/{iid}/", {"state": "running"})[0] == 200
        wait_status(emu, iid, "running", 3)
        assert runtime.specs[-1].authorized_keys[-1] == "ssh-rsa AAAAextra x"
        assert call(emu, "PUT", f"/api/v0/instances/reboot/{iid}/")[0] == 200
        assert show(emu, iid)["actual_status"] in ("loading", None)
        wait_status(emu, iid, "running", 3)
        assert call(emu, "PUT", f"/api/v0/instances/{iid}/", {"label": "renamed"})[0] == 200
        assert show(emu, iid)["label"] == "renamed"
        assert call(emu, "DELETE", f"/api/v0/instances/{iid}/")[0] == 200
        assert show(emu, iid) is None and runtime.stopped.count(iid) >= 3


def test_args_workload_exits_and_start_failures_show(tmp_path: Path) -> None:
    runtime = ScriptedRuntime(log="line one\nport forwarding failed\nline three\n")
    with Emulator(runtime=runtime, rate_limits=False, boot_delay_s=0) as emu:
        iid = rent(emu, 1000001, runtype="args", onstart="/bin/sh", args=["-c", "exit 3"])
        wait_status(emu, iid, "running")
        assert runtime.specs[-1].container_ports == () and runtime.specs[-1].args == ["-c", "exit 3"]
        runtime.exit_codes[iid] = 3
        row = wait_status(emu, iid, "exited")
        assert row["status_msg"] == "container exited with code 3"
        # logs: a result_url served by the emulator, 404 until "uploaded", tail and filter honoured
        status, body, _ = call(emu, "PUT", f"/api/v0/instances/request_logs/{iid}/", {"tail": "2"})
        url = body["result_url"]
        assert status == 200 and url.startswith(emu.url + "/logs/")
        with pytest.raises(urllib.error.HTTPError) as early:
            urllib.request.urlopen(url, timeout=5)
        assert early.value.code == 404
        time.sleep(0.3)
        assert urllib.request.urlopen(url, timeout=5).read().decode() == "port forwarding failed\nline three\n"
        _, body, _ = call(emu, "PUT", f"/api/v0/instances/request_logs/{iid}/", {"filter": "forwarding"})
        time.sleep(0.3)
        assert urllib.request.urlopen(body["result_url"], timeout=5).read().decode() == "port forwarding failed\n"
        status, body, _ = call(emu, "PUT", "/api/v0/instances/request_logs/999/", {})
        assert status == 404 and body["msg"] == "Invalid instance id."
        runtime.fail = "cannot make network namespace"
        iid2 = rent(emu, 1000002)
        row = wait_status(emu, iid2, "exited")
        assert "cannot make network namespace" in row["status_msg"]


def test_list_pages_filters_and_counts(emulator: Emulator) -> None:
    ids = [o["id"] for o in search(emulator, limit=30, order=[["id", "asc"]])]
    status, body, _ = call(emulator, "POST", "/api/v0/asks/bulk/", {"ids": ids + [1], "image": "img", "label": "bulk"})
    assert status == 200 and body["success"]
    made = [r["new_contract"] for r in body["results"] if r["success"]]
    assert len(made) == 30 and body["results"][-1]["error"] == "no_such_ask"
    for iid in made[:4]:
        call(emulator, "PUT", f"/api/v0/instances/{iid}/", {"label": "other"})
    call(emulator, "PUT", f"/api/v0/instances/{made[4]}/", {"label": ""})
    q = "select_filters=%7B%7D&order_by=%5B%7B%22col%22%3A+%22id%22%2C+%22dir%22%3A+%22desc%22%7D%5D&limit=25"
    _, page1, _ = call(emulator, "GET", f"/api/v1/instances/?{q}")
    assert len(page1["instances"]) == 25 and page1["total_instances"] == 30 and page1["next_token"]
    assert page1["label_counts"] == {"bulk": 25, "other": 4, "": 1}
    assert [r["id"] for r in page1["instances"]] == sorted(made, reverse=True)[:25]
    _, page2, _ = call(emulator, "GET", f"/api/v1/instances/?{q}&after_token={page1['next_token']}")
    assert len(page2["instances"]) == 5 and page2["next_token"] is None
    flt = urllib.request.quote(json.dumps({"label": {"in": ["other", None]}}))
    _, some, _ = call(emulator, "GET", f"/api/v1/instances/?select_filters={flt}")
    assert sorted(r["id"] for r in some["instances"]) == sorted(made[:5])
    status, body, _ = call(emulator, "GET", f"/api/v1/instances/?select_filters={urllib.request.quote(json.dumps({'dph_total': {'lt': 1}}))}")
    assert status == 400 and "dph_total" in body["msg"]
    _, legacy, _ = call(emulator, "GET", "/api/v0/instances?owner=me")
    assert len(legacy["instances"]) == 30
    status, body, _ = call(emulator, "PUT", "/api/v0/instances/", {"state": "stopped", "ids": made[:2] + [5]})
    assert [r["success"] for r in body["results"]] == [True, True, False]
    status, body, _ = call(emulator, "DELETE", "/api/v0/instances/", {"instance_ids": made})
    assert status == 200 and all(r["success"] for r in body["results"])
    assert emulator.instances() == []


# --------------------------------------------------------------------------- limits, keys, money, faults
def test_rate_limits_answer_429_in_plain_text(emulator_rate_limited: Emulator) -> None:
    emu = emulator_rate_limited
    t0 = time.monotonic()
    rent(emu, 1000001)
    time.sleep(1.0)
    status, body, headers = call(emu, "PUT", "/api/v0/asks/1000002/", {"image": "x"})
    assert status == 429 and body == "API requests too frequent endpoint threshold=4.5"
    assert headers["Content-Type"].startswith("text/plain") and "Retry-After" not in headers
    creates = [r for r in emu.requests if r["endpoint"] == "create"]
    assert [r["status"] for r in creates] == [200, 429]
    assert 0.9 <= creates[1]["time"] - creates[0]["time"] <= time.monotonic() - t0
    # other endpoints keep their own budgets; a refused call does not restart the interval
    assert call(emu, "GET", "/api/v1/instances/")[0] == 200
    assert call(emu, "GET", "/api/v1/instances/")[0] == 429


def test_a_custom_interval_lets_the_next_call_through() -> None:
    with Emulator(runtime="record", rate_limits={"create": 0.3}, boot_delay_s=0) as emu:
        rent(emu, 1000001)
        assert call(emu, "PUT", "/api/v0/asks/1000002/", {"image": "x"})[0] == 429
        time.sleep(0.35)
        rent(emu, 1000003)


def test_container_api_key_reaches_only_its_own_instance(emulator: Emulator) -> None:
    status, mine, _ = call(emulator, "PUT", "/api/v0/asks/1000001/", {"image": "x"})
    other = rent(emulator, 1000002)
    key = mine["instance_api_key"]
    assert call(emulator, "GET", f"/api/v0/instances/{mine['new_contract']}/", key=key)[1]["instances"]["id"] == mine["new_contract"]
    for method, path, body in [("GET", "/api/v1/instances/", None), ("PUT", "/api/v0/asks/1000003/", {"image": "x"}),
                               ("DELETE", f"/api/v0/instances/{other}/", None), ("GET", f"/api/v0/instances/{other}/", None),
                               ("PUT", f"/api/v0/instances/{mine['new_contract']}/", {"label": "x"}),
                               ("POST", "/api/v0/bundles/", {})]:
        status, answer, _ = call(emulator, method, path, body, key=key)
        assert status == 403 and "CONTAINER_API_KEY" in answer["msg"], (method, path)
    assert call(emulator, "DELETE", f"/api/v0/instances/{mine['new_contract']}/", key=key)[0] == 200
    assert call(emulator, "GET", "/api/v0/users/current", key=key)[0] == 401, "a destroyed rental's key is dead"
    assert [r["id"] for r in emulator.instances()] == [other]


def test_meter_bills_per_second_and_stops_at_destroy() -> None:
    clock = ManualClock()
    offers = [{"id": 1, "dph_base": 3.6, "storage_cost": 0.0}, {"id": 2, "dph_base": 1.0, "storage_cost": 7.2}]
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0, catalog=offers, clock=clock) as emu:
        iid = rent(emu, 1, label="pricey")
        clock.advance(10)
        assert emu.meter()["total_usd"] == pytest.approx(0.01, rel=0.005)
        call(emu, "DELETE", f"/api/v0/instances/{iid}/")
        clock.advance(100)
        meter = emu.meter()
        assert meter["total_usd"] == pytest.approx(0.01, rel=0.005)
        assert meter["instances"][0] | {"cost_usd": 0} == {
            "id": iid, "label": "pricey", "dph": 3.6, "storage_dph": 0.0, "seconds": 10, "storage_seconds": 0,
            "cost_usd": 0, "destroyed": True, "time_usd": pytest.approx(0.01, rel=0.005),
            "bytes_up": 0, "bytes_down": 0, "bandwidth_usd": 0.0}  # a record-only rental moves no bytes
        # stopped: storage only (7.2 $/GB/month * 100 GB / 720 h = 1 $/h)
        iid = rent(emu, 2, disk=100)
        clock.advance(36)  # 2 $/h -> 0.02
        call(emu, "PUT", f"/api/v0/instances/{iid}/", {"state": "stopped"})
        clock.advance(36)  # 1 $/h -> 0.01
        assert emu.meter()["instances"][1]["cost_usd"] == pytest.approx(0.03)
        status, user, _ = call(emu, "GET", "/api/v0/users/current")
        assert user["balance"] == pytest.approx(100 - 0.04)
        status, meter, _ = call(emu, "GET", "/_emulator/meter")
        assert meter["total_usd"] == pytest.approx(0.04)


def test_meter_in_real_time() -> None:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0,
                  catalog=[{"id": 1, "dph_base": 36.0, "storage_cost": 0.0}]) as emu:
        before = time.time()
        iid = rent(emu, 1)
        after_create = time.time()
        time.sleep(0.5)
        before_destroy = time.time()
        call(emu, "DELETE", f"/api/v0/instances/{iid}/")
        after = time.time()
        cost = emu.meter()["total_usd"]
        assert 0.01 * (before_destroy - after_create) <= cost <= 0.01 * (after - before)
        time.sleep(0.2)
        assert emu.meter()["total_usd"] == cost
        rent(emu, 1)
    # after the with block the meter is frozen and still readable (sandboxes are stopped, records stay)
    frozen = emu.meter()["total_usd"]
    time.sleep(0.1)
    assert emu.meter()["total_usd"] == frozen > cost and len(emu.instances()) == 1


def test_faults(emulator: Emulator) -> None:
    emulator.faults.fail_next("search", count=2, status=503)
    assert call(emulator, "POST", "/api/v0/bundles/", {})[0] == 503
    assert call(emulator, "POST", "/api/v0/bundles/", {})[0] == 503
    assert call(emulator, "POST", "/api/v0/bundles/", {})[0] == 200
    emulator.faults.race_next_create()
    status, body, _ = call(emulator, "PUT", "/api/v0/asks/1000001/", {"image": "x"})
    assert status == 404 and body["error"] == "no_such_ask"
    assert 1000001 not in {o["id"] for o in search(emulator)}, "someone else has it now"
    emulator.faults.fail_boot("pull rate limit")
    stuck = rent(emulator, 1000002)
    time.sleep(0.2)
    row = show(emulator, stuck)
    assert row["actual_status"] == "loading" and "pull rate limit" in row["status_msg"]
    emulator.faults.fail_boot("oci runtime")
    assert "OCI runtime create failed" in wait_status(emulator, rent(emulator, 1000003), "exited")["status_msg"]
    offer = search(emulator, id={"eq": 1000004}, type="bid")[0]
    bid = rent(emulator, 1000004, price=offer["min_bid"])
    wait_status(emulator, bid, "running")
    emulator.faults.preempt(bid)
    assert show(emulator, bid)["actual_status"] == "stopped" and "outbid" in show(emulator, bid)["status_msg"]
    with pytest.raises(ValueError, match="on-demand"):
        emulator.faults.preempt(stuck)
    # over HTTP, with the account key
    status, body, _ = call(emulator, "POST", "/_emulator/faults", {"fault": "host_offline", "instance_id": bid})
    assert status == 200 and show(emulator, bid)["actual_status"] == "offline"
    status, body, _ = call(emulator, "POST", "/_emulator/faults", {"fault": "fail_next", "endpoint": "show", "status": 429})
    assert body["armed"]["http"] == {"show": [429]}
    status, text, _ = call(emulator, "GET", f"/api/v0/instances/{bid}/")
    assert status == 429 and text == "API requests too frequent"
    emulator.faults.race_next_create(status=410)
    status, body, _ = call(emulator, "PUT", "/api/v0/asks/1000005/", {"image": "x", "cancel_unavail": True})
    assert status == 410 and "no longer available" in body["msg"]
    dies = rent(emulator, 1000006)
    wait_status(emulator, dies, "running")
    emulator.faults.container_exit(dies, code=137)
    assert show(emulator, dies)["status_msg"] == "container exited with code 137"
    status, body, _ = call(emulator, "POST", "/_emulator/faults", {"fault": "explode"})
    assert status == 400 and "unknown fault" in body["msg"]


def test_async_with_serves_from_the_callers_loop() -> None:
    async def main() -> None:
        async with Emulator(runtime="record", rate_limits=False, boot_delay_s=0) as emu:
            status, body, _ = await asyncio.to_thread(call, emu, "PUT", "/api/v0/asks/1000001/", {"image": "x"})
            assert status == 200
            await asyncio.sleep(0.05)
            assert [r["actual_status"] for r in emu.instances()] == ["running"]
            url, key = emu
            assert (url, key) == (emu.url, emu.api_key)
    asyncio.run(main())


def test_command_line_prints_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "dask_vastai.emulator.main", "--api-key", "k-123",
                             "--runtime", "record", "--boot-delay", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        first = proc.stdout.readline()
        assert first.startswith("Vast emulator serving http://127.0.0.1:"), first + proc.stderr.read()
        url = first.split()[3]
        assert proc.stdout.readline().strip() == "API key: k-123"
        assert "Point dask-vastai at it" in proc.stdout.readline()
        # the exact lines to paste: the library, the CLI and the Snakemake plugin all read them
        assert proc.stdout.readline().strip() == "export VAST_API_KEY=k-123"
        assert proc.stdout.readline().strip() == f"export DASK_VASTAI__API_URL={url}"
        req = urllib.request.Request(url + "/api/v0/users/current", headers={"Authorization": "Bearer k-123"})
        assert json.load(urllib.request.urlopen(req, timeout=5))["balance"] == 100.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.sandbox
def test_an_instance_destroys_itself_with_its_container_api_key(sandbox, tmp_path: Path) -> None:
    """From inside a real sandbox: the injected key cannot touch a neighbour, but ends its own rental."""
    with Emulator(runtime="sandbox", rate_limits=False, boot_delay_s=0, state_dir=tmp_path) as emu:
        neighbour = rent(emu, 1000002, runtype="args", onstart="/bin/sh", args=["-c", "sleep 60"])
        script = f"""
import os, urllib.request, urllib.error
def call(method, iid):
    req = urllib.request.Request("{emu.url}/api/v0/instances/%s/" % iid, b"{{}}", method=method,
                                 headers={{"Authorization": "Bearer " + os.environ["CONTAINER_API_KEY"]}})
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
print("neighbour", call("DELETE", {neighbour}), flush=True)
print("self", call("DELETE", os.environ["CONTAINER_ID"]), flush=True)
"""
        iid = rent(emu, 1000001, runtype="args", onstart=sys.executable, args=["-c", script])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and show(emu, iid) is not None:
            time.sleep(0.2)
        assert show(emu, iid) is None, "the instance did not destroy itself within 20 s"
        assert [r["id"] for r in emu.instances()] == [neighbour]
        denied = [r for r in emu.requests if r["key"] == f"instance:{iid}"]
        assert [(r["method"], r["status"]) for r in denied] == [("DELETE", 403), ("DELETE", 200)]
