"""The control plane's variants: where Vast's behaviour is unknown, each plausible one, on demand.

Every test drives the emulator over HTTP as a client would (records-only runtime, or a
scripted one that shows what a sandbox would be asked to be), with the variant switched
from Python, the command line or the ``/_emulator/variants`` endpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from dask_vastai.emulator import Emulator, ManualClock
from dask_vastai.emulator.variants import STRICT, VARIANTS, Selection, Variants
from tests.helpers.checkout import REPO
from tests.helpers.control_plane import ScriptedRuntime, call, rent, search, show, wait_status


def emulator(**kwargs) -> Emulator:
    return Emulator(**{"runtime": "record", "rate_limits": False, "boot_delay_s": 0, **kwargs})


def bulk_create(emu: Emulator, ids: list[int], **fields) -> tuple[int, object]:
    status, body, _ = call(emu, "POST", "/api/v0/asks/bulk/", {"ids": ids, "image": "img", **fields})
    return status, body


def live_ids(emu: Emulator) -> list[int]:
    return [r["id"] for r in emu.instances() if r["cur_state"] != "unloaded"]


# --------------------------------------------------------------------------- switching
def test_variants_switch_from_python_http_and_the_command_line() -> None:
    with emulator(variants={"bulk_create": "ids"}, profile="strict") as emu:
        assert emu.variants.profile == "strict" and emu.variants["bulk_create"] == "ids"
        assert emu.variants["ssh_env"] == "none", "the profile's values under the explicit ones"
        emu.variants.set(ssh_env="image", direct_blocked="machines:20001,20002")
        assert emu.variants["direct_blocked"] == Selection(machines=frozenset({20001, 20002}))
        status, body, _ = call(emu, "GET", "/_emulator/variants")
        assert status == 200 and body["values"]["ssh_env"] == "image"
        assert body["values"]["direct_blocked"] == "machines:20001,20002"
        assert {v["name"] for v in body["variants"]} == set(VARIANTS)
        status, body, _ = call(emu, "POST", "/_emulator/variants", {"profile": "default",
                                                                    "values": {"retry_after_s": 2}})
        assert status == 200 and body["changed"] == {"retry_after_s": 2.0} and body["profile"] == "default"
        status, body, _ = call(emu, "POST", "/_emulator/variants", {"bulk_destroy": "absent"})
        assert status == 200 and body["changed"] == {"retry_after_s": 2.0, "bulk_destroy": "absent"}
        status, body, _ = call(emu, "POST", "/_emulator/variants", {"ssh_env": "sometimes"})
        assert status == 400 and "container | image | none" in body["msg"]
        assert emu.variants["ssh_env"] == "container", "a refused change changes nothing"
        status, body, _ = call(emu, "POST", "/_emulator/variants", {"no_such": 1})
        assert status == 400 and "unknown variant 'no_such'" in body["msg"]
        assert call(emu, "POST", "/_emulator/variants", {"ssh_env": "none"}, key="wrong")[0] == 401
        status, body, _ = call(emu, "DELETE", "/_emulator/variants")
        assert status == 200 and body["changed"] == {} and emu.variants["ssh_env"] == "container"
    with pytest.raises(ValueError, match="unknown variant 'bulk'"):
        Emulator(variants={"bulk": "ids"})
    with pytest.raises(ValueError, match="unknown profile 'lenient'"):
        Emulator(profile="lenient")
    with pytest.raises(ValueError, match="fraction of hosts is between 0 and 1"):
        Variants({"direct_blocked": 2})
    assert Variants.parse_option("cpu-view=soft:64:256") == ("cpu_view", Variants.parse("cpu_view", "soft:64:256"))
    assert Variants.parse_option("direct_blocked") == ("direct_blocked", Selection(fraction=1.0))
    with pytest.raises(ValueError, match="needs a value"):
        Variants.parse_option("retry_after_s")


def test_command_line_takes_a_profile_and_variants() -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    listed = subprocess.run([sys.executable, "-m", "dask_vastai.emulator.main", "--list-variants"],
                            capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    assert all(f"{name} = " in listed for name in VARIANTS)
    proc = subprocess.Popen([sys.executable, "-m", "dask_vastai.cli", "emulator", "--runtime", "record",
                             "--api-key", "k", "--profile", "strict", "--variant", "bulk_create=absent",
                             "--variant", "retry_after_s=3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        url = proc.stdout.readline().split()[3]
        lines = [proc.stdout.readline() for _ in range(3)]
        assert any("variants (strict profile):" in line and "bulk_create=absent" in line
                   and "retry_after_s=3" in line for line in lines), lines
        req = urllib.request.Request(url + "/_emulator/variants", headers={"Authorization": "Bearer k"})
        values = json.load(urllib.request.urlopen(req, timeout=5))["values"]
        assert values["bulk_create"] == "absent" and values["ssh_env"] == "none"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "dask_vastai.emulator.main", "--variant", "ssh_env=maybe"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "container | image | none" in bad.stderr


def test_strict_profile_and_the_documentation_cover_every_variant() -> None:
    strict = Variants(profile="strict")
    assert set(strict.changed()) == set(STRICT)
    assert strict["trailing_slash"] == "redirect_301" and strict["onstart_max_chars"] == 4048
    strict.reset()
    assert strict.changed() == {} and strict.profile == "default"
    doc = (REPO / "docs" / "emulator-variants.md").read_text()
    missing = [name for name in VARIANTS if f"`{name}`" not in doc]
    assert not missing, f"docs/emulator-variants.md does not document {missing}"


def test_a_fraction_of_hosts_is_the_same_hosts_for_the_same_seed() -> None:
    machines = range(20001, 20201)
    half = Selection.parse("0.5")
    picked = {m for m in machines if half.picks(0, "direct_blocked", m)}
    assert 70 <= len(picked) <= 130
    assert picked == {m for m in machines if half.picks(0, "direct_blocked", m)}
    assert picked != {m for m in machines if half.picks(1, "direct_blocked", m)}, "the seed changes the hosts"
    assert picked != {m for m in machines if half.picks(0, "proxy_broken", m)}, "each fault picks its own"
    assert Selection.parse("instances:7,8").picks(0, "x", 1, instance_id=8)
    assert not Selection.parse("none").picks(0, "x", 1) and Selection.parse("all").picks(0, "x", 1)
    assert str(Selection.parse({"machines": [2, 1]})) == "machines:1,2"


# --------------------------------------------------------------------------- bulk endpoints
@pytest.mark.parametrize("shape", ["results", "success_only", "ids", "id_list"])
def test_bulk_create_answers_in_each_shape(shape: str) -> None:
    with emulator(variants={"bulk_create": shape}) as emu:
        status, body = bulk_create(emu, [1000001, 1000002], label="b")
        made = live_ids(emu)
        assert status == 200 and len(made) == 2
        expected = {
            "results": {"success": True, "results": [
                {"ask_id": 1000001, "success": True, "new_contract": made[0],
                 "instance_api_key": body["results"][0]["instance_api_key"] if shape == "results" else None},
                {"ask_id": 1000002, "success": True, "new_contract": made[1],
                 "instance_api_key": body["results"][1]["instance_api_key"] if shape == "results" else None}]},
            "success_only": {"success": True},
            "ids": {"success": True, "new_contracts": made},
            "id_list": made,
        }[shape]
        assert body == expected


def test_bulk_create_refuses_some_offers_and_says_which_only_in_results() -> None:
    offers = list(range(1000001, 1000011))
    with emulator(variants={"bulk_create_refused": "0.5"}) as emu:
        refused = {o for o in offers if emu.variants.picks("bulk_create_refused", o)}
        assert 0 < len(refused) < len(offers)
        status, body = bulk_create(emu, offers)
        assert status == 200
        assert {r["ask_id"] for r in body["results"] if not r["success"]} == refused
        assert all(r["error"] == "no_such_ask" for r in body["results"] if not r["success"])
        assert not refused & {o["id"] for o in search(emu)}, "a refused offer went to someone else"
        emu.variants.set(bulk_create="success_only", bulk_create_refused="offers:1000011")
        status, body = bulk_create(emu, [1000011, 1000012])
        assert (status, body) == (200, {"success": True}) and len(live_ids(emu)) == len(offers) - len(refused) + 1
        # nothing rented at all: the refusal, as a single create answers it
        emu.variants.set(bulk_create_refused="offers:1000013")
        status, body = bulk_create(emu, [1000013])
        assert status == 404 and body["error"] == "no_such_ask" and body["ask_id"] == 1000013


@pytest.mark.parametrize("missing_route", ["json", "html", "text"])
def test_absent_bulk_routes_answer_404_like_any_missing_route(missing_route: str) -> None:
    with emulator(variants={"bulk_create": "absent", "bulk_destroy": "absent",
                            "missing_route": missing_route}) as emu:
        iid = rent(emu, 1000001)
        for method, path, body in [("POST", "/api/v0/asks/bulk/", {"ids": [1000002], "image": "x"}),
                                   ("DELETE", "/api/v0/instances/", {"instance_ids": [iid]})]:
            status, answer, headers = call(emu, method, path, body)
            assert status == 404, (method, path)
            if missing_route == "json":
                assert answer["error"] == "not_found" and headers["Content-Type"] == "application/json"
            elif missing_route == "html":
                assert "<title>404 Not Found</title>" in answer and headers["Content-Type"].startswith("text/html")
            else:
                assert answer == "404: Not Found" and headers["Content-Type"].startswith("text/plain")
        assert live_ids(emu) == [iid] and call(emu, "DELETE", f"/api/v0/instances/{iid}/")[0] == 200


def test_bulk_destroy_says_success_yet_some_survive_until_destroyed_again() -> None:
    clock = ManualClock()
    with emulator(clock=clock, variants={"bulk_destroy": "success_only", "bulk_destroy_survivors": 0.5}) as emu:
        made = [rent(emu, o) for o in range(1000001, 1000011)]
        survivors = {i for i in made if emu.variants.picks("bulk_destroy_survivors", i)}
        assert 0 < len(survivors) < len(made)
        status, body, _ = call(emu, "DELETE", "/api/v0/instances/", {"instance_ids": made})
        assert (status, body) == (200, {"success": True})
        assert set(live_ids(emu)) == survivors, "the client must list again to see who survived"
        clock.advance(3600)
        billed = {rec["id"]: rec["cost_usd"] for rec in emu.meter()["instances"]}
        assert all(billed[i] > 0.1 for i in survivors), "a survivor bills on"
        emu.variants.set(bulk_destroy="results")
        status, body, _ = call(emu, "DELETE", "/api/v0/instances/", {"instance_ids": sorted(survivors) + [5]})
        assert [r["success"] for r in body["results"]] == [True] * len(survivors) + [False]
        assert live_ids(emu) == [], "a survivor goes at the next destroy"


# --------------------------------------------------------------------------- states and rows
def test_destroyed_rows_linger_listed_but_unbilled() -> None:
    clock = ManualClock()
    with emulator(clock=clock, variants={"destroy_linger_s": 30, "destroy_linger_status": "destroying"},
                  catalog=[{"id": 1, "dph_base": 3.6, "storage_cost": 0.0}]) as emu:
        status, made, _ = call(emu, "PUT", "/api/v0/asks/1/", {"image": "x", "label": "l"})
        iid = made["new_contract"]
        clock.advance(10)
        assert call(emu, "DELETE", f"/api/v0/instances/{iid}/")[0] == 200
        clock.advance(20)
        row = show(emu, iid)
        assert row["actual_status"] == "destroying" and row["cur_state"] == "unloaded" and "ports" not in row
        _, page, _ = call(emu, "GET", "/api/v1/instances/")
        assert [r["id"] for r in page["instances"]] == [iid] and page["label_counts"] == {"l": 1}
        assert emu.meter()["total_usd"] == pytest.approx(0.01), "billing stopped at the destroy"
        assert call(emu, "DELETE", f"/api/v0/instances/{iid}/")[0] == 200, "destroying it again is fine"
        assert call(emu, "GET", "/api/v0/users/current", key=made["instance_api_key"])[0] == 401
        clock.advance(10)
        assert show(emu, iid) is None and emu.instances() == []
        assert call(emu, "DELETE", f"/api/v0/instances/{iid}/")[0] == 404


def test_boots_stall_in_created_scheduling_or_frozen_on_the_chosen_hosts() -> None:
    with emulator(variants={"boot_stall": "created", "boot_stall_hosts": "offers:1000001"}) as emu:
        stuck, fine = rent(emu, 1000001), rent(emu, 1000002)
        wait_status(emu, fine, "running")
        time.sleep(0.2)
        row = show(emu, stuck)
        assert row["actual_status"] == "created" and "OCI runtime create failed" in row["status_msg"]
        assert row["intended_status"] == "running"
        emu.variants.set(boot_stall="scheduling", boot_stall_hosts="all", boot_stall_s=1.0)
        later = rent(emu, 1000003)
        assert wait_status(emu, later, "scheduling", 1)["status_msg"].startswith("Scheduling")
        wait_status(emu, later, "running", 5)
        # a restart after a stop stalls as well (Vast: its GPU may have gone to someone else)
        call(emu, "PUT", f"/api/v0/instances/{later}/", {"state": "stopped"})
        emu.variants.set(boot_stall="frozen", boot_stall_s=math.inf)
        call(emu, "PUT", f"/api/v0/instances/{later}/", {"state": "running"})
        assert wait_status(emu, later, "frozen", 1)["status_msg"] == "Instance frozen by the host"


@pytest.mark.parametrize(("intended", "msg"), [("running", None), ("stopped", "")])
def test_outbid_rows(intended: str, msg: str | None) -> None:
    variants = {"outbid_intended": intended} | ({} if msg is None else {"outbid_msg": msg})
    with emulator(variants=variants) as emu:
        offer = search(emu, id={"eq": 1000004}, type="bid")[0]
        bid = rent(emu, 1000004, price=offer["min_bid"])
        wait_status(emu, bid, "running")
        emu.faults.preempt(bid)
        row = show(emu, bid)
        assert row["actual_status"] == "stopped" and row["intended_status"] == intended
        if msg is None:
            assert "outbid" in row["status_msg"]
        else:
            assert "outbid" not in (row["status_msg"] or ""), "no hint: the message is what it was"


# --------------------------------------------------------------------------- HTTP protocol
def test_retry_after_on_every_429_when_asked(emulator_rate_limited: Emulator) -> None:
    emu = emulator_rate_limited
    emu.variants.set(retry_after_s=2)
    assert call(emu, "GET", "/api/v1/instances/")[0] == 200
    status, text, headers = call(emu, "GET", "/api/v1/instances/")
    assert status == 429 and headers["Retry-After"] == "2" and "threshold=1.0" in text
    emu.faults.fail_next("show", status=429)
    status, _, headers = call(emu, "GET", "/api/v0/instances/1/")
    assert status == 429 and headers["Retry-After"] == "2"
    emu.variants.set(retry_after_s=None)
    time.sleep(1.05)
    call(emu, "GET", "/api/v1/instances/")
    assert "Retry-After" not in call(emu, "GET", "/api/v1/instances/")[2]


def no_redirects(emu: Emulator, method: str, path: str, key: str | None = None) -> tuple[int, dict[str, str]]:
    """(status, headers) of one call that does not follow a redirect."""
    class Stop(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    req = urllib.request.Request(emu.url + path, method=method, headers=headers,
                                 data=None if method == "GET" else b"{}")
    try:
        with urllib.request.build_opener(Stop).open(req, timeout=10) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_trailing_slash_strict_and_same_origin_redirects() -> None:
    with emulator(variants={"trailing_slash": "strict", "missing_route": "html"}) as emu:
        status, body, _ = call(emu, "GET", "/api/v0/users/current")
        assert status == 404 and "404 Not Found" in body
        assert call(emu, "GET", "/api/v0/users/current/")[0] == 200
        assert call(emu, "GET", "/_emulator/meter")[0] == 200, "the emulator's own routes are not Vast's"
        for code in (301, 308):
            emu.variants.set(trailing_slash=f"redirect_{code}")
            status, headers = no_redirects(emu, "GET", "/api/v0/instances?owner=me")
            assert (status, headers["Location"]) == (code, "/api/v0/instances/?owner=me")
            assert no_redirects(emu, "PUT", "/api/v0/asks/1000001")[0] == code, "before auth, as middleware does"
            assert no_redirects(emu, "GET", "/api/v0/users/current/", key=emu.api_key)[0] == 200
            status, body, _ = call(emu, "GET", "/api/v0/users/current")  # urllib follows, same origin
            assert status == 200 and body["balance"] == 100.0
        assert no_redirects(emu, "GET", "/api/v0/nothing/here")[0] == 401, "unknown routes are not redirected"


def test_off_origin_redirects_show_who_followed_with_the_key() -> None:
    with emulator(variants={"trailing_slash": "off_origin"}) as emu:
        status, headers = no_redirects(emu, "GET", "/api/v0/users/current")
        assert status == 301 and headers["Location"] == emu.off_origin_url + "/api/v0/users/current/"
        assert emu.off_origin_url != emu.url and emu.off_origin_url.startswith("http://127.0.0.1:")
        assert no_redirects(emu, "GET", "/api/v0/users/current/", key=emu.api_key)[0] == 200
        # urllib follows and carries the Authorization header to the other origin: a leak
        assert call(emu, "GET", "/api/v0/users/current")[0] == 404
        followed = [r for r in emu.requests if r["endpoint"] == "off_origin"]
        assert [(r["path"], r["key"]) for r in followed] == [("/api/v0/users/current/", "account")]
        emu.variants.set(trailing_slash="off_origin_all")
        status, headers = no_redirects(emu, "GET", "/api/v1/instances/?limit=5")
        assert status == 301 and headers["Location"] == emu.off_origin_url + "/api/v1/instances/?limit=5"


def test_onstart_longer_than_the_limit_is_refused() -> None:
    with emulator(variants={"onstart_max_chars": 4048}) as emu:
        rent(emu, 1000001, onstart="x" * 4048)
        status, body, _ = call(emu, "PUT", "/api/v0/asks/1000002/", {"image": "x", "onstart": "x" * 4049})
        assert status == 400 and body["error"] == "invalid_args" and "4049 characters; the limit is 4048" in body["msg"]
        status, body = bulk_create(emu, [1000002, 1000003], onstart="y" * 5000)
        assert status == 200 and [r["success"] for r in body["results"]] == [False, False]
        emu.variants.set(onstart_max_chars=None)
        rent(emu, 1000002, onstart="x" * 20000)


# --------------------------------------------------------------------------- what a sandbox is asked to be
def test_host_variants_reach_the_runtime_and_a_reboot_mends_the_proxy() -> None:
    runtime = ScriptedRuntime()
    offers = [{"id": 1, "machine_id": 11, "cpu_cores_effective": 6.5, "cpu_ram": 32768},
              {"id": 2, "machine_id": 12, "cpu_cores_effective": 500, "cpu_ram": 4096}]
    with Emulator(runtime=runtime, rate_limits=False, boot_delay_s=0, catalog=offers, variants={
            "direct_blocked": "machines:11", "direct_blocked_ports": "all", "direct_blocked_mode": "refuse",
            "proxy_broken": "machines:11", "proxy_broken_mode": "dead", "ssh_env": "image",
            "container_api_key": "absent", "cpu_view": "honest"}) as emu:
        blocked = rent(emu, 1, env={"-p 8786:8786": "1"}, runtype="ssh_direc ssh_proxy")
        plain = rent(emu, 2)
        wait_status(emu, blocked, "running")
        wait_status(emu, plain, "running")
        spec = {s.instance_id: s for s in runtime.specs}
        assert spec[blocked].quirks.blocked_ports == (22, 8786) and spec[blocked].quirks.blocked_mode == "refuse"
        assert spec[blocked].quirks.proxy == "dead" and spec[plain].quirks.proxy == "ok"
        assert spec[plain].quirks.blocked_ports == ()
        assert spec[blocked].quirks.ssh_env == "image" and spec[blocked].quirks.cpu_view == (6, 32768)
        assert "CONTAINER_API_KEY" not in spec[blocked].env and spec[blocked].env["CONTAINER_ID"] == str(blocked)
        assert show(emu, blocked)["ports"]["22/tcp"], "Vast still lists a blocked host's ports"
        call(emu, "PUT", f"/api/v0/instances/reboot/{blocked}/")
        wait_status(emu, blocked, "running")
        assert runtime.specs[-1].quirks.proxy == "ok", "one reboot mends the proxy"
        assert runtime.specs[-1].quirks.blocked_ports == (22, 8786), "a blocked host stays blocked"
        emu.variants.set(cpu_view="soft")
        call(emu, "PUT", f"/api/v0/instances/reboot/{plain}/")
        wait_status(emu, plain, "running")
        assert runtime.specs[-1].quirks.cpu_view == (1000, 1024 * 1024), "soft: always bigger than the offer"
