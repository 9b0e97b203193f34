"""Role checks by peer certificate, one message at a time, without a network.

A :class:`FakeComm` is the guarded comm a server hands a connection to, with the peer's
certificate (a real one, minted by the cluster CA and decoded as ``ssl``'s ``getpeercert()``
shows it) and the frames the peer would send (``distributed.protocol.dumps``, as on the
wire). What must hold: a worker peer gets only what a worker does, its pickles never run
unless the op is one that carries data, and a stream message cannot speak for another worker.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from distributed.comm.core import Comm, CommClosedError
from distributed.protocol import Serialized, ToPickle, dumps, to_serialize

from dask_vastai.roles import (
    NANNY_RULES,
    SCHEDULER_RULES,
    WORKER_RULES,
    Gate,
    GuardedTLS,
    Peer,
    identity_uri,
)
from dask_vastai.security import ClusterCA

HANDSHAKE = {"compression": None, "python": (3, 11, 7), "pickle-protocol": 5}
A, B = "tls://127.0.0.1:20001", "tls://127.0.0.1:20003"
A_NANNY = "tls://127.0.0.1:20002"


@pytest.fixture(scope="module")
def ca() -> ClusterCA:
    return ClusterCA("t", lifetime_days=1)


def peercert(pem: str, tmp: Path) -> dict[str, Any]:
    """A certificate as ``getpeercert()`` shows it on a TLS connection."""
    path = tmp / "cert.pem"
    path.write_text(pem)
    return ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]


class FakeComm(GuardedTLS):
    """The guarded comm of one accepted connection, fed with frames instead of a socket."""

    def __init__(self, gate: Gate, cert: dict[str, Any] | None, messages: list[Any], *, deserialize: bool) -> None:
        Comm.__init__(self, deserialize=deserialize)
        self._extra = {"peercert": cert}
        self._closed = False
        self.stream = None
        self._local_addr, self._peer_addr = "tls://127.0.0.1:1", "tls://127.0.0.1:2"
        self.frames = [dumps(m) for m in [HANDSHAKE, *messages]]
        self.written: list[Any] = []
        self.guard(gate)

    async def _read_frames(self) -> list[Any]:
        return self.frames.pop(0)

    async def write(self, msg: Any, serializers: Any = None, on_error: str = "message") -> int:
        self.written.append(msg)
        return 0

    def abort(self) -> None:
        self._closed = True


def read_all(comm: FakeComm) -> list[Any]:
    """Every message the server would get, the handshake first; stops at a refusal."""
    async def main() -> list[Any]:
        out = []
        while comm.frames:
            out.append(await comm.read())
        return out
    return asyncio.run(main())


def refused(comm: FakeComm) -> str:
    with pytest.raises(CommClosedError) as info:
        read_all(comm)
    assert comm.closed()
    return str(info.value)


@pytest.fixture
def worker_a(ca: ClusterCA, tmp_path: Path) -> dict[str, Any]:
    return peercert(ca.issue_worker("a", address=A, nanny=A_NANNY).cert_pem, tmp_path)


def scheduler_comm(cert: dict[str, Any] | None, *messages: Any, ca: ClusterCA | None = None,
                   worker_clients: bool = False) -> FakeComm:
    gate = Gate(SCHEDULER_RULES, worker_clients=worker_clients, is_current=ca.is_current if ca else None)
    return FakeComm(gate, cert, list(messages), deserialize=False)


# ---------------------------------------------------------------- who is who
def test_certificates_name_role_name_and_addresses_where_getpeercert_shows_them(ca, tmp_path) -> None:
    creds = ca.issue_worker("c-0", address=A, nanny=A_NANNY)
    cert = peercert(creds.cert_pem, tmp_path)
    subject = {k: v for rdn in cert["subject"] for k, v in rdn}
    assert (subject["organizationalUnitName"], subject["commonName"]) == ("worker", "c-0")
    assert ("URI", identity_uri("worker", "c-0", address=A, nanny=A_NANNY)) in cert["subjectAltName"]
    assert Peer.from_peercert(cert) == Peer("worker", "c-0", A, A_NANNY, creds.serial)
    client = Peer.from_peercert(peercert(ca.security().tls_client_cert, tmp_path))
    assert client is not None and client.role == "client"
    assert "PRIVATE KEY" not in repr(creds) and "PRIVATE KEY" not in repr(ca) + repr(ca.security())


def test_a_certificate_without_our_role_or_with_disagreeing_names_is_nobody(tmp_path) -> None:
    assert Peer.from_peercert(None) is None
    foreign = {"subject": ((("commonName", "dask-internal"),),), "subjectAltName": (("DNS", "dask-internal"),)}
    assert Peer.from_peercert(foreign) is None
    lying = {"subject": ((("organizationalUnitName", "worker"),), (("commonName", "a"),)),
             "subjectAltName": (("URI", identity_uri("worker", "b")),)}
    assert Peer.from_peercert(lying) is None
    comm = scheduler_comm(foreign, {"op": "heartbeat_worker", "address": A})
    assert "names no dask-vastai role" in refused(comm)


def test_only_the_newest_certificate_of_a_worker_name_opens_the_scheduler(ca, tmp_path) -> None:
    old = peercert(ca.issue_worker("r", address=A, nanny=None).cert_pem, tmp_path)
    new = peercert(ca.issue_worker("r", address=B, nanny=None).cert_pem, tmp_path)
    assert "not the current one" in refused(scheduler_comm(old, {"op": "who_has", "keys": []}, ca=ca))
    read_all(scheduler_comm(new, {"op": "who_has", "keys": []}, ca=ca))


# ------------------------------------------------------------- the scheduler
@pytest.mark.parametrize("msg", [
    {"op": "run_function", "function": b"f"},
    {"op": "register-client", "client": "Client-x", "reply": False},
    {"op": "update-graph", "graph_header": {}, "graph_frames": []},
    {"op": "connection_stream"},
    {"op": "register_worker_plugin", "plugin": b"p", "name": "x"},
    {"op": "broadcast", "msg": {"op": "run"}},
    {"op": "restart"},
    {"op": "set_metadata", "keys": ["x"], "value": 1},
    {"op": "dump_state"},
])
def test_a_worker_may_not_act_as_a_client_on_the_scheduler(worker_a, msg) -> None:
    comm = scheduler_comm(worker_a, msg)
    why = refused(comm)
    assert f"'{msg['op']}' is not something a worker does" in why
    if msg.get("reply", True):  # the caller's rpc raises PermissionError with the reason
        (reply,) = comm.written
        assert reply["status"] == "uncaught-error" and "PermissionError" in reply["exception_text"]
    else:
        assert comm.written == []


def test_register_client_refusal_names_the_option(worker_a) -> None:
    assert "allow_worker_clients=True" in refused(scheduler_comm(worker_a, {"op": "register-client", "client": "c"}))


@pytest.mark.parametrize("msg, why", [
    ({"op": "register-worker", "name": "b", "address": A, "nanny": A_NANNY, "reply": False}, "certificate names 'a'"),
    ({"op": "register-worker", "name": "a", "address": B, "nanny": A_NANNY, "reply": False}, "gives 'tls://127.0.0.1:20001'"),
    ({"op": "register-worker", "name": "a", "address": A, "nanny": "tls://127.0.0.1:9", "reply": False}, "nanny="),
    ({"op": "unregister", "address": B, "stimulus_id": "s"}, "not its own address"),
    ({"op": "heartbeat_worker", "address": B, "metrics": {}}, "not its own address"),
    ({"op": "retire_workers", "workers": [B], "close_workers": False}, "retire itself only"),
    ({"op": "retire_workers", "names": ["b"]}, "retire itself only"),
    ({"op": "shuffle_get", "id": "s", "worker": B}, "not its own address"),
    ({"op": "register_nanny", "address": "tls://127.0.0.1:9"}, "not its own nanny"),
])
def test_a_worker_speaks_only_for_itself(worker_a, msg, why) -> None:
    assert why in refused(scheduler_comm(worker_a, msg))


def test_what_a_worker_does_is_admitted_and_its_registration_opens_its_stream(worker_a) -> None:
    comm = scheduler_comm(
        worker_a,
        {"op": "register-worker", "name": "a", "address": A, "nanny": A_NANNY, "reply": False},
        [{"op": "task-finished", "key": "x", "worker": B, "stimulus_id": "s"},
         {"op": "worker-status-change", "status": "paused", "worker": B, "client": "c", "stimulus_id": "s"},
         {"op": "task-erred", "key": "y", "exception": to_serialize(ValueError("v")), "stimulus_id": "s"}],
    )
    _, register, batch = read_all(comm)
    assert register["op"] == "register-worker" and not comm.closed()
    # No message speaks for another worker: handle_stream's ``extra`` (the registered worker) applies.
    assert all("worker" not in m and "client" not in m for m in batch)
    assert isinstance(batch[2]["exception"], Serialized), "the scheduler keeps errors serialized, as Dask does"
    for msg in ({"op": "heartbeat_worker", "address": A, "metrics": {}},
                {"op": "who_has", "keys": ["x"]}, {"op": "unregister", "address": A, "stimulus_id": "s"},
                {"op": "shuffle_get_or_create", "shuffle_id": "s", "key": "k", "worker": A},
                {"op": "retire_workers", "workers": [A], "close_workers": False, "remove": True}):
        comm = scheduler_comm(worker_a, msg)
        assert read_all(comm)[1]["op"] == msg["op"] and not comm.closed()


def test_update_graph_on_a_workers_own_stream_is_refused(worker_a) -> None:
    comm = scheduler_comm(
        worker_a,
        {"op": "register-worker", "name": "a", "address": A, "nanny": A_NANNY, "reply": False},
        [{"op": "keep-alive"}, {"op": "update-graph", "graph_header": {}, "graph_frames": []}],
    )
    assert "'update-graph' is not something a worker sends on its stream" in refused(comm)
    assert comm.written == [], "nothing is written on a stream the scheduler also writes to"


def test_a_workers_pickles_never_run_on_the_scheduler(worker_a, tmp_path) -> None:
    marker = tmp_path / "pwned"
    bomb = ToPickle(_Bomb(marker))
    for msg in ({"op": "run_function", "function": bomb},
                {"op": "heartbeat_worker", "address": A, "metrics": {"x": bomb}}):
        refused(scheduler_comm(worker_a, msg))
    comm = scheduler_comm(worker_a, {"op": "register-worker", "name": "a", "address": A, "nanny": A_NANNY,
                                     "reply": False},
                          [{"op": "log-event", "topic": "t", "msg": bomb}])
    assert "carries pickled objects" in refused(comm)
    bad_handshake = FakeComm(Gate(SCHEDULER_RULES), worker_a, [], deserialize=False)
    bad_handshake.frames = [dumps({"compression": bomb})]
    refused(bad_handshake)
    assert not marker.exists()


def test_worker_clients_option_trusts_workers_as_clients(worker_a) -> None:
    msg = {"op": "register-client", "client": "c", "reply": False}
    comm = scheduler_comm(worker_a, msg, worker_clients=True)
    assert comm._trusted


# ----------------------------------------------------------- workers, nannies
def worker_comm(cert: dict[str, Any] | None, *messages: Any) -> FakeComm:
    return FakeComm(Gate(WORKER_RULES), cert, list(messages), deserialize=True)


@pytest.mark.parametrize("op", ["run", "run_coroutine", "plugin-add", "connection_stream", "terminate",
                                "upload_file", "actor_execute", "update_data", "free_keys", "gather"])
def test_a_worker_takes_no_control_from_another_worker(worker_a, op, tmp_path) -> None:
    marker = tmp_path / "pwned"
    comm = worker_comm(worker_a, {"op": op, "function": ToPickle(_Bomb(marker)), "args": to_serialize(_Bomb(marker))})
    assert f"'{op}' is not something a worker does on a worker" in refused(comm)
    assert not marker.exists()


def test_workers_fetch_data_and_push_shuffle_shards(worker_a) -> None:
    got = read_all(worker_comm(worker_a, {"op": "get_data", "keys": ["x"], "who": A}, "OK"))
    assert got[1] == {"op": "get_data", "keys": ("x",), "who": A} and got[2] == "OK"
    _, shards = read_all(worker_comm(worker_a, {"op": "shuffle_receive", "shuffle_id": "s", "run_id": 1,
                                                "data": to_serialize([(0, b"abc")])}))
    assert shards["data"] == [(0, b"abc")], "a shuffle's shards are deserialized as Dask does"


def test_a_nanny_obeys_only_its_own_worker(ca, tmp_path) -> None:
    gate = Gate(NANNY_RULES, own_name="a")
    mine = peercert(ca.issue_worker("a", address=A, nanny=A_NANNY).cert_pem, tmp_path)
    other = peercert(ca.issue_worker("b", address=B, nanny=None).cert_pem, tmp_path)
    read_all(FakeComm(gate, mine, [{"op": "close_gracefully", "reason": "r"}], deserialize=True))
    assert "only this nanny's own worker" in refused(
        FakeComm(gate, other, [{"op": "close_gracefully", "reason": "r"}], deserialize=True))
    for op in ("kill", "restart", "run", "plugin_add", "terminate", "instantiate"):
        refused(FakeComm(gate, mine, [{"op": op}], deserialize=True))


class _Bomb:
    """Unpickling it makes a directory: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))
