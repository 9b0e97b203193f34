"""On an instance: a running worker and its nanny take up a renewed certificate.

Worker certificates live hours (``security.py`` says why); the cluster renews each before it
expires and writes the new key and certificate, as one PEM, to the file that the incarnation's
environment names (:data:`RENEWAL_FILE_ENV`), over the instance's pinned SSH link (SFTP,
written under a temporary name and renamed: never read half-written). Each process of the
incarnation (the nanny and its worker) looks at that file every
:data:`RELOAD_INTERVAL_ENV` seconds and, when it changed, loads it into the live
``ssl.SSLContext`` objects it already holds: its listeners' (tornado wraps each accepted
socket with that same object) and its outgoing connections' (``connection_args``, shared by
its ``ConnectionPool``). OpenSSL copies the context's certificate into each new connection,
so every handshake after the load presents the new certificate, and connections made before
keep theirs (they were authenticated when made; its pooled ones end, :func:`retire_pooled`,
so that the next connection, a heartbeat, shows the scheduler the switch). It also rewrites the files its ``Security``
names, so that a worker process the nanny restarts, or a context built later
(``get_connection_args``), starts from the new certificate too.

The PEM is checked in a scratch context first: a file that does not load (a key that does
not match) leaves the live contexts untouched. Only the key's holder can present the new
certificate, so the scheduler takes the first connection that shows it as the switch.

This module runs on the instances: it imports only the standard library and distributed.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile

from distributed.core import ConnectionPool, Server
from tornado.ioloop import PeriodicCallback

logger = logging.getLogger(__name__)

#: set in a worker's environment: the file its renewed certificate (key first) is written to
RENEWAL_FILE_ENV = "DASK_VASTAI_CERT_RENEWAL_FILE"
#: set in a worker's environment: seconds between looks at that file
RELOAD_INTERVAL_ENV = "DASK_VASTAI_CERT_RELOAD_S"
CALLBACK_NAME = "dask-vastai-certificate-reload"


def live_contexts(server: Server) -> list[ssl.SSLContext]:
    """The TLS contexts a running server uses for new connections: listeners' and outgoing."""
    found: dict[int, ssl.SSLContext] = {}
    for listener in getattr(server, "listeners", ()):
        tcp_server = getattr(listener, "tcp_server", None)
        ctx = getattr(tcp_server, "ssl_options", None)
        if isinstance(ctx, ssl.SSLContext):
            found[id(ctx)] = ctx
    ctx = (getattr(server, "connection_args", None) or {}).get("ssl_context")
    if isinstance(ctx, ssl.SSLContext):
        found[id(ctx)] = ctx
    return list(found.values())


def retire_pooled(pool: ConnectionPool) -> None:
    """End a pool's connections (made with the old certificate): idle ones now, busy ones when
    their call returns. The next one (a heartbeat) then shows the scheduler the switch.

    A busy comm the pool no longer counts as occupied is closed by ``ConnectionPool.reuse``
    instead of being pooled again (its slot is released here, as ``collect`` does).
    """
    for comms in pool.occupied.values():
        for _ in range(len(comms)):
            pool.semaphore.release()
        comms.clear()
    pool.collect()


def _replace(path: str, text: str) -> None:
    """Write ``text`` over ``path`` (owner-only) through a rename: no reader sees half of it."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".renewed-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _split_pem(text: str) -> tuple[str, str]:
    """(key PEM, certificate PEM) of a renewal file (key first, then certificate)."""
    marker = "-----BEGIN CERTIFICATE-----"
    at = text.find(marker)
    if at <= 0 or "PRIVATE KEY-----" not in text[:at]:
        raise ValueError("the renewal file must hold a private key, then a certificate")
    return text[:at], text[at:]


class CertificateReloader:
    """Loads a renewed certificate into one running server (a nanny or a worker)."""

    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.path = path
        self._seen: tuple[int, int] | None = None
        self.loads = 0

    def check(self) -> bool:
        """Load the renewal file if it changed since the last look; whether it was loaded."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            self.load()
        except (OSError, ValueError, ssl.SSLError) as e:
            # never the file's text: it holds the key
            logger.error("dask-vastai: %s cannot take up the renewed certificate in %s: %s: %s",
                         type(self.server).__name__, self.path, type(e).__name__, e)
            return False
        return True

    def load(self) -> None:
        with open(self.path) as f:
            text = f.read()
        key_pem, cert_pem = _split_pem(text)
        ssl.create_default_context().load_cert_chain(self.path)  # a bad file stops here
        for ctx in live_contexts(self.server):
            ctx.load_cert_chain(self.path)
        security = getattr(self.server, "security", None)
        cert_file, key_file = (getattr(security, f"tls_worker_{k}", None) for k in ("cert", "key"))
        # paths (an in-memory PEM holds a newline): a restarted worker reads them
        if cert_file and key_file and "\n" not in cert_file and "\n" not in key_file:
            _replace(key_file, key_pem)
            _replace(cert_file, cert_pem)
        pool = getattr(self.server, "rpc", None)
        if isinstance(pool, ConnectionPool):
            retire_pooled(pool)
        self.loads += 1
        logger.info("dask-vastai: %s took up a renewed certificate (load %d)",
                    type(self.server).__name__, self.loads)


def install(server: Server, environ: dict[str, str] | None = None) -> CertificateReloader | None:
    """Watch the incarnation's renewal file for ``server`` (None: its environment names none)."""
    env = os.environ if environ is None else environ
    path = env.get(RENEWAL_FILE_ENV)
    if not path:
        return None
    interval_s = float(env.get(RELOAD_INTERVAL_ENV) or 1.0)
    reloader = CertificateReloader(server, path)
    server.periodic_callbacks[CALLBACK_NAME] = PeriodicCallback(reloader.check, interval_s * 1000)
    return reloader


def reload_args(path: str, interval_s: float) -> dict[str, str]:
    """The environment entries that make an incarnation's processes watch ``path``."""
    return {RENEWAL_FILE_ENV: path, RELOAD_INTERVAL_ENV: f"{interval_s:g}"}


def renewal_path(state_dir: str, worker_name: str, first_serial: int) -> str:
    """Where a worker incarnation's renewed certificates go (one file per incarnation)."""
    return f"{state_dir}/certificates/{worker_name}-{first_serial:x}.pem"

