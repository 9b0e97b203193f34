"""SSH to the instances, and the flat ``tls://127.0.0.1:P`` address space built on it.

The only module that imports asyncssh. The scheduler stays on the user's machine (behind
NAT) and every dask connection runs inside SSH that the client opened. One
:class:`TunnelHub` per cluster holds one :class:`InstanceLink` (SSH connection) per rental
and the forwards that let the same address work from the scheduler, the client and every
worker:

* every instance gets a remote forward of the scheduler port ``S`` (instance
  ``127.0.0.1:S`` -> client ``127.0.0.1:S``);
* worker ``k`` listens on its instance's ``127.0.0.1:P_k``; the client gets a local forward
  ``127.0.0.1:P_k`` (and the nanny port) to it, and every *other* instance a remote forward
  ``127.0.0.1:P_k`` back to the client, so worker-to-worker traffic relays through the client.

Settings measured on a prototype of these tunnels: aes128-gcm (1.5-2x faster than asyncssh's
default chacha20 here), compression off, keepalive every few seconds (a silent drop is
otherwise invisible for minutes), and our own forward listeners that open their channels with
a large window (about 4x the throughput on a 40 ms link): asyncssh's ``window=`` sizes session
channels only, while ``forward_local_port`` and ``forward_remote_port`` always open theirs
with its 2 MiB default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh.listener import create_tcp_forward_listener

from .bootstrap import STOP_WORKERS_COMMAND
from .exceptions import HostKeyMismatch, PortBusy, SSHUnreachable, TunnelError
from .traffic import Traffic

logger = logging.getLogger(__name__)

#: Ports are drawn from here: above the usual ephemeral range's start on macOS (49152) is
#: avoided so that a port we test free is not soon taken by an outgoing connection on Linux.
PORT_RANGE = (20000, 32000)
_MAX_PKTSIZE = 256 * 1024


@dataclass(frozen=True)
class SSHEndpoint:
    """Where an instance's sshd listens (direct mapped port 22, or Vast's proxy)."""

    host: str
    port: int
    username: str = "root"

    def __str__(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


class ClusterKey:
    """A per-cluster ed25519 key pair, in memory only.

    Its public half goes into each instance's ``authorized_keys`` through the onstart script,
    never into the Vast account: account keys reach every future instance and outlive a crash.
    """

    def __init__(self, private: asyncssh.SSHKey) -> None:
        self.private = private
        self.public_openssh: str = private.export_public_key("openssh").decode().strip()

    @classmethod
    def generate(cls, comment: str) -> ClusterKey:
        return cls(asyncssh.generate_private_key("ssh-ed25519", comment=comment))

    def __repr__(self) -> str:
        return f"<ClusterKey {self.public_openssh.split()[-1]}>"


class HostKeyPin:
    """The SSH host keys one rental may present: every connection to it is checked against them.

    Made from the keys its sshd printed into the instance's log, which the client reads
    through Vast's authenticated HTTPS API before the first connection, so an impostor on
    the path (a hijacked address, a compromised proxy) is refused during the key exchange,
    before authentication, any forward or any file. Without keys (the log had none in
    time) the first key a connection meets is pinned (trust on first use) and a changed key
    is refused ever after, reconnects included. One pin per rental: a new rental gets its own.
    """

    def __init__(self, keys: Sequence[str] = (), *, source: str) -> None:
        #: where the keys came from, for messages ("the log of instance 123")
        self.source = source
        self._keys: list[asyncssh.SSHKey] = []
        for text in keys:
            try:
                self._keys.append(asyncssh.import_public_key(text))
            except (asyncssh.KeyImportError, ValueError) as e:
                logger.warning("ignoring a host key in %s that is not an OpenSSH public key: %s", source, e)
        #: the fingerprint of the last key refused (for the error message)
        self.refused: str | None = None

    @property
    def first_use(self) -> bool:
        """No key pinned yet: the next connection pins the key it meets."""
        return not self._keys

    def fingerprints(self) -> list[str]:
        return [k.get_fingerprint("sha256") for k in self._keys]

    def __repr__(self) -> str:
        keys = ", ".join(self.fingerprints()) or "trust on first use"
        return f"<HostKeyPin {keys} from {self.source}>"

    def connect_options(self) -> dict[str, Any]:
        """asyncssh options that accept only these keys (any, on first use)."""
        return {"known_hosts": (list(self._keys), [], []), "client_factory": lambda: _HostKeyCheck(self)}

    def pin(self, conn: asyncssh.SSHClientConnection) -> None:
        """After a first-use connection: its server's key is the only one from now on."""
        if self._keys:
            return
        key = conn.get_server_host_key()
        if key is None:  # pragma: no cover - asyncssh always has one after the key exchange
            raise TunnelError(f"no host key was seen on the first connection to {self.source}")
        self._keys = [key]
        self.source = f"the first connection ({self.source} had none)"


class _HostKeyCheck(asyncssh.SSHClient):
    """asyncssh asks this only for a key outside the pinned ones: refused, unless none is pinned."""

    def __init__(self, pin: HostKeyPin) -> None:
        self._pin = pin

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if self._pin.first_use:
            return True  # asyncssh still checks that the server holds the key's private half
        self._pin.refused = key.get_fingerprint("sha256")
        return False


class InstanceLink:
    """One SSH connection to one instance: commands, files, and the forwards the hub puts on it."""

    def __init__(self, name: str, endpoint: SSHEndpoint, conn: asyncssh.SSHClientConnection) -> None:
        self.name = name
        self.endpoint = endpoint
        self.conn = conn
        #: set when the connection is gone: lost (keepalive misses, reset) or closed
        self.closed = asyncio.Event()
        self.lost_reason: str | None = None
        self._closing = False
        self._callbacks: list[Callable[[], None]] = []
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._watch = asyncio.ensure_future(self._watch_closed())

    def __repr__(self) -> str:
        state = "closed" if self.closed.is_set() else "open"
        return f"<InstanceLink {self.name} {self.endpoint} {state}>"

    async def _watch_closed(self) -> None:
        try:
            await self.conn.wait_closed()
        finally:
            self.closed.set()
            if not self._closing:
                self.lost_reason = self.lost_reason or "connection closed by the instance or lost"
                logger.warning("SSH link %s to %s lost", self.name, self.endpoint)
                for callback in self._callbacks:
                    try:
                        callback()
                    except Exception:  # noqa: BLE001 - one bad callback must not hide the others
                        logger.exception("on_lost callback of link %s failed", self.name)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the link is lost, not when it is closed on purpose."""
        self._callbacks.append(callback)

    def expect_end(self) -> None:
        """The instance is about to be destroyed on purpose (the cluster closes): its end is no loss."""
        self._closing = True

    @property
    def end_expected(self) -> bool:
        """Closed, or about to be, on purpose: its end is no loss."""
        return self._closing

    async def run(self, command: str, *, timeout_s: float, check: bool = True) -> tuple[int, str, str]:
        """Run ``command`` through the instance's shell; (exit status, stdout, stderr).

        With ``check``, a non-zero status raises RuntimeError with the command's stderr.
        """
        try:
            result = await self.conn.run(command, check=False, timeout=timeout_s)
        except asyncssh.TimeoutError as e:
            raise TimeoutError(
                f"command on {self.name} ({self.endpoint}) did not finish within {timeout_s:.0f}s: "
                f"{command[:200]!r}"
            ) from e
        except (asyncssh.Error, OSError) as e:
            raise TunnelError(f"cannot run a command on {self.name} ({self.endpoint}): {e}") from e
        status = result.exit_status if result.exit_status is not None else -1
        out, err = _text(result.stdout), _text(result.stderr)
        if check and status != 0:
            raise RuntimeError(
                f"command on {self.name} ({self.endpoint}) exited with status {status}: "
                f"{command[:200]!r}\nstderr: {err[-2000:]}"
            )
        return status, out, err

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is None:
                self._sftp = await self.conn.start_sftp_client()
            return self._sftp

    async def put(self, remote_path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write ``data`` to ``remote_path`` atomically (temporary name, then rename).

        Parent folders are made (0700). Readers on the instance never see a partial file.
        """
        parent, _, base = remote_path.rpartition("/")
        tmp = f"{parent}/.{base}.{random.getrandbits(32):08x}.tmp"
        try:
            sftp = await self._sftp_client()
            if parent:
                await sftp.makedirs(parent, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
            async with sftp.open(tmp, "wb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
                await f.write(data)
            await sftp.chmod(tmp, mode)
            await sftp.posix_rename(tmp, remote_path)
        except (asyncssh.Error, OSError) as e:
            raise TunnelError(f"cannot write {remote_path} on {self.name} ({self.endpoint}): {e}") from e

    async def get(self, remote_path: str) -> bytes:
        """The contents of ``remote_path`` on the instance."""
        try:
            sftp = await self._sftp_client()
            async with sftp.open(remote_path, "rb") as f:
                return await f.read()
        except (asyncssh.Error, OSError) as e:
            raise TunnelError(f"cannot read {remote_path} on {self.name} ({self.endpoint}): {e}") from e

    async def heartbeat(self, path: str = "/root/.dask-vastai/heartbeat") -> None:
        """Tell the instance's watchdog that the client is alive (it reads the file's mtime)."""
        await self.put(path, f"{time.time():.3f}\n".encode())

    async def close(self) -> None:
        self._closing = True
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 5)
        self.closed.set()


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Exposed:
    """One worker incarnation's forwards: local ones to its link, remote ones on the others."""

    link: InstanceLink
    worker_port: int
    nanny_port: int
    local: list[Any] = field(default_factory=list)
    remote: dict[str, Any] = field(default_factory=dict)  # link name -> remote listener


class TunnelHub:
    """Every SSH link of one cluster and its flat tls://127.0.0.1:P address space."""

    def __init__(
        self,
        key: ClusterKey,
        *,
        scheduler_port: int,
        keepalive_interval_s: float = 3,
        keepalive_count_max: int = 3,
        connect_timeout_s: float = 20,
        forward_window: int = 16 * 2**20,
        stop_command: str | None = STOP_WORKERS_COMMAND,
    ) -> None:
        self.key = key
        self.scheduler_port = scheduler_port
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_count_max = keepalive_count_max
        self.connect_timeout_s = connect_timeout_s
        self.forward_window = forward_window
        #: run (best effort) before a link is closed on purpose, so the workers stop in order
        self.stop_command = stop_command
        self.links: dict[str, InstanceLink] = {}
        self._exposed: dict[int, _Exposed] = {}
        self._used_ports: set[int] = {scheduler_port}
        self._ports_lock = asyncio.Lock()
        self._mesh_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<TunnelHub scheduler_port={self.scheduler_port} links={sorted(self.links)} workers={sorted(self._exposed)}>"

    # ---------------------------------------------------------------- links
    async def _open(
        self, endpoint: SSHEndpoint, timeout_s: float, host_keys: HostKeyPin, traffic: Traffic | None = None
    ) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            endpoint.host,
            endpoint.port,
            # asyncssh opens the TCP connection through this: every byte of the link is counted
            tunnel=_CountedDial(traffic) if traffic is not None else (),
            username=endpoint.username,
            client_keys=[self.key.private],
            **host_keys.connect_options(),
            # Nothing of the user's SSH setup reaches a stranger's host: no ~/.ssh/config
            # (ForwardAgent, ForwardX11Trusted, ProxyCommand, SendEnv...), no agent, no other
            # way to authenticate than the cluster's own key.
            config=None,
            agent_path=None,
            agent_forwarding=False,
            x11_forwarding=False,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_auth=False,
            gss_kex=False,
            encryption_algs=["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"],
            compression_algs=["none"],
            keepalive_interval=self.keepalive_interval_s,
            keepalive_count_max=self.keepalive_count_max,
            connect_timeout=timeout_s,
            login_timeout=timeout_s,
        )

    async def connect(
        self, name: str, endpoint: SSHEndpoint, *, timeout_s: float, host_keys: HostKeyPin | None = None,
        silent_timeout_s: float | None = None, traffic: Traffic | None = None,
    ) -> InstanceLink:
        """An SSH link to ``endpoint`` with the scheduler and all existing workers forwarded.

        ``host_keys``: the rental's pinned host keys (one object for its first connection and
        every reconnect); None trusts the first key met, for this call only. A server
        presenting another key is refused during the key exchange, before anything is sent:
        :class:`HostKeyMismatch`, never retried. Otherwise retries until the instance's sshd
        accepts our key (it boots, then the onstart script authorizes the key) or ``timeout_s``
        passes: then TimeoutError naming the endpoint and the last error. ``traffic`` (the
        rental's) is credited with every byte of the connection, both ways. With
        ``silent_timeout_s``, gives up sooner, with :class:`SSHUnreachable`, when the endpoint
        has not accepted a TCP connection by then (SYNs dropped or refused: a blocked port), so
        that another endpoint can be tried; once it accepted one, the whole ``timeout_s`` is
        waited (sshd may still be starting, or the onstart may not have authorized our key yet).
        """
        pin = host_keys if host_keys is not None else HostKeyPin(source=f"{name} at {endpoint}")
        started = time.monotonic()
        deadline = started + timeout_s
        delay, last_error, answered = 0.5, "no attempt made", silent_timeout_s is None
        while True:
            left = deadline - time.monotonic()
            if not answered:
                silent_left = started + float(silent_timeout_s or 0) - time.monotonic()
                if silent_left <= 0:
                    raise SSHUnreachable(
                        f"{endpoint} ({name}) accepted no connection within {silent_timeout_s:.0f}s; "
                        f"last error: {last_error}"
                    )
                left = min(left, silent_left)
            if left <= 0:
                raise TimeoutError(
                    f"could not open SSH to {name} at {endpoint} within {timeout_s:.0f}s; last error: {last_error}"
                )
            try:
                if not answered:
                    # One plain TCP connect first, given the whole silent window: the kernel
                    # retransmits a lost SYN after 1, 2, 4, 8 s... so a lossy path still answers.
                    await _tcp_answers(endpoint, max(left, 0.1))
                    answered = True
                    continue
                conn = await self._open(endpoint, min(self.connect_timeout_s, max(left, 1.0)), pin, traffic)
                pin.pin(conn)
                break
            except asyncssh.HostKeyNotVerifiable as e:
                raise HostKeyMismatch(
                    f"refused SSH to {name} at {endpoint}: it presented the host key {pin.refused or '(unknown)'}, "
                    f"not the one pinned from {pin.source} ({', '.join(pin.fingerprints())}). Someone else "
                    "answers at that address (a man in the middle, or another machine); nothing was sent to it"
                ) from e
            except (TimeoutError, OSError, asyncssh.Error) as e:
                last_error = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (no answer)"
                logger.debug("SSH to %s (%s) not ready: %s", name, endpoint, last_error)
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 5.0)
        link = InstanceLink(name, endpoint, conn)
        link.on_lost(lambda: asyncio.ensure_future(self._forget(link)))
        try:
            async with self._mesh_lock:
                await self._remote_forward(link, self.scheduler_port, what="the scheduler port")
                others = [e for e in self._exposed.values() if e.link is not link]
                listeners = await asyncio.gather(
                    *(self._remote_forward(link, e.worker_port, what=f"worker port {e.worker_port}") for e in others)
                )
                for exposed, listener in zip(others, listeners, strict=True):
                    exposed.remote[name] = listener
                old = self.links.get(name)
                self.links[name] = link
        except BaseException:
            await link.close()
            raise
        if old is not None and old is not link:
            # Same instance, same files: the stop command would stop the new link's workers too.
            await self.close_link(old, stop_workers=False)
        return link

    async def _forget(self, link: InstanceLink) -> None:
        """A lost link's workers are gone: drop their forwards so no new link mirrors them."""
        async with self._mesh_lock:
            if self.links.get(link.name) is link:
                del self.links[link.name]
            dropped = [self._exposed.pop(p) for p, e in list(self._exposed.items()) if e.link is link]
            for exposed in self._exposed.values():
                exposed.remote.pop(link.name, None)
        for exposed in dropped:
            await _close_listeners(exposed)

    async def _remote_forward(self, link: InstanceLink, port: int, *, what: str) -> Any:
        """Instance ``127.0.0.1:port`` -> client ``127.0.0.1:port``, channels with a large window."""
        conn = link.conn

        def session_factory(orig_host: str, orig_port: int) -> Any:
            return conn.forward_connection("127.0.0.1", port)

        try:
            return await conn.create_server(
                session_factory, "127.0.0.1", port, window=self.forward_window, max_pktsize=_MAX_PKTSIZE
            )
        except asyncssh.ChannelListenError as e:
            raise PortBusy(
                f"{link.name} ({link.endpoint}) refused to listen on 127.0.0.1:{port} for {what} "
                f"(busy there, or sshd has AllowTcpForwarding off): {e}",
                port,
            ) from e

    async def _local_forward(self, link: InstanceLink, port: int) -> Any:
        """Client ``127.0.0.1:port`` -> the link's ``127.0.0.1:port``, channels with a large window."""
        conn = link.conn
        window = self.forward_window

        async def tunnel(session_factory: Any, orig_host: str, orig_port: int) -> Any:
            return await conn.create_connection(
                session_factory, "127.0.0.1", port, orig_host, orig_port, window=window, max_pktsize=_MAX_PKTSIZE
            )

        try:
            return await create_tcp_forward_listener(conn, asyncio.get_running_loop(), tunnel, "127.0.0.1", port)
        except OSError as e:
            raise PortBusy(f"cannot listen on the client's 127.0.0.1:{port} for {link.name}: {e}", port) from e

    # ---------------------------------------------------------------- ports
    async def allocate_ports(self, count: int) -> list[int]:
        """``count`` ports never handed out before by this hub and free on the client now.

        They are checked on the instances when forwarded (:meth:`expose_worker` picks others
        where one is busy there).
        """
        async with self._ports_lock:
            out: list[int] = []
            for _ in range(count):
                for _attempt in range(1000):
                    port = random.randint(*PORT_RANGE)
                    if port in self._used_ports:
                        continue
                    self._used_ports.add(port)  # even when busy: never try it again
                    if _free_on_client(port):
                        out.append(port)
                        break
                else:
                    raise TunnelError(f"no free port left in {PORT_RANGE} on this machine after 1000 tries")
            return out

    # -------------------------------------------------------------- workers
    async def expose_worker(self, link: InstanceLink, worker_port: int, nanny_port: int) -> tuple[int, int]:
        """Forward a worker's ports everywhere before it starts; the ports actually used.

        Client: local forwards of ``worker_port`` and ``nanny_port`` to ``link``. Every other
        link: a remote forward of ``worker_port`` (workers never call other nannies). Where a
        port is busy (on the client or another instance) fresh ports replace both, so use the
        returned pair in the incarnation.
        """
        for _attempt in range(5):
            try:
                await self._expose(link, worker_port, nanny_port)
                return worker_port, nanny_port
            except PortBusy as e:
                logger.info("port %d busy (%s); picking fresh ports for %s", e.port, e, link.name)
                worker_port, nanny_port = await self.allocate_ports(2)
        raise TunnelError(f"could not find free ports for a worker on {link.name} after 5 tries")

    async def _expose(self, link: InstanceLink, worker_port: int, nanny_port: int) -> None:
        if link.closed.is_set():
            raise TunnelError(f"link {link.name} ({link.endpoint}) is closed: {link.lost_reason or 'closed'}")
        exposed = _Exposed(link, worker_port, nanny_port)
        async with self._mesh_lock:
            others = [other for other in self.links.values() if other is not link and not other.closed.is_set()]
            results = await asyncio.gather(
                self._local_forward(link, worker_port),
                self._local_forward(link, nanny_port),
                *(self._remote_forward(o, worker_port, what=f"worker port {worker_port}") for o in others),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            for r in results[:2]:
                if not isinstance(r, BaseException):
                    exposed.local.append(r)
            for other, r in zip(others, results[2:], strict=True):
                if not isinstance(r, BaseException):
                    exposed.remote[other.name] = r
            if errors:
                await _close_listeners(exposed)
                busy = [e for e in errors if isinstance(e, PortBusy)]
                raise busy[0] if busy else errors[0]
            self._exposed[worker_port] = exposed

    async def expose_nanny(self, link: InstanceLink, nanny_port: int) -> int:
        """A direct worker's nanny: a local forward from the client only; the port actually used.

        The worker itself is reached at its public address; its nanny (restarts, its worker's
        graceful close) stays in the tunnel. :meth:`unexpose_worker` with the returned port
        closes it.
        """
        for _attempt in range(5):
            if link.closed.is_set():
                raise TunnelError(f"link {link.name} ({link.endpoint}) is closed: {link.lost_reason or 'closed'}")
            try:
                async with self._mesh_lock:
                    listener = await self._local_forward(link, nanny_port)
                    self._exposed[nanny_port] = _Exposed(link, 0, nanny_port, local=[listener])
                return nanny_port
            except PortBusy as e:
                logger.info("port %d busy (%s); picking a fresh nanny port for %s", e.port, e, link.name)
                (nanny_port,) = await self.allocate_ports(1)
        raise TunnelError(f"could not find a free nanny port for a worker on {link.name} after 5 tries")

    async def unexpose_worker(self, worker_port: int) -> None:
        """Close a worker's forwards everywhere (it left, or its incarnation is replaced)."""
        async with self._mesh_lock:
            exposed = self._exposed.pop(worker_port, None)
        if exposed is not None:
            await _close_listeners(exposed)

    # -------------------------------------------------------------- closing
    async def close_link(self, link: InstanceLink, *, stop_workers: bool = True) -> None:
        """Stop the link's workers (best effort), drop its forwards everywhere, close it."""
        if stop_workers and self.stop_command and not link.closed.is_set():
            with contextlib.suppress(Exception):
                await link.run(self.stop_command, timeout_s=8, check=False)
        async with self._mesh_lock:
            if self.links.get(link.name) is link:
                del self.links[link.name]
            mine = [port for port, e in self._exposed.items() if e.link is link]
            dropped = [self._exposed.pop(port) for port in mine]
            for exposed in self._exposed.values():
                exposed.remote.pop(link.name, None)  # they die with the connection
        for exposed in dropped:
            await _close_listeners(exposed)
        await link.close()

    def expect_ends(self) -> None:
        """Every instance is about to be destroyed (the cluster closes, and destroys them all in
        one call while some links are still being torn down): their ends are not losses, neither
        logged as such nor answered with a reconnect."""
        for link in self.links.values():
            link.expect_end()

    async def close(self) -> None:
        """Close every link (their workers are asked to stop first)."""
        await asyncio.gather(*(self.close_link(link) for link in list(self.links.values())), return_exceptions=True)
        for exposed in list(self._exposed.values()):
            await _close_listeners(exposed)
        self._exposed.clear()


class _CountedDial:
    """asyncssh's ``tunnel`` hook, opening a plain TCP connection whose bytes it counts.

    asyncssh asks a tunnel object only for ``create_connection(factory, host, port)`` and
    uses what it returns as the SSH connection; between the two sits :class:`_CountedProtocol`.
    Bytes here are the rental's: what this machine sends, the instance receives (``down``).
    """

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    async def create_connection(self, session_factory: Callable[[], Any], host: str, port: int) -> tuple[Any, Any]:
        counted = _CountedProtocol(session_factory(), self.traffic)
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: counted, host, port)
        return transport, counted.inner


class _CountedProtocol(asyncio.Protocol):
    def __init__(self, inner: Any, traffic: Traffic) -> None:
        self.inner = inner
        self.traffic = traffic

    def connection_made(self, transport: Any) -> None:
        self.inner.connection_made(_CountedTransport(transport, self.traffic))

    def data_received(self, data: bytes) -> None:
        self.traffic.up += len(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _CountedTransport:
    """The transport asyncssh writes to, counting what it writes (the rest passes through)."""

    def __init__(self, transport: Any, traffic: Traffic) -> None:
        self._transport = transport
        self._traffic = traffic

    def write(self, data: bytes) -> None:
        self._traffic.down += len(data)
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _close_listeners(exposed: _Exposed) -> None:
    listeners = [*exposed.local, *exposed.remote.values()]
    exposed.local, exposed.remote = [], {}
    for listener in listeners:
        with contextlib.suppress(Exception):
            listener.close()
    for listener in listeners:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.wait_closed(), 5)


async def _tcp_answers(endpoint: SSHEndpoint, timeout_s: float) -> None:
    """Return once ``endpoint`` accepts a TCP connection (closed at once); raise otherwise."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(endpoint.host, endpoint.port), timeout_s)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _free_on_client(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
