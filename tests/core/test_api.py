"""``VastAPI`` against the emulator: what a user of the client sees.

Most tests run with the emulator's rate limits off and ``pace=False`` (they check what is
sent and read). The pacing tests turn Vast's limits on and check that no call is ever
refused: concurrent callers wait their turn. Retries are driven by the emulator's fault
injection, and by a small forwarding proxy for what the emulator cannot do (answers lost
after the call was carried out, slow answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dask_vastai.exceptions import (
    InstanceNotFound,
    InvalidAPIKey,
    MissingAPIKey,
    OfferUnavailable,
    RateLimited,
    VastRequestError,
    VastServerError,
    VastUnreachable,
)
from dask_vastai.offers import OfferRequirements
from dask_vastai.vast import CreatedInstance, CreateRequest, Instance, VastAPI

REQUEST = CreateRequest(image="vastai/pytorch", disk_gb=20, label="t:one", onstart="echo hi", ports=(8786,))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _calls(emu: Any, endpoint: str) -> list[dict[str, Any]]:
    return [r for r in emu.requests if r["endpoint"] == endpoint]


async def _offers(api: VastAPI, n: int, gpu: str = "RTX_3090") -> list[int]:
    offers = await api.search_offers(OfferRequirements(gpu=gpu).filters(), limit=n)
    assert len(offers) == n, f"the catalog has {len(offers)} {gpu} offers, the test wants {n}"
    return [o.id for o in offers]


# ----------------------------------------------------------------------------- the basic calls


def test_rent_watch_change_and_destroy_one_instance(emulator: Any) -> None:
    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            user = await api.current_user()
            assert "balance" in user
            offers = await api.search_offers("gpu_name=RTX_3090 num_gpus=1", order="dph_total", limit=5)
            assert offers and all(o.gpu_name == "RTX 3090" and o.num_gpus == 1 for o in offers)
            assert [o.dph_total for o in offers] == sorted(o.dph_total for o in offers)
            offer = offers[0]

            rental = await api.create_instance(offer.id, REQUEST)
            assert isinstance(rental, CreatedInstance) and rental.offer_id == offer.id
            assert rental.instance_api_key  # Vast's instance-scoped key

            shown = await api.show_instance(rental.instance_id)
            assert isinstance(shown, Instance) and shown.label == "t:one"
            listed = await api.list_instances(label_prefix="t:")
            assert [i.id for i in listed] == [rental.instance_id]
            assert await api.list_instances(label_prefix="other:") == []

            await api.label_instance(rental.instance_id, "t:renamed")
            await api.set_state(rental.instance_id, "stopped")
            row = await api.show_instance(rental.instance_id)
            assert row is not None and row.label == "t:renamed" and row.intended_status == "stopped"
            await api.set_state(rental.instance_id, "running")
            await api.reboot_instance(rental.instance_id)
            assert isinstance(await api.logs(rental.instance_id, tail=10), str)

            assert await api.destroy_instance(rental.instance_id) is True
            assert await api.destroy_instance(rental.instance_id) is False  # already gone
            assert await api.show_instance(rental.instance_id) is None
        assert emulator.instances() == []

    run(main())


def test_a_running_rental_has_ports_and_ssh_endpoints(emulator: Any) -> None:
    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            [offer_id] = await _offers(api, 1)
            rental = await api.create_instance(offer_id, REQUEST)
            deadline = time.monotonic() + 10
            row = await api.show_instance(rental.instance_id)
            while row is not None and row.actual_status != "running":
                assert time.monotonic() < deadline, f"instance never ran: {row}"
                await asyncio.sleep(0.1)
                row = await api.show_instance(rental.instance_id)
            assert row is not None
            assert row.direct_ssh() is not None or row.proxy_ssh() is not None
            if row.direct_ssh() is not None:
                host, port = row.direct_ssh()  # type: ignore[misc]
                assert host == row.public_ipaddr and port == row.ports[22]
            assert 8786 in row.ports  # asked for with ports=(8786,)
            await api.destroy_instance(rental.instance_id)

    run(main())


def test_a_taken_offer_says_so_with_its_id(emulator: Any) -> None:
    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            [offer_id] = await _offers(api, 1)
            first = await api.create_instance(offer_id, REQUEST)
            with pytest.raises(OfferUnavailable) as e:
                await api.create_instance(offer_id, REQUEST)
            assert e.value.offer_id == offer_id and str(offer_id) in str(e.value)
            await api.destroy_instance(first.instance_id)

    run(main())


def test_bulk_create_gives_one_result_per_offer_in_order(emulator: Any) -> None:
    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            ids = await _offers(api, 4)
            taken = await api.create_instance(ids[1], REQUEST)
            results = await api.create_instances(ids, REQUEST)
            assert [type(r) for r in results] == [CreatedInstance, OfferUnavailable, CreatedInstance, CreatedInstance]
            assert [r.offer_id for r in results] == ids  # type: ignore[union-attr]
            rented = [r.instance_id for r in results if isinstance(r, CreatedInstance)] + [taken.instance_id]
            assert sorted(i.id for i in await api.list_instances()) == sorted(rented)
            await api.destroy_instances([*rented, 999_999])  # an id already gone is fine
            assert await api.list_instances() == []
        assert len(_calls(emulator, "create")) == 2  # one single, one bulk

    run(main())


# ----------------------------------------------------------------------------- the key


def test_a_rejected_key_never_shows_itself(emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-not-the-right-key-0123456789abcd"
    caplog.set_level(logging.DEBUG, logger="dask_vastai.vast")

    async def main() -> None:
        async with VastAPI(secret, emulator.url, pace=False) as api:
            assert secret not in repr(api) and "***abcd" in repr(api)
            with pytest.raises(InvalidAPIKey) as e:
                await api.current_user()
            text = "".join(traceback.format_exception(e.value))
            assert "Vast rejected the API key ***abcd" in str(e.value)
            assert "Invalid user key" in str(e.value)  # Vast's own message
            assert e.value.status == 401 and e.value.error == "auth_error"
            assert secret not in text and secret not in repr(e.value)

    run(main())
    assert caplog.records, "each call is logged at debug level"
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert any("GET /users/current/ -> 401" in r.getMessage() for r in caplog.records)  # Vast's route


@pytest.fixture
def no_key_anywhere(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("DASK_VASTAI__API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_missing_key_says_where_it_looked_and_how_to_set_one(no_key_anywhere: Any) -> None:
    with pytest.raises(MissingAPIKey) as e:
        VastAPI(api_url="http://127.0.0.1:9")
    message = str(e.value)
    assert "VAST_API_KEY" in message
    assert str(no_key_anywhere / "xdg" / "vastai" / "vast_api_key") in message
    assert str(no_key_anywhere / "home" / ".vast_api_key") in message
    assert "export VAST_API_KEY" in message


def test_the_key_is_found_where_the_vastai_cli_keeps_it(
    no_key_anywhere: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    home_file = no_key_anywhere / "home" / ".vast_api_key"
    home_file.parent.mkdir(parents=True)
    home_file.write_text("wrong-key-in-home-000000\n")
    xdg_file = no_key_anywhere / "xdg" / "vastai" / "vast_api_key"
    xdg_file.parent.mkdir(parents=True)
    xdg_file.write_text(emulator.api_key + "\n")

    async def user(api: VastAPI) -> dict:
        async with api:
            return await api.current_user()

    assert "balance" in run(user(VastAPI(api_url=emulator.url, pace=False)))  # XDG file first
    xdg_file.unlink()
    with pytest.raises(InvalidAPIKey, match=r"from .*\.vast_api_key"):  # then ~/.vast_api_key
        run(user(VastAPI(api_url=emulator.url, pace=False)))
    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)  # the environment wins over files
    assert "balance" in run(user(VastAPI(api_url=emulator.url + "/", pace=False)))


def test_api_url_is_stripped_and_checked() -> None:
    assert VastAPI("k" * 20, "http://127.0.0.1:9///").api_url == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="not an http"):
        VastAPI("k" * 20, "127.0.0.1:9")
    with pytest.raises(ValueError, match="must not carry a query"):
        VastAPI("k" * 20, "http://127.0.0.1:9/?api_key=secret")


# ----------------------------------------------------------------------------- retries


def test_429_and_5xx_are_retried_until_success(emulator: Any) -> None:
    emulator.faults.fail_next("list", 2, 503)
    emulator.faults.fail_next("search", 1, 429)
    emulator.faults.fail_next("destroy", 1, 502)

    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False, backoff_s=0.05,
                           min_intervals_s={"search": 0.1}) as api:
            assert await api.list_instances() == []
            [offer_id] = await _offers(api, 1)
            rental = await api.create_instance(offer_id, REQUEST)
            assert await api.destroy_instance(rental.instance_id) is True

    run(main())
    assert [r["status"] for r in _calls(emulator, "list")] == [503, 503, 200]
    assert [r["status"] for r in _calls(emulator, "search")] == [429, 200]
    assert [r["status"] for r in _calls(emulator, "destroy")] == [502, 200]


def test_429_waits_at_least_the_endpoint_threshold(emulator: Any) -> None:
    emulator.faults.fail_next("show", 1, 429)  # a bare "API requests too frequent"

    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            assert await api.show_instance(1) is None

    run(main())
    first, second = _calls(emulator, "show")
    assert first["status"] == 429 and second["status"] != 429
    assert second["time"] - first["time"] >= 2.0  # Vast's threshold for show is 2 s


def test_429_waits_at_least_the_threshold_vast_names(emulator_rate_limited: Any) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        # Unpaced, and told nothing of show's threshold: only the 429 body names it.
        async with VastAPI(emu.api_key, emu.url, pace=False, min_intervals_s={"show": 0.0}) as api:
            assert await asyncio.gather(api.show_instance(1), api.show_instance(2)) == [None, None]

    run(main())
    statuses = [r["status"] for r in _calls(emu, "show")]
    assert statuses.count(429) == 1 and len(statuses) == 3
    _assert_paced(emu, "show", 2.0)


def test_after_max_attempts_the_error_is_clear(emulator: Any) -> None:
    emulator.faults.fail_next("list", 3, 503)
    emulator.faults.fail_next("user", 2, 429)

    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False, max_attempts=3, backoff_s=0.01,
                           min_intervals_s={"user": 0.05}) as api:
            with pytest.raises(VastServerError) as e:
                await api.list_instances()
            assert e.value.status == 503 and "503" in str(e.value) and "3 times" in str(e.value)
            api.max_attempts = 2
            with pytest.raises(RateLimited, match="too frequent"):
                await api.current_user()

    run(main())


def test_an_unreachable_server_is_named(unused_tcp_port: int) -> None:
    async def main() -> None:
        async with VastAPI("k" * 20, f"http://127.0.0.1:{unused_tcp_port}", pace=False, max_attempts=3,
                           backoff_s=0.01) as api:
            with pytest.raises(VastUnreachable) as e:
                await api.list_instances()
            assert f"http://127.0.0.1:{unused_tcp_port}" in str(e.value) and "3 attempts" in str(e.value)

    run(main())


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakyProxy:
    """Forwards to the emulator; ``rules[(method, path fragment)]`` is a list of faults to apply
    to the next matching calls: ``"slow"`` (answer after ``slow_s``), ``"lost504"`` (carry the
    call out, then answer 504 as a gateway that lost the answer would), ``"drop"`` (close the
    connection without forwarding), ``"lostdrop"`` (carry the call out, then close)."""

    def __init__(self, target: str, slow_s: float = 2.0) -> None:
        self.target = target
        self.slow_s = slow_s
        self.rules: dict[tuple[str, str], list[str]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def _take(self, request: web.Request) -> str | None:
        for (method, fragment), faults in self.rules.items():
            if request.method == method and fragment in request.path and faults:
                return faults.pop(0)
        return None

    async def _forward(self, request: web.Request) -> web.Response:
        fault = self._take(request)
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with aiohttp.ClientSession() as s, s.request(
            request.method, self.target + request.path_qs, data=await request.read(), headers=headers
        ) as r:
            body = await r.read()
            if fault == "lost504":
                return web.Response(status=504, text="Gateway Timeout")
            if fault == "lostdrop":
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            return web.Response(status=r.status, body=body, content_type="application/json")

    async def __aenter__(self) -> FlakyProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def test_a_timed_out_call_is_retried(emulator: Any) -> None:
    async def main() -> None:
        async with FlakyProxy(emulator.url, slow_s=1.5) as proxy:
            proxy.rules[("GET", "/api/v1/instances")] = ["slow"]
            async with VastAPI(emulator.api_key, proxy.url, pace=False, request_timeout_s=0.5,
                               backoff_s=0.01) as api:
                started = time.monotonic()
                assert await api.list_instances() == []
                assert 0.5 <= time.monotonic() - started < 1.5

    run(main())


def test_a_create_whose_answer_is_lost_is_found_not_repeated(emulator: Any) -> None:
    async def main() -> None:
        async with FlakyProxy(emulator.url) as proxy:
            proxy.rules[("PUT", "/asks/")] = ["lost504"]
            async with VastAPI(emulator.api_key, proxy.url, pace=False) as api:
                [offer_id] = await _offers(api, 1)
                rental = await api.create_instance(offer_id, REQUEST)
                assert rental.offer_id == offer_id
                assert [i["id"] for i in emulator.instances()] == [rental.instance_id]
                await api.destroy_instance(rental.instance_id)

    run(main())
    assert len(_calls(emulator, "create")) == 1  # never sent twice


@pytest.mark.parametrize(("fault", "creates_seen"), [("drop", 1), ("lostdrop", 1)])
def test_a_create_whose_connection_drops_rents_exactly_once(emulator: Any, fault: str, creates_seen: int) -> None:
    async def main() -> None:
        async with FlakyProxy(emulator.url) as proxy:
            proxy.rules[("PUT", "/asks/")] = [fault]
            async with VastAPI(emulator.api_key, proxy.url, pace=False) as api:
                [offer_id] = await _offers(api, 1)
                rental = await api.create_instance(offer_id, REQUEST)
                assert [i["id"] for i in emulator.instances()] == [rental.instance_id]
                await api.destroy_instance(rental.instance_id)

    run(main())
    # "drop": never reached the emulator, so sent again; "lostdrop": carried out, found by label.
    assert len(_calls(emulator, "create")) == creates_seen


def test_a_create_answered_500_is_not_repeated_and_says_nothing_was_rented(emulator: Any) -> None:
    emulator.faults.fail_next("create", 1, 500)

    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False, ambiguous_create_grace_s=0.5) as api:
            [offer_id] = await _offers(api, 1)
            with pytest.raises(VastUnreachable, match="nothing was rented"):
                await api.create_instance(offer_id, REQUEST)

    run(main())
    assert len(_calls(emulator, "create")) == 1
    assert emulator.instances() == []


def test_a_bulk_create_whose_answer_is_lost_adopts_what_it_made_and_rents_nothing_twice(emulator: Any) -> None:
    async def main() -> None:
        async with FlakyProxy(emulator.url) as proxy:
            proxy.rules[("POST", "/asks/bulk")] = ["lost504"]
            async with VastAPI(emulator.api_key, proxy.url, pace=False, ambiguous_create_grace_s=0.5) as api:
                ids = await _offers(api, 3)
                results = await api.create_instances(ids, REQUEST)
                # found under the label and placed on their offers by machine: as if it had answered
                assert all(isinstance(r, CreatedInstance) and r.placed for r in results), results
                rows = {r["id"]: r for r in emulator.instances()}
                assert sorted(rows) == sorted(r.instance_id for r in results)  # type: ignore[union-attr]
                for offer_id, r in zip(ids, results, strict=True):
                    assert r.offer_id == offer_id  # type: ignore[union-attr]
                await api.destroy_instances([r.instance_id for r in results])  # type: ignore[union-attr]

    run(main())
    assert emulator.instances() == []
    assert len(_calls(emulator, "create")) == 1


# ----------------------------------------------------------------------------- pacing


def _gaps(emu: Any, endpoint: str) -> list[float]:
    times = [r["time"] for r in _calls(emu, endpoint) if r["status"] != 429]  # the accepted calls
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _assert_paced(emu: Any, endpoint: str, threshold_s: float) -> None:
    gaps = _gaps(emu, endpoint)
    assert all(g >= threshold_s - 0.02 for g in gaps), f"{endpoint} gaps {gaps} < {threshold_s}"


def test_concurrent_callers_wait_their_turn_instead_of_tripping_429(emulator_rate_limited: Any) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(emu.api_key, emu.url) as api:
            ids = await _offers(api, 3)
            rentals = await api.create_instances(ids, REQUEST)
            instance_ids = [r.instance_id for r in rentals if isinstance(r, CreatedInstance)]
            calls: list[Callable[[], Any]] = []
            calls += [api.list_instances for _ in range(4)]
            calls += [lambda i=i: api.show_instance(i) for i in instance_ids[:2]]
            calls += [lambda i=i: api.label_instance(i, f"t:{i}") for i in instance_ids]
            await asyncio.gather(*(c() for c in calls))
            await api.destroy_instances(instance_ids)

    started = time.monotonic()
    run(main())
    elapsed = time.monotonic() - started
    assert [r for r in emu.requests if r["status"] == 429] == []
    _assert_paced(emu, "list", 1.0)
    _assert_paced(emu, "show", 2.0)
    _assert_paced(emu, "update", 1.0)
    assert elapsed < 8, f"pacing took {elapsed:.1f}s; the longest queue is 3 calls of 1 s"


def test_bulk_rents_and_destroys_twenty_in_one_call_each(emulator_rate_limited: Any) -> None:
    emu = emulator_rate_limited

    async def main() -> float:
        async with VastAPI(emu.api_key, emu.url) as api:
            ids = await _offers(api, 20)
            started = time.monotonic()
            results = await api.create_instances(ids, REQUEST)
            assert all(isinstance(r, CreatedInstance) for r in results)
            assert len(emu.instances()) == 20
            await api.destroy_instances([r.instance_id for r in results])  # type: ignore[union-attr]
            return time.monotonic() - started

    elapsed = run(main())
    assert emu.instances() == []
    assert len(_calls(emu, "create")) == 1 and len(_calls(emu, "destroy")) == 1
    assert [r for r in emu.requests if r["status"] == 429] == []
    assert elapsed < 5, f"bulk create + destroy of 20 took {elapsed:.1f}s"


@pytest.mark.slow
def test_concurrent_single_creates_and_destroys_never_see_429(emulator_rate_limited: Any) -> None:
    # Six are as many as twenty for the pacing (each waits its turn behind the others) at a
    # third of the wall time: Vast's create interval is 4.5 s.
    emu, count = emulator_rate_limited, 6

    async def main() -> None:
        async with VastAPI(emu.api_key, emu.url) as api:
            ids = await _offers(api, count)
            rentals = await asyncio.gather(*(api.create_instance(i, REQUEST) for i in ids))
            assert len({r.instance_id for r in rentals}) == count
            gone = await asyncio.gather(*(api.destroy_instance(r.instance_id) for r in rentals))
            assert gone == [True] * count

    run(main())
    assert emu.instances() == []
    assert [r for r in emu.requests if r["status"] == 429] == []
    assert len(_calls(emu, "create")) == count and len(_calls(emu, "destroy")) == count
    _assert_paced(emu, "create", 4.5)
    _assert_paced(emu, "destroy", 3.0)


# ----------------------------------------------------------------------------- records


def test_instance_rows_are_read_as_vast_writes_them() -> None:
    row = Instance.from_json({
        "id": 42, "label": " dask-vastai:c:w ", "actual_status": "running", "intended_status": "running",
        "public_ipaddr": "203.0.113.9\n", "ssh_host": "ssh4.vast.ai", "ssh_port": "31337",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}],
                  "8786/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40786"}],
                  "9000/udp": [{"HostIp": "0.0.0.0", "HostPort": "40900"}]},
        "dph_total": 0.31, "start_date": 1700000000.5, "extra_env": [["FOO", "bar"]],
    })
    assert row.label == "dask-vastai:c:w" and row.ports == {22: 40022, 8786: 40786}
    assert row.direct_ssh() == ("203.0.113.9", 40022) and row.proxy_ssh() == ("ssh4.vast.ai", 31337)
    loading = Instance.from_json({"id": 43, "actual_status": None, "ssh_port": None, "ports": None})
    assert loading.direct_ssh() is None and loading.proxy_ssh() is None and loading.ports == {}
    assert {row, loading}  # hashable, so rows can be kept in sets


def test_create_requests_refuse_what_vast_would_refuse() -> None:
    with pytest.raises(ValueError, match="disk_gb=0"):
        CreateRequest(image="img", disk_gb=0)
    with pytest.raises(ValueError, match="between 0.001 and 128"):
        CreateRequest(image="img", disk_gb=10, price=500)
    with pytest.raises(ValueError, match="image is empty"):
        CreateRequest(image="", disk_gb=10)
    bulk = CreateRequest(image="img", disk_gb=10).body([3, 4])
    assert bulk["ids"] == [3, 4] and bulk["runtype"] == "ssh_direc ssh_proxy" and bulk["cancel_unavail"] is True


def test_a_server_that_is_not_vast_is_named_not_misread() -> None:
    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>welcome</html>", content_type="text/html")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("https://elsewhere.invalid/api/v0/bundles/")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/api/v0/bundles/", redirect)
        app.router.add_route("*", "/{tail:.*}", html)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with VastAPI("k" * 20, url, pace=False) as api:
                with pytest.raises(VastRequestError, match="not JSON.*is api_url the address of the Vast API"):
                    await api.list_instances()
                with pytest.raises(VastRequestError, match="redirected .* to https://elsewhere.invalid"):
                    await api.search_offers("gpu_name=RTX_3090")
        finally:
            await runner.cleanup()

    run(main())


def test_logs_are_fetched_from_the_url_vast_gives_and_filtered(emulator: Any) -> None:
    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            [offer_id] = await _offers(api, 1)
            rental = await api.create_instance(offer_id, REQUEST)
            text = await api.logs(rental.instance_id, tail=50)
            assert str(rental.instance_id) in text  # the emulator's record-only runtime says so
            assert await api.logs(rental.instance_id, filter="no-such-line") == ""
            with pytest.raises(InstanceNotFound, match="Instance 424242 does not exist"):
                await api.logs(424242)
            with pytest.raises(InstanceNotFound):
                await api.label_instance(424242, "x")
            await api.destroy_instance(rental.instance_id)
        assert [r["path"] for r in emulator.requests if r["endpoint"] == "logs"] == [
            f"/api/v0/instances/request_logs/{rental.instance_id}/"] * 2 + ["/api/v0/instances/request_logs/424242/"]

    run(main())


def test_ssh_keys_of_the_account_and_of_one_instance(emulator: Any) -> None:
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDaskVastaiTestKeyOnlyForTheEmulator0000 test@dask"

    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False) as api:
            before = await api.ssh_keys()
            added = await api.add_ssh_key(public + "\n")
            assert added.get("id") is not None
            keys = await api.ssh_keys()
            assert len(keys) == len(before) + 1
            assert any(public in str(k.get("public_key") or k.get("ssh_key") or k.get("key")) for k in keys)
            await api.delete_ssh_key(int(added["id"]))
            assert len(await api.ssh_keys()) == len(before)

            [offer_id] = await _offers(api, 1)
            rental = await api.create_instance(offer_id, REQUEST)
            await api.attach_ssh_key(rental.instance_id, public)
            with pytest.raises(InstanceNotFound):
                await api.attach_ssh_key(424242, public)
            await api.destroy_instance(rental.instance_id)

    run(main())
