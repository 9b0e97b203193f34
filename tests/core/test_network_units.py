"""Direct mode and bandwidth, the parts that need no instance: what is rented, what is counted.

- A pool's ``network`` decides the offer query (``direct_port_count>=`` only for ``"direct"``)
  and the ports the rental opens (identity-mapped container ports above 70000, one per worker).
- A running row's mapped ports become each worker's listen port and public address.
- The bytes of an SSH link are counted as they pass (``tunnel._CountedDial``, a real TCP
  connection here); the workers' reports of their direct connections are credited to both
  ends of each connection, once, across restarts (``TrafficBook``); dollars follow the offer's
  own rates.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from dask_vastai.network import DIRECT_PORT_BASE, PeerRoster, direct_ports
from dask_vastai.pools import Pool, PoolShape
from dask_vastai.rentals import RentalRecord
from dask_vastai.roles import ROSTER_OP
from dask_vastai.traffic import Traffic, TrafficBook
from dask_vastai.tunnel import _CountedDial
from dask_vastai.vast import Instance, Offer


def _pool(**shape: Any) -> Pool:
    return Pool.from_shape("p", PoolShape(gpu="RTX_3090", **shape), onstart="true")


@pytest.mark.parametrize(("network", "num_gpus", "query", "ports"), [
    ("tunnel", 2, None, ()),
    ("auto", 2, None, (70000, 70001)),
    ("direct", 2, "direct_port_count>=3", (70000, 70001)),
    ("direct", 1, "direct_port_count>=2", (70000,)),
])
def test_the_network_decides_the_query_and_the_ports_rented(network: str, num_gpus: int, query: str | None,
                                                             ports: tuple[int, ...]) -> None:
    pool = _pool(network=network, num_gpus=num_gpus)
    text = pool.requirements.query_text()
    assert ("direct_port_count" in text) == (query is not None), text
    if query:
        assert query in text.split()
        assert pool.requirements.filters()["direct_port_count"] == {"gte": query.split(">=")[1]}
    assert pool.create_request.ports == ports
    assert {k for k in pool.create_request.body(1)["env"] if k.startswith("-p")} == {f"-p {p}:{p}" for p in ports}


def test_one_worker_for_all_gpus_needs_one_direct_port() -> None:
    pool = _pool(network="direct", num_gpus=4, worker_per_gpu=False)
    assert pool.create_request.ports == (DIRECT_PORT_BASE,)
    assert "direct_port_count>=2" in pool.requirements.query_text()


def test_a_users_query_asking_more_direct_ports_is_kept() -> None:
    text = _pool(network="direct", query="direct_port_count>=10").requirements.query_text()
    assert text.count("direct_port_count") == 1 and "direct_port_count>=10" in text


def test_an_unknown_network_fails_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"network='fast'.*'tunnel'.*'direct'.*'auto'"):
        _pool(network="fast")


def _row(ports: dict[str, Any], ip: str | None = "203.0.113.7") -> Instance:
    return Instance.from_json({"id": 9, "actual_status": "running", "public_ipaddr": ip, "ports": ports})


def test_mapped_ports_give_each_worker_its_listen_port_and_public_address() -> None:
    row = _row({"22/tcp": [{"HostPort": "40022"}], "70000/tcp": [{"HostPort": "41001"}],
                "70001/tcp": [{"HostPort": "41002"}]})
    ports = direct_ports(row, 2)
    assert ports is not None
    # identity mapping above 65535: the worker listens on the number it is reached at
    assert [(p.listen_port, p.address) for p in ports] == [
        (41001, "tls://203.0.113.7:41001"), (41002, "tls://203.0.113.7:41002")]
    assert direct_ports(row, 3) is None, "a third worker has no port"
    assert direct_ports(_row({"70000/tcp": [{"HostPort": "41001"}]}, ip=None), 1) is None


def _record(instance_id: int, up: float = 0.02, down: float = 0.01) -> RentalRecord:
    offer = Offer.from_json({"id": instance_id, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_total": 0.36,
                             "inet_up_cost": up, "inet_down_cost": down})
    return RentalRecord(instance_id=instance_id, worker_name="w", offer=offer, dph_total=0.36,
                        rented_at=0.0, destroyed_at=100.0)


def test_a_rentals_cost_is_its_time_and_its_bandwidth_at_its_offers_rates() -> None:
    record = _record(1)
    record.ssh_traffic.add(up=1_000_000_000, down=500_000_000)
    record.direct_traffic.add(up=3_000_000_000)
    assert record.time_cost_usd == pytest.approx(0.36 * 100 / 3600)
    assert record.bandwidth_cost_usd == pytest.approx(4 * 0.02 + 0.5 * 0.01)
    assert record.cost_usd == pytest.approx(record.time_cost_usd + record.bandwidth_cost_usd)


def test_worker_reports_credit_both_ends_once_and_survive_a_restart() -> None:
    a, b, c = Traffic(), Traffic(), Traffic()
    rentals = {"a": a, "b": b, "c": c, "a2": a}
    same = {"a": 1, "b": 2, "c": 3, "a2": 1}
    book = TrafficBook()

    def report(token: str, received: int, sent: int, **peers: tuple[int, int]) -> dict[str, Any]:
        return {"token": token, "received": received, "sent": sent, "peers": {k: list(v) for k, v in peers.items()}}

    # b's public listener: 100 from a (a sent it), 10 back to a; 50 from the scheduler (no peer)
    book.update([("b", report("t1", 150, 15, a=(100, 10)))], rentals, same)
    assert (b.up, b.down) == (15, 150)
    assert (a.up, a.down) == (100, 10), "what b received from a, a sent"
    book.update([("b", report("t1", 150, 15, a=(100, 10)))], rentals, same)
    assert (a.up, a.down, b.up, b.down) == (100, 10, 15, 150), "a repeated heartbeat credits nothing"
    book.update([("b", report("t1", 250, 15, a=(200, 10)))], rentals, same)
    assert (a.up, b.down) == (200, 250), "only what grew"
    # an older report after a newer one (the last heartbeat, after the scheduler asked b): nothing,
    # and the next report counts from the newer one
    book.update([("b", report("t1", 150, 15, a=(100, 10)))], rentals, same)
    book.update([("b", report("t1", 260, 15, a=(210, 10)))], rentals, same)
    assert (a.up, b.down) == (210, 260), "an older report does not set the baseline back"
    book.update([("b", report("t2", 30, 3, c=(30, 3)))], rentals, same)
    assert (b.down, c.up, c.down) == (290, 30, 3), "a restarted worker (new token) counts from zero"
    # a's listener: 40 from a2, a worker of the same rental (inside the machine: nobody billed)
    book.update([("a", report("t3", 40, 4, a2=(40, 4)))], rentals, same)
    assert (a.up, a.down) == (210, 10)
    book.update([("x", {"unexpected": True})], rentals, same)  # not ours: ignored


def test_an_ssh_links_bytes_are_counted_both_ways_as_they_pass() -> None:
    async def main() -> tuple[int, int]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(1000) + b"x" * 4000)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        traffic = Traffic()
        done = asyncio.get_running_loop().create_future()

        class Receiver(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                transport.write(b"y" * 1000)  # what this machine sends: the instance receives it

            def data_received(self, data: bytes) -> None:
                pass

            def connection_lost(self, exc: Exception | None) -> None:
                done.set_result(None)

        await _CountedDial(traffic).create_connection(Receiver, "127.0.0.1", port)
        await asyncio.wait_for(done, 10)
        server.close()
        return traffic.up, traffic.down

    assert asyncio.run(main()) == (5000, 1000)


def test_the_roster_names_registered_workers_with_their_current_serials_and_reaches_each() -> None:
    sent: dict[str, list[dict[str, Any]]] = {"tls://a": [], "tls://b": []}
    scheduler = types.SimpleNamespace(
        workers={"tls://a": types.SimpleNamespace(name="w-a"), "tls://b": types.SimpleNamespace(name="w-b")},
        stream_comms={address: types.SimpleNamespace(send=box.append) for address, box in sent.items()},
    )
    serials = {"w-a": 0xABC, "w-b": 0x123}
    roster = PeerRoster(scheduler, serials.get)
    roster.add_worker(scheduler, "tls://b")
    assert sent["tls://a"][-1] == sent["tls://b"][-1] == {"op": ROSTER_OP, "peers": {"w-a": "abc", "w-b": "123"}}
    roster.remove_worker(scheduler, "tls://b")
    assert sent["tls://a"][-1]["peers"] == {"w-a": "abc"}, "a leaving worker is off the list at once"
    assert len(sent["tls://b"]) == 1, "and gets no more lists"
