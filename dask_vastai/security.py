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
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

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


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class ClusterCA:
    """The per-cluster certificate authority (ECDSA P-256), in memory only."""

    def __init__(self, cluster_name: str, *, lifetime_days: float) -> None:
        if lifetime_days <= 0:
            raise ValueError(f"certificate lifetime {lifetime_days} days: it must be a positive number")
        self.cluster_name = cluster_name
        self.lifetime = datetime.timedelta(days=lifetime_days)
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
        #: worker name -> serial of the one certificate honoured for it
        self._current: dict[str, int] = {}
        client_cert, client_key = self._issue(ROLE_CLIENT, f"{cluster_name}-client")
        self._client = WorkerCredentials(self.ca_pem, client_cert.public_bytes(serialization.Encoding.PEM).decode(),
                                         _pem_key(client_key), client_cert.serial_number)

    def _name(self, role: str, common_name: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])

    def _issue(
        self, role: str, name: str, *, address: str | None = None, nanny: str | None = None
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
            .not_valid_after(now + self.lifetime)
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
        """A ``worker`` certificate for one incarnation; the name's previous one stops counting."""
        cert, key = self._issue(ROLE_WORKER, name, address=address, nanny=nanny)
        self._current[name] = cert.serial_number
        return WorkerCredentials(self.ca_pem, cert.public_bytes(serialization.Encoding.PEM).decode(),
                                 _pem_key(key), cert.serial_number)

    def current_serial(self, name: str) -> int | None:
        """The serial of the one certificate honoured for worker ``name`` (None: none issued)."""
        return self._current.get(name)

    def is_current(self, peer: Peer) -> bool:
        """Whether a worker peer shows the newest certificate issued for its name."""
        return peer.serial is not None and self._current.get(peer.name) == peer.serial

    def __repr__(self) -> str:
        return f"<ClusterCA {self.cluster_name!r}: {len(self._current)} worker certificate(s) current>"
