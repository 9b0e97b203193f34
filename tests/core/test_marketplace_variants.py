"""The Vast client and the broker against every plausible Vast (records-only emulator, fast).

Where Vast's behaviour is undocumented the emulator plays each variant
(``docs/emulator-variants.md``); here the product meets them one by one: bulk answers in
every shape (and one never seen), a missing bulk route, refused offers, bulk destroys that
leave survivors or lingering rows, redirects (to the same origin and to another),
``Retry-After``, stalled boot states, one bid per bulk call, and two clients of one account
sharing their pacing. Every test checks what a user pays for: how many rentals the
emulator's meter saw, which are still billing, and which requests went out.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import dask.config
import pytest
from aiohttp import web

from dask_vastai.emulator import Emulator
from dask_vastai.exceptions import BootFailed, VastRequestError
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker
from dask_vastai.vast import CreatedInstance, CreateRequest, VastAPI

REQUEST = CreateRequest(image="img", disk_gb=10)
GPU = OfferRequirements(gpu="RTX_3090")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def own_pacing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's shared pacing schedule in its own cache folder (platformdirs reads XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def emulator(**variants: Any) -> Emulator:
    return Emulator(runtime="record", rate_limits=False, boot_delay_s=0, variants=variants)


def calls(emu: Emulator, endpoint: str, method: str | None = None) -> list[dict[str, Any]]:
    return [r for r in emu.requests if r["endpoint"] == endpoint and (method is None or r["method"] == method)]


def bulk_creates(emu: Emulator) -> list[dict[str, Any]]:
    """POST /api/v0/asks/bulk/, answered or not (an absent route has no endpoint name)."""
    return [r for r in emu.requests if r["method"] == "POST" and r["path"].startswith("/api/v0/asks/bulk")]


def rentals_made(emu: Emulator) -> list[dict[str, Any]]:
    """Every rental the meter ever saw (live or destroyed)."""
    return emu.meter()["instances"]


def billing(emu: Emulator) -> list[int]:
    return [r["id"] for r in rentals_made(emu) if not r["destroyed"]]


async def rent_with_broker(emu: Emulator, names: list[str], *, api_url: str | None = None,
                           requirements: OfferRequirements = GPU, **api_options: Any) -> dict[str, Any]:
    """Rent one instance per name through a broker (one batch), then close it (destroys all)."""
    async with VastAPI(emu.api_key, api_url or emu.url, pace=False, **api_options) as api:
        broker = RentalBroker(api, cluster_name="c", requirements=requirements, create_request=REQUEST,
                              poll_interval_s=0.2)
        records = await asyncio.gather(*(broker.rent(n) for n in names))
        await broker.labels_written()  # written behind the rentals, which boot meanwhile
        labels = {r["id"]: r["label"] for r in emu.instances()}
        out = {"records": records, "labels": labels, "bulk_usable": api.bulk_create_usable}
        await broker.close()
    return out


# --------------------------------------------------------------------------- bulk create
@pytest.mark.parametrize("shape", ["results", "success_only", "ids", "id_list", "absent"])
def test_every_bulk_answer_rents_exactly_what_was_asked_with_worker_labels(shape: str) -> None:
    names = [f"c-{k}" for k in range(4)]
    with emulator(bulk_create=shape, missing_route="html") as emu:
        out = run(rent_with_broker(emu, names))
        ids = [r.instance_id for r in out["records"]]
        assert len(set(ids)) == 4
        assert sorted(out["labels"][i] for i in ids) == [f"dask-vastai:c:{n}" for n in names]
        assert len(rentals_made(emu)) == 4, "never more rentals than asked for"
        assert billing(emu) == []
        bulk = bulk_creates(emu)
        singles = calls(emu, "create", "PUT")
        if shape == "absent":  # a plain 404 page: one offer per call from then on
            assert len(bulk) == 1 and bulk[0]["status"] == 404 and len(singles) == 4
            assert out["bulk_usable"] is False
        else:
            assert len(bulk) == 1 and singles == [], "one call, never a second create"
            assert out["bulk_usable"] is True


def test_a_missing_bulk_route_makes_single_creates_for_the_rest_of_the_session() -> None:
    async def main(emu: Emulator) -> None:
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            broker = RentalBroker(api, cluster_name="c", requirements=GPU, create_request=REQUEST)
            await asyncio.gather(*(broker.rent(f"c-{k}") for k in range(2)))
            await asyncio.gather(*(broker.rent(f"c-{k}") for k in range(2, 5)))
            await broker.close()

    with emulator(bulk_create="absent", bulk_destroy="absent") as emu:
        run(main(emu))
        assert len(bulk_creates(emu)) == 1, "the bulk route is tried once per session"
        assert len(calls(emu, "create", "PUT")) == 5
        assert len(calls(emu, "destroy", "DELETE")) >= 5 and billing(emu) == []


class ReshapingProxy:
    """Forwards to the emulator, answering bulk creates in a shape no client has seen."""

    def __init__(self, target: str, answer: tuple[int, str, str]) -> None:
        self.target, self.answer = target, answer
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _forward(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with aiohttp.ClientSession() as s, s.request(
            request.method, self.target + request.path_qs, data=await request.read(), headers=headers
        ) as r:
            body = await r.read()
            if request.method == "POST" and request.path.startswith("/api/v0/asks/bulk"):
                status, text, content_type = self.answer
                return web.Response(status=status, text=text, content_type=content_type)
            return web.Response(status=r.status, body=body, content_type="application/json")

    async def __aenter__(self) -> ReshapingProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.mark.parametrize("answer", [
    (202, json.dumps({"queued": True, "request_id": "r-1"}), "application/json"),
    (200, "<html><body>OK</body></html>", "text/html"),
    (200, json.dumps({"success": True, "results": "4 started"}), "application/json"),
], ids=["queued", "html", "results-as-text"])
def test_an_answer_in_a_shape_never_seen_never_rents_twice(answer: tuple[int, str, str]) -> None:
    async def main(emu: Emulator) -> dict[str, Any]:
        async with ReshapingProxy(emu.url, answer) as proxy:
            return await rent_with_broker(emu, [f"c-{k}" for k in range(4)], api_url=proxy.url,
                                          ambiguous_create_grace_s=2)

    with emulator() as emu:
        out = run(main(emu))
        assert len({r.instance_id for r in out["records"]}) == 4
        assert len(rentals_made(emu)) == 4 and len(calls(emu, "create")) == 1
        assert billing(emu) == []


def test_partial_success_in_a_bare_answer_rents_the_rest_on_fresh_offers() -> None:
    async def main(emu: Emulator) -> dict[str, Any]:
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            first = [o.id for o in await api.search_offers(GPU.filters(), limit=4)]
        emu.variants.set(bulk_create_refused=f"offers:{first[0]},{first[2]}")
        return await rent_with_broker(emu, [f"c-{k}" for k in range(4)], ambiguous_create_grace_s=1)

    with emulator(bulk_create="success_only") as emu:
        out = run(main(emu))
        assert len({r.instance_id for r in out["records"]}) == 4
        assert len(rentals_made(emu)) == 4, "the two refused offers were replaced, not rented twice"
        assert [r["status"] for r in bulk_creates(emu)] == [200, 200]


def test_no_such_ask_for_a_whole_batch_takes_fresh_offers_and_keeps_the_bulk_route() -> None:
    async def main(emu: Emulator) -> dict[str, Any]:
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            first = [o.id for o in await api.search_offers(GPU.filters(), limit=3)]
        emu.variants.set(bulk_create_refused="offers:" + ",".join(map(str, first)))
        return await rent_with_broker(emu, [f"c-{k}" for k in range(3)])

    with emulator(bulk_create="success_only") as emu:
        out = run(main(emu))
        assert [r["status"] for r in bulk_creates(emu)] == [404, 200]
        assert calls(emu, "create", "PUT") == [] and out["bulk_usable"] is True
        assert len(rentals_made(emu)) == 3


def test_an_interruptible_batch_bids_its_highest_min_bid_in_one_call() -> None:
    async def main(emu: Emulator) -> list[Any]:
        out = await rent_with_broker(emu, ["c-0", "c-1", "c-2"], requirements=OfferRequirements(
            gpu="RTX_3090", interruptible=True))
        return out["records"]

    with emulator(bulk_create="ids") as emu:
        records = run(main(emu))
        bids = {r.offer.min_bid for r in records}
        assert len(bids) > 1, "the test wants offers with different minimum bids"
        ledger = emu.market.ledger  # what each rental was created with
        assert {ledger[r.instance_id].gpu_dph for r in records} == {max(bids)}
        assert all(ledger[r.instance_id].is_bid for r in records)
        assert len(calls(emu, "create")) == 1


# --------------------------------------------------------------------------- bulk destroy
@pytest.mark.parametrize("shape", ["results", "success_only", "absent"])
def test_a_bulk_destroy_is_checked_and_survivors_are_destroyed_again(shape: str) -> None:
    async def main(emu: Emulator) -> Any:
        async with VastAPI(emu.api_key, emu.url, pace=False, destroy_linger_grace_s=5) as api:
            offers = [o.id for o in await api.search_offers(GPU.filters(), limit=4)]
            made = await api.create_instances(offers, REQUEST)
            return await api.destroy_instances([m.instance_id for m in made if isinstance(m, CreatedInstance)])

    with emulator(bulk_destroy=shape, bulk_destroy_survivors="all", destroy_linger_s=1,
                  missing_route="text") as emu:
        report = run(main(emu))
        assert billing(emu) == [], "nothing left billing"
        assert [r for r in emu.instances() if r["cur_state"] != "unloaded"] == []
        if shape == "absent":
            assert report.singly and report.survivors == ()
        else:
            assert sorted(report.survivors) == sorted(report.ids), "bulk said yes, the list said otherwise"


def test_rows_lingering_past_the_grace_are_destroyed_again_and_stop_billing_at_the_bulk_call() -> None:
    async def main(emu: Emulator) -> Any:
        async with VastAPI(emu.api_key, emu.url, pace=False, destroy_linger_grace_s=1) as api:
            offers = [o.id for o in await api.search_offers(GPU.filters(), limit=3)]
            made = await api.create_instances(offers, REQUEST)
            before = time.time()
            report = await api.destroy_instances([m.instance_id for m in made if isinstance(m, CreatedInstance)])
            return report, before

    with emulator(bulk_destroy="success_only", destroy_linger_s=4, destroy_linger_status="destroying") as emu:
        report, before = run(main(emu))
        assert sorted(report.lingering) == sorted(report.ids) and report.survivors == ()
        assert all(before <= t <= before + 1 for t in report.stopped_at.values()), report.stopped_at
        assert billing(emu) == []


# --------------------------------------------------------------------------- boot states
@pytest.mark.parametrize("state", ["created", "scheduling", "frozen"])
def test_a_boot_stalled_past_its_grace_is_a_failed_boot(state: str) -> None:
    async def main(emu: Emulator) -> tuple[BaseException, float]:
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            broker = RentalBroker(api, cluster_name="c", requirements=GPU, create_request=REQUEST,
                                  poll_interval_s=0.2)
            record = await broker.rent("c-0")
            started = time.monotonic()
            with pytest.raises(BootFailed) as e:
                await broker.wait_until_ready(record.instance_id, 60)
            await broker.close()
            return e.value, time.monotonic() - started

    with dask.config.set({"vastai.boot-state-grace": {"created": 1, "scheduling": 1, "frozen": 0}}):
        with emulator(boot_stall=state) as emu:
            error, waited = run(main(emu))
    assert state in str(error) and waited < 10, (error, waited)


# --------------------------------------------------------------------------- redirects
@pytest.mark.parametrize("mode", ["lenient", "strict", "redirect_301", "redirect_308", "off_origin"])
def test_routes_with_vasts_trailing_slash_work_under_every_routing(mode: str) -> None:
    async def main(emu: Emulator) -> None:
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            assert "balance" in await api.current_user()
            assert await api.list_instances() == []

    with emulator(trailing_slash=mode, missing_route="html") as emu:
        run(main(emu))
        users = calls(emu, "user")
        assert users[-1]["path"] == "/api/v0/users/current/" and users[-1]["status"] == 200
        assert users[-1]["key"] == "account"
        assert calls(emu, "off_origin") == []


def test_a_same_origin_redirect_is_followed_with_the_key_and_another_origin_never_gets_it() -> None:
    async def main(emu: Emulator) -> None:
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            api._url = lambda path, query=None: VastAPI._url(api, path.rstrip("/"), query)  # type: ignore[method-assign]
            assert "balance" in await api.current_user()  # slashless: 308 to the slashed route
            emu.variants.set(trailing_slash="off_origin_all")
            with pytest.raises(VastRequestError, match="another origin: the API key was not sent there"):
                await api.current_user()

    with emulator(trailing_slash="redirect_308") as emu:
        run(main(emu))
        users = calls(emu, "user")
        assert [(u["path"], u["status"], u["key"]) for u in users[:2]] == [
            ("/api/v0/users/current", 308, "account"), ("/api/v0/users/current/", 200, "account")]
        assert calls(emu, "off_origin") == [], "nothing reached the other origin"


# --------------------------------------------------------------------------- rate limits
def test_retry_after_is_honoured() -> None:
    async def main(emu: Emulator) -> None:
        async with VastAPI(emu.api_key, emu.url) as api:
            emu.faults.fail_next("list", 1, 429)
            await api.list_instances()

    with Emulator(runtime="record", rate_limits=True, boot_delay_s=0, variants={"retry_after_s": 2.5}) as emu:
        run(main(emu))
        refused, accepted = calls(emu, "list")
        assert refused["status"] == 429 and accepted["status"] == 200
        assert accepted["time"] - refused["time"] >= 2.5, "waited as long as Retry-After said"


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-process"])
def test_two_clients_of_one_account_share_their_pacing(shared: bool) -> None:
    async def main(emu: Emulator) -> None:
        with dask.config.set({"vastai.api.shared-pacing": shared}):
            async with VastAPI(emu.api_key, emu.url) as a, VastAPI(emu.api_key, emu.url) as b:
                await asyncio.gather(*(api.list_instances() for api in (a, b) for _ in range(3)))

    with Emulator(runtime="record", rate_limits=True, boot_delay_s=0) as emu:
        run(main(emu))
        refused = [r for r in calls(emu, "list") if r["status"] == 429]
        if shared:
            assert refused == [], "one schedule for the account: no call too early"
            times = [r["time"] for r in calls(emu, "list")]
            assert all(b - a >= 0.98 for a, b in zip(times, times[1:], strict=False)), times
        else:
            assert refused, "two schedules for one account collide (the retries absorb it)"


def test_the_pacing_file_holds_no_key(tmp_path: Path) -> None:
    async def main(emu: Emulator) -> None:
        async with VastAPI(emu.api_key, emu.url) as api:
            await api.list_instances()

    with Emulator(runtime="record", rate_limits=True, boot_delay_s=0) as emu:
        run(main(emu))
        files = list((tmp_path / "cache").rglob("*.json"))
        assert len(files) == 1 and emu.api_key not in files[0].read_text()
        assert json.loads(files[0].read_text())["list"]["next"] > 0
