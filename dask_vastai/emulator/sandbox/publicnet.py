"""The "public IP" seen from inside: other instances' mapped ports at 127.0.0.1:HOSTPORT.

On Vast, an instance reaches another one (direct mode: a worker advertising
``PUBLIC_IPADDR:VAST_TCP_PORT_x``) the way the client does. Here the public IP is the
host's 127.0.0.1, which inside a sandbox is the sandbox's own loopback. So each sandbox's
init listens on its own ``127.0.0.1:HOSTPORT`` for every port mapped by any sandbox of the
runtime, and forwards each connection through this unix socket to the host's
``127.0.0.1:HOSTPORT``. Only mapped ports are allowed through: the host's other services
stay unreachable. No bridge and no root needed.

A mapped port that hangs on its host (variant ``direct_blocked``, mode ``hang``) is
announced as ``~PORT``: each init then makes its own ``127.0.0.1:PORT`` drop SYNs too, so
another instance's connection hangs as the client's does. A refusing one is not
announced (inside, nothing listens there: refused).

Protocol, one line first: ``WATCH`` (then ``+PORT``/``~PORT``/``-PORT`` lines, ``=``
after the initial set) or ``CONNECT PORT`` (answered with one byte carrying the connected
socket, ``SCM_RIGHTS``; or closed, refused). The sandbox's init relays between that socket
and its own connection, and meters what crosses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterable


class PublicNet:
    """The host end: which ports are public, and the relay to them."""

    def __init__(self, public_ipaddr: str) -> None:
        self.public_ipaddr = public_ipaddr
        self.path: str | None = None
        self._ports: set[int] = set()
        self._hanging: set[int] = set()
        self._watchers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None

    async def socket_in(self, directory: str) -> str:
        """The unix socket's path (started on first use) in ``directory``."""
        if self._server is None:
            path = os.path.join(directory, "public.sock")
            self._server = await asyncio.start_unix_server(self._handle, path)
            os.chmod(path, 0o666)  # the sandbox's root is no host user: it connects as "other"
            self.path = path
        assert self.path is not None
        return self.path

    def publish(self, ports: Iterable[int], *, hang: bool = False) -> None:
        """Announce mapped ports: reachable, or (``hang``) dropping every connection."""
        if hang:
            self._announce(b"~", set(ports) - self._hanging)
        else:
            self._announce(b"+", set(ports) - self._ports)

    def withdraw(self, ports: Iterable[int]) -> None:
        self._announce(b"-", set(ports) & (self._ports | self._hanging))

    def _announce(self, sign: bytes, ports: set[int]) -> None:
        if sign == b"+":
            self._ports |= ports
        elif sign == b"~":
            self._hanging |= ports
        else:
            self._ports -= ports
            self._hanging -= ports
        lines = b"".join(sign + str(p).encode() + b"\n" for p in sorted(ports))
        for writer in list(self._watchers):
            if lines and not writer.is_closing():
                writer.write(lines)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await asyncio.wait_for(reader.readline(), 10)).decode().split()
        except (TimeoutError, OSError, ConnectionError, UnicodeDecodeError):
            writer.close()
            return
        if request == ["WATCH"]:
            writer.write(b"".join(b"+%d\n" % p for p in sorted(self._ports))
                         + b"".join(b"~%d\n" % p for p in sorted(self._hanging)) + b"=\n")
            self._watchers.add(writer)
            try:
                await reader.read()  # until the sandbox goes away
            except (OSError, ConnectionError):
                pass
            finally:
                self._watchers.discard(writer)
                writer.close()
        elif len(request) == 2 and request[0] == "CONNECT" and request[1].isdigit() \
                and int(request[1]) in self._ports:
            await self._hand_over(int(request[1]), writer)
        else:
            writer.close()  # not a mapped port: the host's own services stay out of reach

    async def _hand_over(self, port: int, writer: asyncio.StreamWriter) -> None:
        """Connect the public port and pass the connected socket to the sandbox that asked.

        The sandbox's init then joins it to its own connection: the bytes flow between the two
        sandboxes through the kernel, and this process (the emulator) is not in their path.
        """
        loop = asyncio.get_running_loop()
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(up, (self.public_ipaddr, port)), 30)
            asker = writer.get_extra_info("socket")
            with socket.socket(fileno=os.dup(asker.fileno())) as channel:
                channel.setblocking(True)
                socket.send_fds(channel, [b"+"], [up.fileno()])
        except (OSError, TimeoutError):
            pass
        finally:
            up.close()
            writer.close()

    async def close(self) -> None:
        for writer in list(self._watchers):
            writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
