"""The cluster's certificates: a CA whose key never leaves this process, and who holds what.

One :class:`ClusterCA` per cluster, made when the cluster is. It signs:

* one certificate of role ``client``, held by the scheduler and the user's client
  (:meth:`ClusterCA.security` is the ``Security`` that ``Client(cluster)`` picks up);
* per worker incarnation, one certificate of role ``worker`` naming the worker and the
  addresses it was given (:meth:`ClusterCA.issue_worker`), with a fresh key. It travels to
  the instance inside the incarnation, over SSH.

Where the role and name sit is where ``ssl``'s ``getpeercert()`` shows them, so that every
endpoint can read them without a parser: subject ``OU`` = role, ``CN`` = name, and a SAN URI
(``roles.identity_uri``). The CA key exists only in this object's memory: nothing on an
instance can mint another certificate, and the certificates are worthless once the cluster
(and so the CA) is gone. Only the newest certificate of each worker name is honoured by the
scheduler (:meth:`ClusterCA.is_current`), so a replaced incarnation's key opens nothing.

Worker certificates live a few hours (``vastai.worker-certificate-lifetime``), not the CA's
days: a host is a stranger, and a preempted or hostile one keeps its key. Three locks close
on a stolen worker key, each on its own: the scheduler honours only the serials it issued last
for that name, every worker accepts worker peers only from the live-worker list (name and
serial), and the certificate itself expires within hours, so that even a path that checks only
the chain (a future endpoint, a client connection) refuses it soon. A running worker gets a
fresh certificate for its same incarnation before half its life is gone
(:meth:`ClusterCA.renew_worker`, delivered by ``renewal.py`` over the instance's pinned SSH
link; the worker's processes load it with ``reload.py``). While it switches, the scheduler
honours the old serial and the new one; the first connection that presents the new one
proves the worker uses it, and the old one is refused a short grace later (handshakes begun
just before the switch still land).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dask.utils import parse_timedelta
from distributed.security import Security

from .config import option
from .roles import ROLE_CLIENT, ROLE_WORKER, Peer, identity_uri

ORGANIZATION = "dask-vastai"
#: certificates start this much before now: an instance's clock may lag this machine's
CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class WorkerCredentials:
    """What one worker incarnation receives: its certificate and key (PEM), and the CA's."""

    ca_pem: str
    cert_pem: str
    key_pem: str = field(repr=False)
    serial: int = 0

    def renewal_pem(self) -> bytes:
        """Key and certificate in one PEM: what a running worker loads (one file, one rename)."""
        return (self.key_pem + self.cert_pem).encode()


def renewal_time(issued_at: float, lifetime_s: float, fraction: float) -> float:
    """When a certificate issued at ``issued_at`` (epoch seconds) is renewed.

    ``fraction`` of its life: half leaves the other half for a renewal that fails (an SSH link
    that reconnects, a loaded machine) to be tried again before the certificate expires.
    """
    if not 0 < fraction < 1:
        raise ValueError(
            f"vastai.worker-certificate-renew-at={fraction}: the fraction of a worker certificate's "
            "life after which it is renewed must lie between 0 and 1 (0.5: at half its life)"
        )
    return issued_at + fraction * lifetime_s


@dataclass
class _Honoured:
    """The serials one worker name is honoured with, and when its certificate was issued."""

    current: int
    issued_at: float
    address: str | None
    nanny: str | None
    #: a renewed certificate not yet seen in use (honoured alongside ``current``)
    pending: int | None = None
    pending_issued_at: float = 0.0
    #: the replaced serial of a renewal, honoured until ``previous_until`` (monotonic seconds)
    previous: int | None = None
    previous_until: float = 0.0


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class ClusterCA:
    """The per-cluster certificate authority (ECDSA P-256), in memory only."""

    def __init__(
        self, cluster_name: str, *, lifetime_days: float, worker_lifetime_s: float | str | None = None,
        renew_at: float | None = None, switch_grace_s: float | str | None = None,
    ) -> None:
        if lifetime_days <= 0:
            raise ValueError(f"certificate lifetime {lifetime_days} days: it must be a positive number")
        worker_lifetime = option("worker-certificate-lifetime", worker_lifetime_s)
        try:
            worker_s = parse_timedelta(worker_lifetime)
        except (TypeError, ValueError):
            worker_s = None
        if not worker_s or worker_s <= 0 or worker_s > lifetime_days * 86400:
            raise ValueError(
                f"vastai.worker-certificate-lifetime={worker_lifetime!r}: a worker certificate must "
                f"live a positive time no longer than the CA ({lifetime_days} days); e.g. '4h'"
            )
        self.cluster_name = cluster_name
        self.lifetime = datetime.timedelta(days=lifetime_days)
        self.worker_lifetime = datetime.timedelta(seconds=worker_s)
        self.renew_at = float(option("worker-certificate-renew-at", renew_at))
        renewal_time(0.0, 1.0, self.renew_at)  # validates the fraction now, not at the first renewal
        self.switch_grace_s = float(parse_timedelta(option("certificate-switch-grace", switch_grace_s)))
        #: called (no arguments) when the serials honoured for a worker change: the live-worker list
        self._listeners: list[Callable[[], None]] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = self._name("ca", f"{cluster_name} CA")
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + self.lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True,
                              crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem: str = self._cert.public_bytes(serialization.Encoding.PEM).decode()
        #: worker name -> the serial(s) honoured for it
        self._current: dict[str, _Honoured] = {}
        client_cert, client_key = self._issue(ROLE_CLIENT, f"{cluster_name}-client", lifetime=self.lifetime)
        self._client = WorkerCredentials(self.ca_pem, client_cert.public_bytes(serialization.Encoding.PEM).decode(),
                                         _pem_key(client_key), client_cert.serial_number)

    def _name(self, role: str, common_name: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])

    def _issue(
        self, role: str, name: str, *, lifetime: datetime.timedelta, address: str | None = None,
        nanny: str | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not name or len(name) > 64:
            raise ValueError(
                f"{role} name {name!r}: a certificate's CN holds 1 to 64 characters; shorten the "
                "cluster's name (name=) or the pool's"
            )
        uri = identity_uri(role, name, address=address, nanny=nanny)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._name(role, name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert, key

    # ------------------------------------------------------------- issuing
    def security(self) -> Security:
        """The ``client``-role TLS configuration of the scheduler and the user's clients."""
        c = self._client
        return Security(
            require_encryption=True, tls_ca_file=self.ca_pem,
            tls_client_cert=c.cert_pem, tls_client_key=c.key_pem,
            tls_scheduler_cert=c.cert_pem, tls_scheduler_key=c.key_pem,
        )

    def issue_worker(self, name: str, *, address: str | None, nanny: str | None) -> WorkerCredentials:
        """A ``worker`` certificate for one incarnation; the name's previous ones stop counting."""
        creds = self._worker(name, address=address, nanny=nanny)
        self._current[name] = _Honoured(creds.serial, time.time(), address, nanny)
        return creds

    def renew_worker(self, name: str) -> WorkerCredentials:
        """A fresh certificate (and key) for the running incarnation of worker ``name``.

        Same name and addresses; honoured alongside the current one until a connection
        presents it (:meth:`is_current`). A second renewal before that replaces the first.
        """
        held = self._current.get(name)
        if held is None:
            raise KeyError(f"worker {name!r} holds no certificate of this cluster to renew")
        creds = self._worker(name, address=held.address, nanny=held.nanny)
        held.pending, held.pending_issued_at = creds.serial, time.time()
        self._changed()
        return creds

    def renewal_due(self, name: str) -> float | None:
        """When worker ``name``'s newest certificate is renewed (epoch seconds; None: none issued)."""
        held = self._current.get(name)
        if held is None:
            return None
        issued = held.pending_issued_at if held.pending is not None else held.issued_at
        return renewal_time(issued, self.worker_lifetime.total_seconds(), self.renew_at)

    def expires_at(self, name: str) -> float | None:
        """When worker ``name``'s certificate in use expires (epoch seconds; None: none issued)."""
        held = self._current.get(name)
        return None if held is None else held.issued_at + self.worker_lifetime.total_seconds()

    def _worker(self, name: str, *, address: str | None, nanny: str | None) -> WorkerCredentials:
        cert, key = self._issue(ROLE_WORKER, name, lifetime=self.worker_lifetime, address=address, nanny=nanny)
        return WorkerCredentials(self.ca_pem, cert.public_bytes(serialization.Encoding.PEM).decode(),
                                 _pem_key(key), cert.serial_number)

    # --------------------------------------------------------------- honouring
    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the serials honoured for a worker change (a renewal, a switch)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()

    def current_serial(self, name: str) -> int | None:
        """The serial of the certificate worker ``name`` uses now (None: none issued)."""
        held = self._current.get(name)
        return None if held is None else held.current

    def live_serials(self, name: str) -> tuple[int, ...]:
        """The serials other workers accept for ``name``: its current one, a renewed one not yet
        in use (offered to them before the worker can present it), and during the grace after
        a switch the one it replaced (as the scheduler does)."""
        held = self._current.get(name)
        if held is None:
            return ()
        out = [held.current]
        if held.pending is not None:
            out.append(held.pending)
        if held.previous is not None and time.monotonic() < held.previous_until:
            out.append(held.previous)
        return tuple(out)

    def is_current(self, peer: Peer) -> bool:
        """Whether a worker peer shows a certificate honoured for its name.

        The first connection that shows a renewed certificate switches the name to it: from a
        grace later (``vastai.certificate-switch-grace``), the one it replaces opens nothing.
        """
        held = self._current.get(peer.name)
        if held is None or peer.serial is None:
            return False
        if peer.serial == held.current:
            return True
        if peer.serial == held.pending:
            held.previous, held.previous_until = held.current, time.monotonic() + self.switch_grace_s
            held.current, held.issued_at, held.pending = held.pending, held.pending_issued_at, None
            self._changed()
            with contextlib.suppress(RuntimeError):  # no running loop: the next change tells them
                # the live-worker list drops the old serial when the grace ends, as this check does
                asyncio.get_running_loop().call_later(self.switch_grace_s + 0.05, self._changed)
            return True
        return peer.serial == held.previous and time.monotonic() < held.previous_until

    def __repr__(self) -> str:
        return f"<ClusterCA {self.cluster_name!r}: {len(self._current)} worker certificate(s) current>"
