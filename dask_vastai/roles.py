"""Who may do what on every Dask endpoint of a cluster, decided by the peer's certificate.

Hosts are strangers: root in an instance holds everything that instance holds (its worker's
certificate and key, the CA certificate, the incarnation). Each certificate says what its
holder is (``security.py`` mints them): subject ``OU`` = role, ``CN`` = name, and a SAN URI
``dask-vastai://<role>/<name>?address=...&nanny=...`` with the addresses the worker was given.
A ``client`` peer (the scheduler, the user's client) may do anything. A ``worker`` peer may do
what a worker does and nothing a client does:

* on the scheduler: register under its own name and address, heartbeat, report task results
  and state on its own stream, ask ``who_has``, the p2p shuffle's ``shuffle_*`` calls, and
  unregister or retire itself (:data:`SCHEDULER_RULES`);
* on a worker: fetch data (``get_data``) and push p2p shuffle shards (:data:`WORKER_RULES`);
* on a nanny: only its own worker's ``close_gracefully`` (:data:`NANNY_RULES`).

Why the check sits in the comm's ``read`` and not in ``handle_comm``/``handle_stream``: Dask
unpickles every ``ToPickle`` object of a message while it reads it (``protocol.loads``), and a
worker deserializes ``Serialize`` payloads there too, so a check on the decoded op comes after
the attacker's code ran. :class:`GuardedTLS` reads a worker peer's frames, decodes them with
every pickled object withheld, admits or refuses the message, and only then lets a data op's
payload be deserialized. Stream messages are checked one by one and carry no identity of their
own: ``Server.handle_stream`` calls ``handler(**merge(extra, msg))``, so a ``worker=`` or
``client=`` key in a message would override the stream's; it is removed, and the identity
the registration pinned (checked against the certificate) applies.

Listeners get the guarded comm class before they accept anything: :class:`GuardedScheduler`
and :class:`GuardedWorker` install it right after ``listen``; a nanny (``dask worker`` has no
nanny class option) gets it from this module as ``--preload-nanny``, whose ``dask_setup``
runs in ``Nanny.start_unsafe`` right after ``listen`` with no await between that could let a
connection in. Tasks that submit tasks (``get_client()`` in a task) need a worker to act as a
client: only with the cluster option ``allow_worker_clients`` (``vastai.allow-worker-clients``),
which lets every host run code on every other host and on the user's machine.

This module runs on the instances too (the supervisor starts workers with
:data:`WORKER_ARGS`), so it imports only distributed, dask, the package's exceptions and
``certificate_reload`` (both processes take up renewed certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ssl import SSLError
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import dask
import msgpack
from distributed.comm.core import CommClosedError
from distributed.comm.tcp import TLS, TLSListener, convert_stream_closed_error, read_bytes_rw
from distributed.comm.utils import from_frames
from distributed.core import error_message
from distributed.nanny import Nanny
from distributed.protocol.serialize import Serialized, msgpack_decode_default
from distributed.protocol.utils import msgpack_opts, unpack_frames
from distributed.scheduler import Scheduler
from distributed.worker import Worker
from tornado.iostream import StreamClosedError

from . import certificate_reload
from .exceptions import WorkerClientsDisabled

logger = logging.getLogger(__name__)

ROLE_CLIENT = "client"
ROLE_WORKER = "worker"
URI_SCHEME = "dask-vastai"
#: the dask config key (env ``DASK_VASTAI__ALLOW_WORKER_CLIENTS``) read on the instances
WORKER_CLIENTS_KEY = "vastai.allow-worker-clients"
WORKER_CLIENTS_ENV = "DASK_VASTAI__ALLOW_WORKER_CLIENTS"
#: what the on-instance supervisor adds to ``dask worker``: every worker and nanny guarded
WORKER_ARGS = ("--worker-class", f"{__name__}.GuardedWorker", "--preload-nanny", __name__)
#: the message keys that name a stream's sender (``Server.handle_stream`` merges them in)
IDENTITY_KEYS = ("worker", "client")
#: set (to "1") in a worker's environment: it accepts worker peers only from the live-worker
#: list its scheduler pushes (the op :data:`ROSTER_OP` on the worker's stream)
ROSTER_ENV = "DASK_VASTAI_PEER_ROSTER"
ROSTER_OP = "dask-vastai-peers"
#: seconds a connection from a worker not (yet) on the list waits for the list to name it: the
#: scheduler pushes it when that worker registers, on another stream than the one it gets tasks on
ROSTER_WAIT_S = 10.0
#: set in a worker's environment: the host its listener binds (``0.0.0.0``: direct mode, a
#: port the host maps from its public address), and its connections then cross the instance's
#: public network: it counts their bytes and reports them (the metric :data:`TRAFFIC_METRIC`)
LISTEN_HOST_ENV = "DASK_VASTAI_LISTEN_HOST"
TRAFFIC_METRIC = "dask-vastai-traffic"


# ------------------------------------------------------------------ identities
def identity_uri(role: str, name: str, *, address: str | None = None, nanny: str | None = None) -> str:
    """The SAN URI that names a certificate's holder and the addresses it was given."""
    query = urlencode({k: v for k, v in (("address", address), ("nanny", nanny)) if v})
    return f"{URI_SCHEME}://{role}/{quote(name, safe='')}" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a TLS connection, as its certificate says."""

    role: str
    name: str
    #: the worker's contact address and its nanny's, as minted (None: not pinned)
    address: str | None = None
    nanny: str | None = None
    serial: int | None = None

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any] | None) -> Peer | None:
        """The peer of an ``ssl`` ``getpeercert()`` dict; None when it names no role of ours.

        The subject's OU and CN and the SAN URI must agree: our CA writes both.
        """
        if not cert:
            return None
        subject = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
        role, name = subject.get("organizationalUnitName"), subject.get("commonName")
        if role not in (ROLE_CLIENT, ROLE_WORKER) or not name:
            return None
        for kind, value in cert.get("subjectAltName", ()):
            if kind != "URI" or not value.startswith(f"{URI_SCHEME}://"):
                continue
            uri = urlsplit(value)
            if uri.netloc != role or unquote(uri.path.lstrip("/")) != name:
                return None
            query = parse_qs(uri.query)
            serial = cert.get("serialNumber")
            return cls(
                role=role, name=name,
                address=query.get("address", [None])[0], nanny=query.get("nanny", [None])[0],
                serial=int(serial, 16) if serial else None,
            )
        return None

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


# ----------------------------------------------------------------------- rules
#: an argument check: (peer, message, gate) -> why it is refused, or None
Check = Callable[["Peer", Mapping[str, Any], "Gate"], str | None]


def _own_address(key: str) -> Check:
    def check(peer: Peer, msg: Mapping[str, Any], gate: Gate) -> str | None:
        if peer.address is not None and msg.get(key) != peer.address:
            return f"{key}={msg.get(key)!r} is not its own address {peer.address!r}"
        return None

    return check


def _register_worker(peer: Peer, msg: Mapping[str, Any], gate: Gate) -> str | None:
    if str(msg.get("name")) != peer.name:
        return f"it registers as name={msg.get('name')!r} but its certificate names {peer.name!r}"
    if peer.address is not None and msg.get("address") != peer.address:
        return f"it registers address={msg.get('address')!r} but its certificate gives {peer.address!r}"
    # A worker without a nanny registers nanny=None; any other nanny must be its own.
    if peer.nanny is not None and msg.get("nanny") not in (None, peer.nanny):
        return f"it registers nanny={msg.get('nanny')!r} but its certificate gives {peer.nanny!r}"
    return None


def _nanny_address(peer: Peer, msg: Mapping[str, Any], gate: Gate) -> str | None:
    if peer.nanny is not None and msg.get("address") != peer.nanny:
        return f"address={msg.get('address')!r} is not its own nanny {peer.nanny!r}"
    return None


def _retire_itself(peer: Peer, msg: Mapping[str, Any], gate: Gate) -> str | None:
    # Worker.close_gracefully: retire_workers(workers=[self.address], close_workers=False, ...)
    if msg.get("names") is not None or list(msg.get("workers") or ()) != [peer.address] or peer.address is None:
        return "a worker may retire itself only (workers=[its own address])"
    return None


def _own_worker(peer: Peer, msg: Mapping[str, Any], gate: Gate) -> str | None:
    if gate.own_name is None or peer.name != gate.own_name:
        return f"only this nanny's own worker {gate.own_name!r} may ask that"
    return None


@dataclass(frozen=True)
class Rules:
    """What a ``worker`` peer may send to one kind of server (an allow-list)."""

    server: str
    #: request ops -> argument check (None: any arguments); "close" ends the connection
    requests: Mapping[str, Check | None]
    #: ops allowed on the worker's own stream (after ``register-worker``)
    stream: frozenset[str] = frozenset()
    #: request ops whose payload may be deserialized (the data workers exchange)
    data: frozenset[str] = frozenset()
    #: the request op after which the connection is the peer's stream
    opens_stream: str | None = None


#: distributed's ``Scheduler``: the handlers a worker and its nanny call
#: (``Worker._register_with_scheduler``, ``heartbeat``, ``close_gracefully``; ``Nanny``'s
#: ``register_nanny``, ``unregister`` and ``log_event``; the shuffle extension's calls) and the
#: worker stream's ops (``worker_handlers`` in ``Scheduler.__init__``, stealing's
#: ``steal-response``). Everything else (``register-client``, ``update-graph``,
#: ``run_function``, plugins, ``broadcast``, ``restart``, metadata, datasets, ...) is a client's.
SCHEDULER_RULES = Rules(
    server="scheduler",
    requests={
        "register-worker": _register_worker,
        "register_nanny": _nanny_address,
        "heartbeat_worker": _own_address("address"),
        "unregister": _own_address("address"),
        "retire_workers": _retire_itself,
        "who_has": None,
        "log_event": None,
        "shuffle_barrier": None,
        "shuffle_get": _own_address("worker"),
        "shuffle_get_or_create": _own_address("worker"),
        # The worker asks to move an output task to the worker its partition is assigned to.
        "shuffle_restrict_task": None,
        "close": None,
    },
    stream=frozenset({
        "task-finished", "task-erred", "release-worker-data", "add-keys", "long-running",
        "reschedule", "keep-alive", "log-event", "worker-status-change",
        "request-refresh-who-has", "steal-response",
    }),
    opens_stream="register-worker",
)
#: distributed's ``Worker``: other workers fetch dependencies and push p2p shuffle shards.
WORKER_RULES = Rules(
    server="worker",
    requests={"get_data": None, "shuffle_receive": None, "shuffle_inputs_done": None, "close": None},
    data=frozenset({"shuffle_receive"}),
)
#: distributed's ``Nanny``: its own worker tells it it closes on purpose.
NANNY_RULES = Rules(server="nanny", requests={"close_gracefully": _own_worker, "close": None})


class LivePeers:
    """The workers a worker accepts connections from: the live-worker list its scheduler pushes.

    A worker's certificate is per incarnation: the list names each live worker with the serial
    of its current certificate, so that a replaced, preempted or released host's certificate
    (still valid until it expires) opens nothing on the others. Empty until the first push:
    nothing is accepted from a worker before it (a connection waits a moment for it).
    """

    def __init__(self) -> None:
        self._serials: dict[str, frozenset[str]] = {}
        self._changed = asyncio.Event()

    def update(self, peers: Mapping[str, str]) -> None:
        """The scheduler's list: worker name -> serial of its current certificate (hex); while a
        worker's certificate is renewed, its current and its renewed serial, comma-separated."""
        self._serials = {str(k): frozenset(str(v).lower().split(",")) for k, v in dict(peers).items()}
        self._changed.set()
        self._changed = asyncio.Event()

    def admits(self, peer: Peer) -> bool:
        return peer.serial is not None and format(peer.serial, "x") in self._serials.get(peer.name, ())

    async def wait_admitted(self, peer: Peer, timeout_s: float) -> bool:
        """Whether ``peer`` is on the list, waiting up to ``timeout_s`` for a push that names it."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.admits(peer):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    def __len__(self) -> int:
        return len(self._serials)


class ListenerTraffic:
    """Bytes on the connections a public listener accepted: in total and per peer.

    Counted per message as the comm reads and writes it (frames and their length headers;
    TLS records and handshakes add a fraction of a percent). Reported as a heartbeat metric,
    and once more as an event when the worker closes, cumulative for this process, with a
    token that changes when the process does, so that the client can tell a restart from a
    counter that went back.
    """

    def __init__(self) -> None:
        self.token = os.urandom(8).hex()
        self.received = 0
        self.sent = 0
        self.peers: dict[str, list[int]] = {}  # peer name -> [received from it, sent to it]

    def add(self, peer: Peer | None, received: int = 0, sent: int = 0) -> None:
        self.received += received
        self.sent += sent
        if peer is not None and peer.role == ROLE_WORKER:
            row = self.peers.setdefault(peer.name, [0, 0])
            row[0] += received
            row[1] += sent

    def report(self, worker: Any = None) -> dict[str, Any]:
        return {"token": self.token, "name": str(getattr(worker, "name", "")), "received": self.received,
                "sent": self.sent, "peers": {name: list(row) for name, row in self.peers.items()}}


@dataclass
class Gate:
    """One server's admission of what peers send: trusted roles pass, workers follow ``rules``."""

    rules: Rules
    #: whether a ``worker`` peer may act as a client too (``allow_worker_clients``)
    worker_clients: bool = False
    #: the worker name a nanny serves
    own_name: str | None = None
    #: False for a worker certificate that is no longer the current one for its name
    is_current: Callable[[Peer], bool] | None = field(default=None, repr=False)
    #: the workers this server accepts worker peers from (None: any current one)
    live: LivePeers | None = field(default=None, repr=False)
    #: counts the bytes of every connection (a listener on the public network), or None
    traffic: ListenerTraffic | None = field(default=None, repr=False)

    def refuse_connection(self, peer: Peer | None) -> str | None:
        if peer is None:
            return "its certificate names no dask-vastai role"
        if peer.role == ROLE_WORKER and self.is_current is not None and not self.is_current(peer):
            return "its certificate is not the current one for that worker"
        return None

    def trusts(self, peer: Peer) -> bool:
        return peer.role == ROLE_CLIENT or (self.worker_clients and peer.role == ROLE_WORKER)

    def refuse_request(self, peer: Peer, msg: Any) -> str | None:
        """Why a worker peer may not send this request (None: it may)."""
        if not isinstance(msg, dict) or "op" not in msg:
            return None  # a reply read by a handler (get_data's "OK"); never dispatched
        op = msg["op"]
        if op not in self.rules.requests:
            return f"'{op}' is not something a worker does on a {self.rules.server}" + _hint(op)
        check = self.rules.requests[op]
        return check(peer, msg, self) if check is not None else None

    def refuse_stream(self, peer: Peer, msgs: Any) -> str | None:
        """Why a worker's stream batch is refused; admitted messages lose their identity keys."""
        for msg in msgs if isinstance(msgs, list | tuple) else (msgs,):
            if msg == "OK":
                continue
            if not isinstance(msg, dict):
                return f"a stream message must be a dict, got {type(msg).__name__}"
            op = msg.get("op")
            if op not in self.rules.stream and op != "close-stream":
                return f"'{op}' is not something a worker sends on its stream" + _hint(op)
            for key in IDENTITY_KEYS:
                msg.pop(key, None)
        return None


def _hint(op: Any) -> str:
    return (
        "; hosts act only as workers unless the cluster is created with allow_worker_clients=True"
        if op in ("register-client", "update-graph") else ""
    )


# ------------------------------------------------------------------- the comm
class _Withheld:
    """Stands for a pickled object a worker peer sent, until the message is admitted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<withheld pickled object>"


_WITHHELD = _Withheld()


def peek(frames: list[Any], *, deserializing: bool) -> tuple[Any, bool]:
    """Decode a message without running any of its pickles: (message, whether one was withheld).

    Mirrors ``distributed.protocol.core.loads``: a ``Serialized`` payload stays one when the
    server does not deserialize (the scheduler), as there; what would be unpickled here
    (``ToPickle``, or ``Serialize`` on a worker) becomes :data:`_WITHHELD`.
    """
    withheld = False

    def hook(obj: dict[str, Any]) -> Any:
        nonlocal withheld
        offset = obj.get("__Serialized__", 0)
        if offset > 0:
            if deserializing:
                withheld = True
                return _WITHHELD
            sub_header = msgpack.loads(
                frames[offset], object_hook=msgpack_decode_default, use_list=False, **msgpack_opts
            )
            return Serialized(sub_header, frames[offset + 1: offset + 1 + sub_header["num-sub-frames"]])
        if obj.get("__Pickled__", 0) > 0:
            withheld = True
            return _WITHHELD
        return msgpack_decode_default(obj)

    return msgpack.loads(frames[0], object_hook=hook, use_list=False, **msgpack_opts), withheld


class GuardedTLS(TLS):
    """A TLS comm accepted by a guarded server: what it reads depends on the peer's certificate.

    Trusted peers (role ``client``) read exactly as ``TLS`` does. A ``worker`` peer's
    messages are decoded by :func:`peek`, admitted by the server's :class:`Gate` (the
    handshake, then request ops, then, after ``register-worker``, its stream), and refused by
    closing the connection (a request expecting a reply first gets a ``PermissionError``).
    """

    def __init__(self, stream: Any, local_addr: str, peer_addr: str, deserialize: bool = True, *, gate: Gate):
        super().__init__(stream, local_addr, peer_addr, deserialize)
        self.guard(gate)

    def guard(self, gate: Gate) -> None:
        """Decide, once per connection, who the peer is and whether it is trusted."""
        self.gate = gate
        self.peer = Peer.from_peercert(self._extra.get("peercert"))
        self._refusal = gate.refuse_connection(self.peer)
        self._trusted = self._refusal is None and self.peer is not None and gate.trusts(self.peer)
        self._handshaken = False
        self._streaming = False
        # a worker peer must also be on the live-worker list (checked once, on its first message)
        self._unlisted = gate.live is not None and self.peer is not None and self.peer.role == ROLE_WORKER

    async def write(self, msg: Any, serializers: Any = None, on_error: str = "message") -> int:
        n = await super().write(msg, serializers, on_error)
        if self.gate.traffic is not None:
            self.gate.traffic.add(self.peer, sent=n)
        return n

    async def read(self, deserializers: Any = None) -> Any:
        if self._refusal is not None:
            await self._refuse(self._refusal, None)
        if self._unlisted:
            assert self.gate.live is not None and self.peer is not None
            if not await self.gate.live.wait_admitted(self.peer, ROSTER_WAIT_S):
                await self._refuse(
                    "it is not on the live-worker list (a replaced, preempted or released instance's "
                    "certificate)", None)
            self._unlisted = False
        if self._trusted:
            if self.gate.traffic is None:
                return await super().read(deserializers)
            return await from_frames(await self._read_frames(), deserialize=self.deserialize,
                                     deserializers=deserializers, allow_offload=self.allow_offload)
        assert self.peer is not None
        frames = await self._read_frames()
        try:
            msg, withheld = peek(frames, deserializing=self.deserialize)
        except Exception as e:  # noqa: BLE001 - a malformed message is refused like a forbidden one
            await self._refuse(f"its message cannot be decoded ({type(e).__name__})", None)
        op = msg.get("op") if isinstance(msg, dict) else None
        if not self._handshaken:
            self._handshaken = True
            why = None if isinstance(msg, dict) and op is None else "the handshake is not a plain dict"
        elif self._streaming:
            why = self.gate.refuse_stream(self.peer, msg)
        else:
            why = self.gate.refuse_request(self.peer, msg)
        if why is None and withheld and op not in self.gate.rules.data:
            why = f"'{op}' carries pickled objects, which this {self.gate.rules.server} does not unpickle from hosts"
        if why is not None:
            await self._refuse(why, msg if not self._streaming else None)
        if op is not None and op == self.gate.rules.opens_stream:
            self._streaming = True
        if withheld:  # a data op: its payload is deserialized as Dask would
            msg = await from_frames(frames, deserialize=self.deserialize, deserializers=deserializers,
                                    allow_offload=self.allow_offload)
        return msg

    async def _read_frames(self) -> list[Any]:
        """The frames of one message, read as ``TCP.read`` reads them."""
        stream = self.stream
        if stream is None:
            raise CommClosedError()
        try:
            (nbytes,) = struct.unpack("Q", await stream.read_bytes(struct.calcsize("Q")))
            frames, buffers_nbytes = unpack_frames(await read_bytes_rw(stream, nbytes), partial=True)
            for n in buffers_nbytes:
                frames.append(await read_bytes_rw(stream, n))
            if self.gate.traffic is not None:
                self.gate.traffic.add(self.peer, received=struct.calcsize("Q") + nbytes + sum(buffers_nbytes))
        except (StreamClosedError, SSLError) as e:
            self.stream = None
            self._closed = True
            convert_stream_closed_error(self, e)
        except BaseException:
            self.abort()
            raise
        return frames

    async def _refuse(self, why: str, msg: Any) -> None:
        op = msg.get("op") if isinstance(msg, dict) else None
        text = f"dask-vastai refused {self.peer or 'a peer'} at this {self.gate.rules.server}: {why}"
        logger.warning("%s (from %s)", text, self.peer_address)
        if isinstance(msg, dict) and op is not None and msg.get("reply", True):
            try:
                await self.write(error_message(PermissionError(text), status="uncaught-error"))
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass
        self.abort()
        raise CommClosedError(text)


def guard_listener(listener: Any, gate: Gate) -> None:
    """Make a listener hand out :class:`GuardedTLS` comms (before it accepted anything)."""
    if not isinstance(listener, TLSListener):
        raise RuntimeError(
            f"{listener!r}: dask-vastai's role checks need TLS listeners (tls://), whose peers "
            "present certificates; this one is not"
        )
    listener.comm_class = functools.partial(GuardedTLS, gate=gate)


def guard_server(server: Any, gate: Gate) -> None:
    """Guard every listener of a server; drop connections it took before (none are expected)."""
    for listener in server.listeners:
        guard_listener(listener, gate)
    for comm in list(getattr(server, "_comms", {})):
        if not isinstance(comm, GuardedTLS):
            logger.warning("dask-vastai: closing %s, accepted before the role checks were in place", comm)
            comm.abort()


def worker_clients_allowed() -> bool:
    """On an instance: whether the cluster lets workers act as clients (``allow_worker_clients``)."""
    return bool(dask.config.get(WORKER_CLIENTS_KEY, False))


# -------------------------------------------------------------------- servers
class GuardedScheduler(Scheduler):
    """The cluster's scheduler: ``worker`` peers may do what workers do, and nothing more."""

    def __init__(self, *args: Any, gate: Gate | None = None, **kwargs: Any) -> None:
        self.gate = gate or Gate(SCHEDULER_RULES)
        super().__init__(*args, **kwargs)

    async def listen(self, *args: Any, **kwargs: Any) -> None:
        await super().listen(*args, **kwargs)
        guard_server(self, self.gate)


class GuardedWorker(Worker):
    """A worker that takes control only from the ``client`` role and data fetches from workers.

    Its environment may add (the cluster sets it per incarnation): :data:`LISTEN_HOST_ENV`, the
    host to bind (direct mode: the listener is reached on a port the host maps from its public
    address; the nanny stays on loopback), whose connections' bytes it then counts and reports
    (:data:`TRAFFIC_METRIC`); :data:`ROSTER_ENV`, accept worker peers only from the live-worker
    list the scheduler pushes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        public_host = os.environ.get(LISTEN_HOST_ENV)
        if public_host:
            kwargs["host"] = public_host
        super().__init__(*args, **kwargs)
        self.gate = Gate(WORKER_RULES, worker_clients=worker_clients_allowed())
        if os.environ.get(ROSTER_ENV):
            self.gate.live = LivePeers()
            self.stream_handlers[ROSTER_OP] = self._live_peers
        if public_host:
            self.gate.traffic = ListenerTraffic()
            self.metrics[TRAFFIC_METRIC] = self.gate.traffic.report
            # the counters now, for the scheduler before it retires this worker (not a worker's request)
            self.handlers[TRAFFIC_METRIC] = self._traffic_report
        # a renewed certificate, when the cluster writes one, for the connections made after it
        certificate_reload.install(self)
        if self.gate.worker_clients:
            # A task's client presents this worker's own certificate (the scheduler then
            # lets it act as a client: the cluster allowed it).
            self.security.tls_client_cert = self.security.tls_worker_cert
            self.security.tls_client_key = self.security.tls_worker_key

    async def listen(self, *args: Any, **kwargs: Any) -> None:
        await super().listen(*args, **kwargs)
        guard_server(self, self.gate)

    async def close(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate.traffic is not None and self.status.name not in ("closing", "closed"):
            # the last bytes (a retiring worker hands its data over just before): heartbeats
            # stop now, so they go as an event on the stream, which closing flushes
            self.log_event(TRAFFIC_METRIC, self.gate.traffic.report(self))
        return await super().close(*args, **kwargs)

    def _traffic_report(self) -> dict[str, Any]:
        assert self.gate.traffic is not None
        return self.gate.traffic.report(self)

    def _live_peers(self, peers: Mapping[str, str], **_: Any) -> None:
        """The scheduler's live-worker list (on the scheduler's own stream: trusted)."""
        if self.gate.live is not None:
            self.gate.live.update(peers)

    def _get_client(self, timeout: float | None = None) -> Any:
        if not self.gate.worker_clients:
            raise WorkerClientsDisabled(
                f"a task on worker {self.name!r} asked for a client (get_client(), worker_client(), "
                "or a Future, Event, Lock, Queue or Variable used inside a task); the hosts of this "
                "cluster act only as workers. If tasks must submit tasks, create the cluster with "
                "VastAICluster(allow_worker_clients=True) (config vastai.allow-worker-clients): that "
                "lets every host run code on every other host and on the scheduler's machine"
            )
        return super()._get_client(timeout)


def dask_setup(server: Any) -> None:
    """``--preload-nanny`` hook: guard the nanny's listener (it just started, nothing accepted)."""
    if not isinstance(server, Nanny):
        raise TypeError(f"{__name__} is a nanny preload; workers use --worker-class {__name__}.GuardedWorker")
    try:
        guard_server(server, Gate(NANNY_RULES, own_name=str(server.name), worker_clients=worker_clients_allowed()))
        certificate_reload.install(server)  # started with the nanny's other periodic callbacks
    except BaseException:
        # Fail closed: a nanny that cannot check its peers takes no connection at all.
        for listener in server.listeners:
            listener.stop()
        raise


def scheduler_gate(*, worker_clients: bool, is_current: Callable[[Peer], bool] | None = None) -> Gate:
    """The gate of a cluster's scheduler."""
    return Gate(SCHEDULER_RULES, worker_clients=worker_clients, is_current=is_current)
