"""How a rental's workers are reached: inside the SSH tunnel, or directly on ports Vast maps.

``network="tunnel"`` (``tunnel.py``): every Dask connection runs inside SSH opened from this
machine; worker-to-worker bytes relay through it.

``network="direct"``: each worker listens on a container port above 70000, which Vast maps to
the same random port of the instance's public address (identity mapping: ``-p 70000:70000``,
the port in ``$VAST_TCP_PORT_70000`` and in the row's ``ports``). It binds that port on every
interface of the container and advertises ``tls://PUBLIC_IP:PORT``; the scheduler (here) and
the other workers connect to it there, with mutual TLS: each side presents its own
certificate from the cluster's CA, and the worker's role checks (``roles.py``) hold on these
connections as on any other. A worker accepts another worker only while the scheduler's
live-worker list (:class:`PeerRoster`) names it with its current certificate, so that a
replaced, preempted or released host's certificate opens nothing. The worker's link to the
scheduler and its nanny stay in the tunnel. The offer query asks for ``direct_port_count>=``
the ports one instance needs (its workers' and SSH's).

``network="auto"``: direct where an instance has the ports and they answer, tunnel otherwise;
the query is not narrowed.

Before a direct worker starts, its ports are probed from here (:func:`probe_direct`: a
listener started over SSH answers a token on each). A port that does not answer (a firewall
on the host drops or refuses it) sends that instance to tunnel mode, which the cluster says
once. Direct and tunnel workers reach each other: a tunnel worker's address is forwarded
into every instance (the mesh), and a direct worker's is public.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .roles import ROSTER_OP

if TYPE_CHECKING:
    from .tunnel import InstanceLink
    from .vast import Instance

TUNNEL, DIRECT, AUTO = "tunnel", "direct", "auto"
NETWORK_MODES = (TUNNEL, DIRECT, AUTO)
#: the first container port a direct worker asks for: above 70000 Vast maps a port to the same
#: number outside (a random one, told in ``VAST_TCP_PORT_<port>``), so the worker listens on
#: the number it is reached at
DIRECT_PORT_BASE = 70000


def check_network(value: Any, where: str = "network") -> str:
    """``value`` if it names a network mode, else ``ValueError`` naming the choices."""
    if value not in NETWORK_MODES:
        raise ValueError(
            f"{where}={value!r}: use 'tunnel' (every connection inside SSH), 'direct' (workers reach "
            "each other on the instances' mapped ports, offers with enough direct ports) or 'auto' "
            "(direct where an instance's ports answer, tunnel otherwise)"
        )
    return str(value)


def direct_container_ports(workers: int) -> tuple[int, ...]:
    """The container ports an instance of ``workers`` direct workers opens (``-p N:N``)."""
    return tuple(DIRECT_PORT_BASE + k for k in range(workers))


def direct_ports_needed(workers: int) -> int:
    """Mapped ports one instance needs in direct mode: one per worker, and SSH's."""
    return workers + 1


@dataclass(frozen=True)
class DirectPort:
    """Where one direct worker listens inside its container, and where it is reached."""

    listen_port: int
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"tls://{self.host}:{self.port}"


def direct_ports(row: Instance, workers: int) -> list[DirectPort] | None:
    """The direct ports of a running rental for its ``workers`` workers; None where it lacks one."""
    if not row.public_ipaddr:
        return None
    out = []
    for container_port in direct_container_ports(workers):
        public = row.ports.get(container_port)
        if not public:
            return None
        # identity mapping above 65535: the program listens on the number it is reached at
        listen = container_port if container_port <= 65535 else public
        out.append(DirectPort(listen, row.public_ipaddr, public))
    return out


#: On the instance: listen on every port given (all interfaces), answer each first connection
#: with the token, exit once all answered or the time is up. argv: seconds, token, ports...
_PROBE_LISTENER = r"""
import select, socket, sys, time
deadline, token = time.time() + float(sys.argv[1]), sys.argv[2].encode()
socks = []
for p in sys.argv[3:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(p)))
    s.listen(8)
    socks.append(s)
print("listening", flush=True)
left = set(socks)
while left and time.time() < deadline:
    for s in select.select(list(left), [], [], 0.5)[0]:
        c, _ = s.accept()
        try:
            c.sendall(token)
        finally:
            c.close()
        left.discard(s)
"""


async def probe_direct(link: InstanceLink, python: str, ports: Sequence[DirectPort], timeout_s: float) -> str | None:
    """None when every port answers from here within ``timeout_s``; else why not (for the user).

    A listener started over SSH on the instance answers a random token on each port; this
    machine connects to each public address until it reads the token or the time is up. A
    port behind a firewall that drops packets never answers; one that refuses keeps refusing.
    """
    token = secrets.token_hex(16)
    command = " ".join([
        shlex.quote(python), "-c", shlex.quote(_PROBE_LISTENER), f"{timeout_s:.1f}", token,
        *(str(p.listen_port) for p in ports),
    ])
    listener = asyncio.ensure_future(link.run(command, timeout_s=timeout_s + 15, check=False))
    deadline = time.monotonic() + timeout_s
    try:
        for port in ports:
            why = await _read_token(port, token.encode(), deadline)
            if why is not None:
                if listener.done() and not listener.cancelled() and listener.exception() is None:
                    status, _, err = listener.result()
                    if status not in (0, None) and err.strip():
                        why += f" (the listener on the instance: {err.strip()[-300:]})"
                return why
        return None
    finally:
        if not listener.done():
            listener.cancel()
        with contextlib.suppress(BaseException):
            await listener


async def _read_token(port: DirectPort, token: bytes, deadline: float) -> str | None:
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"its direct port {port.host}:{port.port} gave no answer within the probe's time ({last})"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(port.host, port.port), left)
        except TimeoutError:
            last = "the connection hung: packets dropped"
            continue
        except OSError as e:
            last = f"{type(e).__name__}: {e.strerror or e}"
        else:
            try:
                got = await asyncio.wait_for(reader.readexactly(len(token)), max(0.1, deadline - time.monotonic()))
                if got == token:
                    return None
                last = "something else answered there"
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                last = "it accepted, then closed (nothing listening behind it yet)"
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        await asyncio.sleep(0.2)


class PeerRoster(SchedulerPlugin):
    """Pushes the live-worker list to every worker whenever a worker comes or goes.

    Each worker then accepts a worker peer only when the list names it with the serial of its
    current certificate (``roles.LivePeers``). ``serial_of(name)`` is that serial, or the
    serials a renewal honours (the cluster's CA); :meth:`push` is also called when they change.
    """

    name = "dask-vastai-peer-roster"

    def __init__(self, scheduler: Any, serial_of: Callable[[str], int | tuple[int, ...] | None]) -> None:
        # Given here: Scheduler.add_plugin does not call start() on an in-process scheduler.
        self.scheduler = scheduler
        self.serial_of = serial_of

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        self.push()

    def remove_worker(self, scheduler: Any = None, worker: str | None = None, **kwargs: Any) -> None:
        self.push(leaving=worker)

    def peers(self, leaving: str | None = None) -> dict[str, str]:
        """Worker name -> its current certificate's serial (hex), for the registered workers;
        comma-separated serials while one is renewed (``serial_of`` gives both)."""
        out = {}
        for address, ws in list(self.scheduler.workers.items()):
            serials = self.serial_of(str(ws.name))
            if isinstance(serials, int):
                serials = (serials,)
            if address != leaving and serials:
                out[str(ws.name)] = ",".join(format(serial, "x") for serial in serials)
        return out

    def push(self, leaving: str | None = None) -> None:
        message = {"op": ROSTER_OP, "peers": self.peers(leaving)}
        for address in list(self.scheduler.workers):
            stream = self.scheduler.stream_comms.get(address)
            if address != leaving and stream is not None:
                with contextlib.suppress(Exception):  # a worker whose stream closed is leaving
                    stream.send(dict(message))

    def __repr__(self) -> str:
        return f"<PeerRoster {json.dumps(sorted(self.peers()))}>"
