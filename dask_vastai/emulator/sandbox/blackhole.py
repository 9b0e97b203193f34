"""Ports that do not answer, as a firewalled host's: connecting hangs, or is refused.

A *hanging* port is a listening socket whose accept queue is full and never drained:
Linux then drops every new SYN, so a client's ``connect`` waits until its own timeout,
exactly as behind a firewall that drops packets. It needs no root and no packet filter:
``listen(0)`` and one connection of our own that nobody accepts (two where the kernel
lets a second one in). A *refusing* port is a socket bound to the port but not
listening: the kernel answers each SYN with a reset (``ECONNREFUSED``); the port stays
ours, so nothing else takes it.

Standard library only: ``nsinit.py`` loads this file too, to make the same holes inside
a sandbox for other instances' blocked ports.
"""

import select
import socket

#: how long a filler connection may take to land in the queue before we call the queue full
_SETTLE_S = 0.3
_MAX_FILLERS = 8


def hold_syns(sock: socket.socket) -> list[socket.socket]:
    """Make the bound socket ``sock`` drop every new connection; return the fillers to keep open."""
    sock.listen(0)
    address = sock.getsockname()[:2]
    fillers: list[socket.socket] = []
    for _ in range(_MAX_FILLERS):
        client = socket.socket(sock.family, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(address)
        except BlockingIOError:
            pass
        _, writable, _ = select.select([], [client], [], _SETTLE_S)
        if not writable or client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            client.close()  # its SYN was dropped: the queue is full
            return fillers
        fillers.append(client)
    for client in fillers:
        client.close()
    raise OSError(f"could not fill the accept queue of {address} with {_MAX_FILLERS} connections")


def hole(host: str, port: int, mode: str) -> tuple[socket.socket, list[socket.socket]]:
    """A socket on ``host:port`` that hangs ("hang") or refuses ("refuse") connections, and its fillers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        return sock, (hold_syns(sock) if mode == "hang" else [])
    except OSError:
        sock.close()
        raise
