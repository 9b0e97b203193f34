"""asyncssh's server, for sandboxes where OpenSSH cannot run (only one uid mapped).

Loaded by ``nsinit.py`` inside the sandbox (so: standard library plus asyncssh from the
read-only site-packages). It behaves like the OpenSSH configuration we use: public keys
from ``/root/.ssh/authorized_keys`` read at each login (onstart may append), exec and
shell sessions, SFTP and scp, local (-L) and remote (-R) forwards on the loopback, and
the session environment the sandbox's init gives it (variant ``ssh_env``).
"""

import asyncio
import os
from collections.abc import Callable

import asyncssh

AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"


class _Server(asyncssh.SSHServer):
    def __init__(self, remote_forward: bool = True) -> None:
        self._remote_forward = remote_forward

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        try:
            self._conn.set_authorized_keys(AUTHORIZED_KEYS)
        except (OSError, ValueError):
            self._conn.set_authorized_keys([])
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return self._remote_forward  # False: a proxy that refuses ssh -R (variant proxy_broken)


class _SFTPServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server, ending its session with an exit status as sshd does
    (without one, OpenSSH's ssh exits 255 and ``scp`` reports a failed copy)."""

    def exit(self) -> None:
        super().exit()
        try:
            self.channel.exit(0)
        except (OSError, asyncssh.Error):
            pass


def session_handler(spawn: Callable[[list[str], int, int, int], int],
                    wait: Callable[[int], "asyncio.Future[int]"]):
    """An asyncssh process factory running each command with ``bash -c`` via ``spawn``."""

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        argv = ["/bin/bash", "-c", process.command] if process.command else ["/bin/bash", "-l"]
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = spawn(argv, in_r, out_w, err_w)
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        exited = wait(pid)
        await process.redirect(stdin=os.fdopen(in_w, "wb", 0))
        # copy the output ourselves: the exit status must follow the last byte
        await asyncio.gather(_copy_pipe(out_r, process.stdout), _copy_pipe(err_r, process.stderr))
        code = await exited
        process.exit(code if code >= 0 else 128 - code)

    return handle


async def _copy_pipe(fd: int, writer: asyncssh.SSHWriter) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", 0))
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncssh.Error):
        pass
    finally:
        transport.close()


async def serve_connection(sock, host_keys: list, spawn, wait, remote_forward: bool = True) -> None:
    """Run one SSH server connection on an accepted socket (``remote_forward`` False refuses -R).

    ``host_keys``: the private keys (OpenSSH text) it presents, as sshd's ``HostKey`` lines do.
    """
    await asyncssh.run_server(
        sock,
        server_factory=lambda: _Server(remote_forward),
        server_host_keys=[asyncssh.import_private_key(k) for k in host_keys],
        process_factory=session_handler(spawn, wait),
        encoding=None,
        sftp_factory=_SFTPServer,
        allow_scp=True,
        agent_forwarding=False,
        x11_forwarding=False,
    )
