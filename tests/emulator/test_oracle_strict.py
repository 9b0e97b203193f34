"""The official ``vastai`` CLI (1.9.1) against the strict profile: where it copes, and where it shows.

The oracle's own tests run again under the strict profile, less the lingering rows
(they assert that a destroyed instance is gone at once, which strict contradicts on
purpose); the rest shows what the CLI makes of each strict variant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dask_vastai.emulator import Emulator
from tests.emulator import test_oracle as oracle_tests

pytestmark = pytest.mark.oracle


@pytest.fixture
def strict() -> Iterator[Emulator]:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0, profile="strict") as emu:
        yield emu


@pytest.mark.parametrize("test", [
    oracle_tests.test_search_offers_filters_orders_and_prints,
    oracle_tests.test_rent_show_label_logs_stop_start_destroy,
    oracle_tests.test_bad_key_is_refused_with_vasts_message,
    oracle_tests.test_sdk_functions_against_the_emulator,
    oracle_tests.test_launch_instance_rents_the_best_match,
], ids=lambda t: t.__name__.removeprefix("test_"))
def test_the_oracle_tests_pass_under_strict(oracle, strict: Emulator, test) -> None:
    strict.variants.set(destroy_linger_s=0)
    test(oracle, strict)


def test_what_the_cli_makes_of_the_strict_variants(oracle, strict: Emulator) -> None:
    strict.variants.set(destroy_linger_s=60)  # longer than strict's 5 s: CLI runs are slow on a busy machine
    # /users/current without the slash: the CLI follows the same-origin redirect with its key
    assert json.loads(oracle.cli("show", "user", "--raw", emu=strict).stdout)["balance"] == 100.0
    # bulk create answering a bare success: the CLI prints it and cannot say what it rented
    out = oracle.cli("create", "instances", "1000001", "1000002", "1000003", "--image", "img", emu=strict).stdout
    assert "{'success': True}" in out and len(strict.instances()) == 3
    made = [str(r["id"]) for r in strict.instances()]
    out = oracle.cli("destroy", "instances", "-y", *made, emu=strict).stdout
    assert "destroying instance" in out
    rows = json.loads(oracle.cli("show", "instances", "--raw", emu=strict).stdout)
    assert len(rows) == 3, "destroyed rows linger, survivors run on: the CLI lists both"
    survivors = [r["id"] for r in rows if r["cur_state"] != "unloaded"]
    assert all(strict.variants.picks("bulk_destroy_survivors", i) for i in survivors)
    # the onstart limit, in the CLI's words
    proc = oracle.cli("create", "instance", "1000004", "--image", "img", "--onstart-cmd", "x" * 4049, emu=strict)
    assert "Failed with error 400" in proc.stdout + proc.stderr and "the limit is 4048" in proc.stdout + proc.stderr
    # an off-origin redirect: the CLI follows, but without the key
    strict.variants.set(trailing_slash="off_origin")
    oracle.cli("show", "user", "--raw", emu=strict, check=False)
    followed = [r for r in strict.requests if r["endpoint"] == "off_origin"]
    assert followed and all(r["key"] is None for r in followed)
