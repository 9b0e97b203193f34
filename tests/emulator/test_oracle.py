"""The official ``vastai`` CLI (1.9.1) drives the emulator unchanged, as a user would."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.oracle


def raw(oracle, *args: str, emu) -> object:
    """``vastai ... --raw`` parsed."""
    out = oracle.cli(*args, "--raw", emu=emu).stdout
    return json.loads(out)


def test_search_offers_filters_orders_and_prints(oracle, emulator) -> None:
    offers = raw(oracle, "search", "offers", "gpu_name=RTX_3090 num_gpus>=2", "-o", "dph_total", emu=emulator)
    assert offers and all(o["gpu_name"] == "RTX 3090" and o["num_gpus"] >= 2 for o in offers)
    assert [o["dph_total"] for o in offers] == sorted(o["dph_total"] for o in offers)
    assert all(o["verified"] and o["rentable"] and not o["external"] for o in offers), "the CLI's default filters"
    eu = raw(oracle, "search", "offers", "geolocation in [DE,PL] reliability>0.98 cpu_ram>=64", emu=emulator)
    assert eu and {o["geolocation"][-2:] for o in eu} <= {"DE", "PL"}
    assert all(o["reliability"] > 0.98 and o["cpu_ram"] >= 64000 for o in eu)
    table = oracle.cli("search", "offers", "gpu_name=H100_SXM", emu=emulator).stdout
    assert "H100_SXM" in table and "invalid return Content-Type" not in table
    storage = raw(oracle, "search", "offers", "id=1000001", "--storage", "720", emu=emulator)[0]
    assert storage["dph_total"] == pytest.approx(storage["dph_base"] + storage["storage_cost"], abs=1e-6)


def test_rent_show_label_logs_stop_start_destroy(oracle, emulator) -> None:
    offer = raw(oracle, "search", "offers", "gpu_name=RTX_4090 num_gpus=1", "-o", "dph_total", emu=emulator)[0]
    out = oracle.cli("create", "instance", str(offer["id"]), "--image", "vastai/base:latest", "--label", "dask-w1",
                     "--onstart-cmd", "echo hello", "--env", "-p 8786:8786 -e FOO=bar", "--disk", "20",
                     "--raw", emu=emulator).stdout
    created = json.loads(out)
    iid = created["new_contract"]
    assert created["success"] and created["instance_api_key"]
    # the offer is single-use: gone from search while rented
    ids = {o["id"] for o in raw(oracle, "search", "offers", "gpu_name=RTX_4090", emu=emulator)}
    assert offer["id"] not in ids
    rows = raw(oracle, "show", "instances", emu=emulator)
    assert [r["id"] for r in rows] == [iid]
    row = rows[0]
    assert row["label"] == "dask-w1" and row["extra_env"]["FOO"] == "bar" and row["image_uuid"] == "vastai/base:latest"
    assert row["actual_status"] == "running" and "8786/tcp" in row["ports"] and row["onstart"] == "echo hello"
    one = raw(oracle, "show", "instance", str(iid), emu=emulator)
    assert one["id"] == iid and one["dph_total"] == pytest.approx(offer["dph_base"] + offer["storage_cost"] * 20 / 720, rel=1e-4)
    table = oracle.cli("show", "instances", "--no-color", emu=emulator).stdout
    assert "Total: 1 instances" in table and "dask-w1" in table and "running" in table
    assert "record-only runtime" in oracle.cli("logs", str(iid), emu=emulator).stdout
    oracle.cli("label", "instance", str(iid), "renamed", emu=emulator)
    oracle.cli("stop", "instance", str(iid), emu=emulator)
    assert raw(oracle, "show", "instance", str(iid), emu=emulator)["actual_status"] == "stopped"
    oracle.cli("start", "instance", str(iid), emu=emulator)
    row = raw(oracle, "show", "instance", str(iid), emu=emulator)
    assert row["label"] == "renamed" and row["actual_status"] in (None, "loading", "running")
    oracle.cli("destroy", "instance", str(iid), "-y", emu=emulator)
    assert raw(oracle, "show", "instances", emu=emulator) == []
    assert raw(oracle, "show", "instance", str(iid), emu=emulator) == {"instances": None}
    ids = {o["id"] for o in raw(oracle, "search", "offers", "gpu_name=RTX_4090", emu=emulator)}
    assert offer["id"] in ids, "a destroyed rental's offer is listed again"


def test_bad_key_is_refused_with_vasts_message(oracle, emulator) -> None:
    proc = oracle.cli("show", "instances", emu=emulator, api_key="not-the-key", check=False)
    assert "Failed with error 401: Invalid user key" in proc.stderr
    assert not [r for r in emulator.requests if r["status"] == 200]


def test_sdk_functions_against_the_emulator(oracle, emulator) -> None:
    """The SDK's own parsing of our rows (it crashes on rows without start_date/extra_env)."""
    code = f"""
import json
from vastai import VastAI
v = VastAI(api_key={emulator.api_key!r}, server_url={emulator.url!r})
offers = v.search_offers(query="gpu_name=RTX_3090 num_gpus=1 reliability>0.98 datacenter=true", order="dph_total", limit=3, storage=40)
made = v.create_instance(id=offers[0]["id"], image="img", disk=40, label="sdk", cancel_unavail=True, runtype="ssh_proxy")
rows = v.show_instances()
one = v.show_instance(id=made["new_contract"])
logs = v.logs(instance_id=made["new_contract"], tail="5")
gone = v.destroy_instance(id=made["new_contract"])
print(json.dumps({{"n": len(offers), "dc": [o["datacenter"] for o in offers], "made": made["success"],
                   "rows": [r["label"] for r in rows], "one": one["id"] == made["new_contract"],
                   "logs": logs, "gone": gone, "after": v.show_instance(id=made["new_contract"])}}))
"""
    result = oracle.sdk(code)
    assert result["n"] == 3 and result["dc"] == [True] * 3 and result["made"]
    assert result["rows"] == ["sdk"] and result["one"] and "record-only" in result["logs"]
    assert result["gone"] == {"success": True} and result["after"] is None


def test_launch_instance_rents_the_best_match(oracle, emulator) -> None:
    made = raw(oracle, "launch", "instance", "-g", "RTX_3090", "-n", "1", "-i", "img", "--region", "[US,CA,JP]",
               "-o", "dph_total", emu=emulator)
    row = emulator.instances()[0]
    assert made["new_contract"] == row["id"] and (row["gpu_name"], row["num_gpus"]) == ("RTX 3090", 1)
    assert row["geolocation"][-2:] in ("US", "CA", "JP")
    cheapest = min(o["dph_base"] for o in emulator.offers if o["gpu_name"] == "RTX 3090" and o["num_gpus"] == 1
                   and o["geolocation"][-2:] in ("US", "CA", "JP") and o["verified"])
    assert row["dph_base"] == cheapest
    # the catalog's 8x H100 machines are in Europe
    out = oracle.cli("launch", "instance", "-g", "H100_SXM", "-n", "8", "-i", "img", "--region", "[US,CA,JP]",
                     emu=emulator).stdout
    assert "404" in out and len(emulator.instances()) == 1
