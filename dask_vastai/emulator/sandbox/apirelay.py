"""The host end of the API relay: a unix socket that forwards to the emulator's API.

A unix socket on a bind-mounted path crosses network namespaces, so a sandbox can reach
the host's ``127.0.0.1:<api port>`` through it while having no route to anything else
of the host. The sandbox's init listens on its own ``127.0.0.1:<api port>`` and connects
each client here: the API then has the same URL inside an instance as outside.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a relayed connection, passing EOF on (shared by the host relays)."""
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError):
        writer.close()


class ApiRelay:
    """One unix socket per API origin, shared by every sandbox of a runtime."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, int], tuple[asyncio.AbstractServer, str]] = {}
        self._lock = asyncio.Lock()

    @staticmethod
    def api_port(api_url: str) -> tuple[str, int]:
        """Host and port of an ``http://127.0.0.1:5123``-style origin."""
        parts = urlsplit(api_url)
        if not parts.hostname:
            raise ValueError(f"api_url {api_url!r} has no host; expected e.g. http://127.0.0.1:5123")
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    async def socket_for(self, api_url: str, directory: str) -> str:
        """The path of the unix socket reaching ``api_url`` (started on first use)."""
        address = self.api_port(api_url)
        async with self._lock:
            if address in self._servers:
                return self._servers[address][1]
            path = os.path.join(directory, f"api-{address[1]}.sock")

            async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    up_reader, up_writer = await asyncio.open_connection(*address)
                except OSError:
                    writer.close()
                    return
                await asyncio.gather(splice(reader, up_writer), splice(up_reader, writer))
                writer.close()
                up_writer.close()

            server = await asyncio.start_unix_server(forward, path)
            os.chmod(path, 0o666)  # the sandbox's root is no host user: it connects as "other"
            self._servers[address] = (server, path)
            return path

    async def close(self) -> None:
        for server, _ in self._servers.values():
            server.close()
        self._servers.clear()
