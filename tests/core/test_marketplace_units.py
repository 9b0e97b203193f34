"""The pure parts of surviving Vast's unknowns: how answers are read, how boxes are sized, what
the packages need, what a bug report may hold, and how two processes share one schedule."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from dask_vastai.environment import CudaVersion, driver_cuda, required_cuda
from dask_vastai.exceptions import OfferUnavailable
from dask_vastai.instance import instance_size
from dask_vastai.offers import OfferRequirements
from dask_vastai.vast import Instance, Offer
from dask_vastai.vast.bulk import place_rows, read_bulk_create
from dask_vastai.vast.pacing import SharedSchedule
from dask_vastai.vast.recording import ResponseRecorder, redact

CHUNK = [101, 102, 103]


# --------------------------------------------------------------------------- bulk answers
def test_per_offer_results_are_complete_and_say_which_offer_became_which_rental() -> None:
    answer = read_bulk_create(CHUNK, 200, {"success": True, "results": [
        {"ask_id": 103, "success": True, "new_contract": 9003},
        {"ask_id": 101, "success": True, "new_contract": 9001},
        {"ask_id": 102, "success": False, "error": "no_such_ask", "msg": "gone"}]})
    assert answer.complete and {o: c.instance_id for o, c in answer.created.items()} == {101: 9001, 103: 9003}
    assert isinstance(answer.refused[102], OfferUnavailable)


@pytest.mark.parametrize(("status", "body", "unplaced", "note"), [
    (200, {"success": True}, [], "no per-offer results"),
    (200, {"success": True, "new_contracts": [9001, 9002]}, [9001, 9002], "without their offers"),
    (200, [9001, 9002, 9003], [9001, 9002, 9003], "bare list"),
    (202, "queued", [], "no known shape"),
    (200, {"success": True, "results": [{"ask_id": 101, "success": True, "new_contract": 9001}]}, [], "untold"),
])
def test_answers_that_do_not_place_every_rental_are_incomplete(status: int, body: object, unplaced: list[int],
                                                               note: str) -> None:
    answer = read_bulk_create(CHUNK, status, body)
    assert not answer.complete and not answer.unusable
    assert answer.unplaced_ids == unplaced and note in answer.note


def test_no_such_ask_refuses_the_call_and_any_other_refusal_makes_the_route_unusable() -> None:
    gone = read_bulk_create(CHUNK, 404, {"success": False, "error": "no_such_ask", "ask_id": 101})
    assert set(gone.refused) == set(CHUNK) and not gone.unusable
    for status, body in [(404, "<html>404 Not Found</html>"), (405, ""), (400, {"error": "invalid_args"}),
                         (404, {"error": "not_found"})]:
        answer = read_bulk_create(CHUNK, status, body)
        assert answer.unusable and str(status) in answer.unusable


def _row(i: int, machine: int | None) -> Instance:
    return Instance.from_json({"id": i, "machine_id": machine, "label": "l"})


def test_rows_are_placed_on_offers_only_where_their_machine_says_so_unambiguously() -> None:
    offers = {101: {"machine_id": 1}, 102: {"machine_id": 2}, 103: {"machine_id": 2}}
    placed, elsewhere = place_rows([_row(9001, 1), _row(9002, 2), _row(9003, None)], offers)
    assert {o: r.id for o, r in placed.items()} == {101: 9001}, "machine 2 has two offers: ambiguous"
    assert sorted(r.id for r in elsewhere) == [9002, 9003]


# --------------------------------------------------------------------------- sizes
def _record(offer_cpus: float, offer_ram_mb: float, row: dict | None = None) -> SimpleNamespace:
    offer = Offer.from_json({"id": 1, "cpu_cores_effective": offer_cpus, "cpu_ram": offer_ram_mb})
    return SimpleNamespace(offer=offer, instance=Instance.from_json({"id": 7, **row}) if row else None)


def test_a_box_is_sized_by_the_smaller_of_what_it_shows_and_what_was_rented() -> None:
    soft = {"cpus": 384.0, "memory_bytes": 1024 * 2**30}
    assert instance_size(soft, _record(16, 65536)) == (16.0, 65536 * 2**20)  # type: ignore[arg-type]
    small = {"cpus": 2.0, "memory_bytes": 8 * 2**30}
    assert instance_size(small, _record(16, 65536)) == (2.0, 8 * 2**30)  # type: ignore[arg-type]
    # the rental's own row is the offer's word once it is listed
    row = {"cpu_cores_effective": 8, "cpu_ram": 32768}
    assert instance_size(soft, _record(16, 65536, row)) == (8.0, 32768 * 2**20)  # type: ignore[arg-type]
    assert instance_size({"cpus": 0, "memory_bytes": None}, _record(4, 1024)) == (4.0, 1024 * 2**20)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CUDA
def test_a_cuda_build_of_torch_says_which_cuda_the_driver_must_support() -> None:
    assert required_cuda(["torch==2.4.0+cu121", "numpy"]) == (CudaVersion(12, 1), "torch==2.4.0+cu121")
    assert required_cuda(["torchvision==0.19.0+cu118"], ["--index-url", "https://download.pytorch.org/whl/cu126"]) \
        == (CudaVersion(12, 6), "the PyTorch wheel index for cu126")  # named: pip_args may hold a token
    assert required_cuda(["torch==2.4.0", "jax[cuda12]"]) is None
    assert required_cuda(["torch==2.4.0+cpu"]) is None
    assert driver_cuda("| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4   |") == CudaVersion(12, 4)
    assert driver_cuda("nvidia-smi: command not found") is None
    assert CudaVersion.parse("12.10") > CudaVersion.parse("12.9")


def test_the_offer_query_asks_for_that_cuda_unless_the_user_asked_for_more() -> None:
    assert OfferRequirements(gpu="RTX_3090", min_cuda="12.1").query_text().endswith("cuda_max_good>=12.1")
    stricter = OfferRequirements(gpu="RTX_3090", min_cuda="12.1", query="cuda_max_good>=12.6")
    assert stricter.query_text().count("cuda_max_good") == 1 and stricter.filters()["cuda_max_good"] == {"gte": "12.6"}
    looser = OfferRequirements(gpu="RTX_3090", min_cuda="12.1", query="cuda_max_good>=11.8")
    assert looser.filters()["cuda_max_good"] == {"gte": "12.1"}


# --------------------------------------------------------------------------- the bug report
def test_the_recorder_keeps_one_example_per_shape_and_nothing_personal(tmp_path: Path) -> None:
    path = tmp_path / "shapes.jsonl"
    recorder = ResponseRecorder(path)
    row = {"id": 7000001, "public_ipaddr": "203.0.113.9", "ssh_host": "ssh4.vast.ai", "label": "dask-vastai:c:w",
           "onstart": "K='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq c'", "status_msg": "at 10.1.2.3:40022"}
    recorder.record("GET", "/api/v1/instances/", 200, {"instances": [row, {**row, "id": 7000002}] * 3})
    recorder.record("GET", "/api/v1/instances/", 200, {"instances": [row]})  # the same shape: not again
    recorder.record("PUT", "/asks/1000001/", 200, {"success": True, "new_contract": 7, "instance_api_key": "s3cr3t"})
    recorder.record("GET", "/users/current/", 200, {"email": "me@example.com", "balance": 12.5, "id": 3})
    ResponseRecorder(path).record("PUT", "/asks/1000002/", 200, {"success": True, "new_contract": 8,
                                                                 "instance_api_key": "other"})  # another process
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["method"], e["path"]) for e in entries] == [
        ("GET", "/api/v1/instances/"), ("PUT", "/asks/{id}/"), ("GET", "/users/current/")]
    text = path.read_text()
    for secret in ("203.0.113.9", "10.1.2.3", "AAAAC3NzaC1lZDI1NTE5AAAAIHq", "s3cr3t", "me@example.com", "12.5"):
        assert secret not in text, secret
    assert len(entries[0]["example"]["instances"]) == 3, "two rows and a note of how many more"
    assert redact({"jupyter_token": "t", "nested": [{"api_key": "k"}]}) == {
        "jupyter_token": "<redacted>", "nested": [{"api_key": "<redacted>"}]}


# --------------------------------------------------------------------------- one account, many processes
def test_two_processes_take_turns_on_one_schedule(tmp_path: Path) -> None:
    a = SharedSchedule.for_account("https://console.vast.ai", "key", folder=tmp_path)
    b = SharedSchedule.for_account("https://console.vast.ai", "key", folder=tmp_path)
    other = SharedSchedule.for_account("https://console.vast.ai", "another key", folder=tmp_path)
    assert a is not None and b is not None and other is not None
    assert a.path == b.path != other.path and "key" not in a.path.name
    assert a.claim("create", "A", busy_s=30) == (0.0, False)
    wait, busy = b.claim("create", "B", busy_s=30)
    assert busy and wait > 25, "a call in flight elsewhere: wait for its answer"
    assert other.claim("create", "C", busy_s=30) == (0.0, False), "another account has its own"
    a.release("create", "A", interval_s=4.5)
    wait, busy = b.claim("create", "B", busy_s=30)
    assert not busy and 4.0 < wait <= 4.5, "the next call no sooner than the interval after the answer"
    b.hold("list", 2.0)
    assert 1.5 < a.claim("list", "A", busy_s=30)[0] <= 2.0, "a 429 seen by one holds the other back"
    time.sleep(0.01)
    assert a.claim("search", "A", busy_s=30) == (0.0, False)


def test_a_schedule_file_that_is_garbage_is_started_afresh(tmp_path: Path) -> None:
    a = SharedSchedule.for_account("u", "k", folder=tmp_path)
    assert a is not None
    a.path.write_text("{not json")
    assert a.claim("create", "A", busy_s=30) == (0.0, False)


# --------------------------------------------------------------------------- onstart
def test_an_onstart_over_vasts_limit_fails_at_construction_and_ours_stays_well_under() -> None:
    from dask_vastai import VastAICluster
    from dask_vastai.bootstrap import ONSTART_MAX_CHARS

    with pytest.raises(ValueError, match=f"over Vast's limit of {ONSTART_MAX_CHARS}"):
        VastAICluster(name="x" * 3000, api_key="k" * 20, api_url="http://127.0.0.1:9")  # nothing is called
    from dask_vastai.bootstrap import BootstrapConfig, onstart_script
    from dask_vastai.tunnel import ClusterKey

    key = ClusterKey.generate("dask-vastai-c0123abcd")
    config = BootstrapConfig("c0123abcd", key.public_openssh, "https://console.vast.ai", 600)
    script = onstart_script(config)
    assert len(script) < 0.85 * ONSTART_MAX_CHARS, f"{len(script)} characters: keep a margin for what may come"
    # the longest we make (a Python installed with uv) leaves room for a 100-character cluster name
    longest = onstart_script(replace(config, cluster_name="c" * 100, python_version="3.11"))
    assert len(longest) < ONSTART_MAX_CHARS, len(longest)
