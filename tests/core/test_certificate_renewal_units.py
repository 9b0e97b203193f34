"""Short-lived worker certificates: their lifetime, when they are renewed, which serials count.

The clock-driven parts without a cluster: the CA's bookkeeping through a renewal (offered,
switched to at its first use, the old one refused after a grace), the renewal schedule and
what it says when it cannot deliver, the live-worker list's two serials, and a reload that
refuses a bad file. Real processes across renewals: ``test_certificate_renewal_tls.py``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import time
import types
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from dask_vastai.certificate_reload import CertificateReloader
from dask_vastai.exceptions import TunnelError
from dask_vastai.network import PeerRoster
from dask_vastai.renewal import CertificateRenewal, incarnation_env
from dask_vastai.roles import LivePeers, Peer
from dask_vastai.security import ClusterCA, renewal_time
from tests.core.test_roles import peercert


def _validity(pem: str) -> datetime.timedelta:
    """How long from now a certificate stays valid."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)


def _peer(name: str, serial: int) -> Peer:
    return Peer(role="worker", name=name, serial=serial)


def test_renewal_comes_at_the_configured_fraction_of_a_certificates_life() -> None:
    assert renewal_time(1000.0, 3600.0, 0.5) == 2800.0
    assert renewal_time(0.0, 20.0, 0.25) == 5.0
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"worker-certificate-renew-at={bad}.*between 0 and 1"):
            renewal_time(0.0, 1.0, bad)


def test_worker_certificates_live_the_short_lifetime_and_the_ca_and_client_the_long_one() -> None:
    ca = ClusterCA("life", lifetime_days=30)
    assert ca.worker_lifetime == datetime.timedelta(hours=4), "the shipped default (vastai.yaml)"
    worker = ca.issue_worker("w", address=None, nanny=None)
    assert datetime.timedelta(hours=3, minutes=59) < _validity(worker.cert_pem) <= datetime.timedelta(hours=4)
    client = ca.security()
    assert _validity(client.tls_client_cert) > datetime.timedelta(days=29)
    assert _validity(ca.ca_pem) > datetime.timedelta(days=29)
    short = ClusterCA("short", lifetime_days=1, worker_lifetime_s="30s")
    assert _validity(short.issue_worker("w", address=None, nanny=None).cert_pem) <= datetime.timedelta(seconds=30)


@pytest.mark.parametrize("lifetime", ["0s", -5, "40d"])
def test_a_worker_lifetime_that_cannot_work_is_refused_with_its_value(lifetime: Any) -> None:
    with pytest.raises(ValueError, match=r"worker-certificate-lifetime=.*e\.g\. '4h'"):
        ClusterCA("bad", lifetime_days=30, worker_lifetime_s=lifetime)


def test_a_renewal_is_honoured_beside_the_old_one_until_used_then_the_old_one_ends_after_a_grace(
    tmp_path: Path,
) -> None:
    ca = ClusterCA("switch", lifetime_days=1, worker_lifetime_s=20, switch_grace_s=0.3)
    changes: list[tuple[int, ...]] = []
    ca.on_change(lambda: changes.append(ca.live_serials("w")))
    first = ca.issue_worker("w", address="tls://h:1", nanny="tls://127.0.0.1:2")
    issued = time.time()
    assert ca.renewal_due("w") == pytest.approx(issued + 10, abs=1)
    assert ca.expires_at("w") == pytest.approx(issued + 20, abs=1)

    renewed = ca.renew_worker("w")
    peer = Peer.from_peercert(peercert(renewed.cert_pem, tmp_path))
    assert peer is not None and (peer.name, peer.address, peer.nanny) == ("w", "tls://h:1", "tls://127.0.0.1:2")
    assert changes == [(first.serial, renewed.serial)], "offered to the other workers before it is used"
    assert ca.live_serials("w") == (first.serial, renewed.serial)
    assert ca.is_current(_peer("w", first.serial)), "not in use yet: the old one still counts"
    assert ca.current_serial("w") == first.serial
    assert ca.renewal_due("w") == pytest.approx(time.time() + 10, abs=1), "the next one counts from the renewal"

    async def switch() -> None:
        assert ca.is_current(_peer("w", renewed.serial)), "its first use switches"
        assert ca.current_serial("w") == renewed.serial
        assert ca.live_serials("w") == (renewed.serial, first.serial), "the old one only for the grace"
        assert changes[-1] == (renewed.serial, first.serial)
        assert ca.is_current(_peer("w", first.serial)), "a handshake begun just before the switch lands"
        await asyncio.sleep(0.5)
        assert changes[-1] == (renewed.serial,), "the other workers hear when the grace ends"

    asyncio.run(switch())
    assert ca.live_serials("w") == (renewed.serial,)
    assert not ca.is_current(_peer("w", first.serial)), "after the grace the old one opens nothing"
    assert ca.is_current(_peer("w", renewed.serial))
    assert not ca.is_current(_peer("other", renewed.serial)), "a serial counts for its own name only"


def test_a_new_incarnation_ends_a_renewal_in_flight_and_an_unknown_name_cannot_be_renewed() -> None:
    ca = ClusterCA("inc", lifetime_days=1, worker_lifetime_s=60)
    ca.issue_worker("w", address=None, nanny=None)
    pending = ca.renew_worker("w")
    fresh = ca.issue_worker("w", address=None, nanny=None)
    assert ca.live_serials("w") == (fresh.serial,)
    assert not ca.is_current(_peer("w", pending.serial))
    with pytest.raises(KeyError, match="'nobody' holds no certificate"):
        ca.renew_worker("nobody")


def test_the_live_worker_list_carries_both_serials_of_a_renewal_and_workers_admit_either() -> None:
    sent: list[dict[str, Any]] = []
    scheduler = types.SimpleNamespace(workers={"tls://a": types.SimpleNamespace(name="w-a")},
                                      stream_comms={"tls://a": types.SimpleNamespace(send=sent.append)})
    serials: dict[str, tuple[int, ...]] = {"w-a": (0xABC, 0xDEF)}
    PeerRoster(scheduler, serials.get).push()
    assert sent[-1]["peers"] == {"w-a": "abc,def"}

    async def main() -> None:
        live = LivePeers()
        live.update(sent[-1]["peers"])
        assert live.admits(Peer("worker", "w-a", serial=0xABC)) and live.admits(Peer("worker", "w-a", serial=0xDEF))
        live.update({"w-a": "def"})
        assert not live.admits(Peer("worker", "w-a", serial=0xABC))
        assert not live.admits(Peer("worker", "w-b", serial=0xDEF))

    asyncio.run(main())


class _Link:
    """A link that writes into a folder, or fails as a dropped SSH link does."""

    def __init__(self, folder: Path, *, fails: bool = False) -> None:
        self.closed = asyncio.Event()
        self.folder, self.fails = folder, fails
        self.puts: list[str] = []

    async def put(self, remote_path: str, data: bytes, *, mode: int = 0o600) -> None:
        if self.fails:
            raise TunnelError(f"cannot write {remote_path} on i-1 (127.0.0.1:22): Connection lost")
        target = self.folder / Path(remote_path).name
        target.write_bytes(data)
        self.puts.append(remote_path)


def test_a_renewal_reaches_the_incarnations_file_and_one_that_cannot_is_said_once_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ca = ClusterCA("deliver", lifetime_days=1, worker_lifetime_s=40)
    creds = ca.issue_worker("w", address=None, nanny=None)
    path = incarnation_env("w", creds.serial)["DASK_VASTAI_CERT_RENEWAL_FILE"]
    assert path.startswith("/root/.dask-vastai/certificates/w-") and path.endswith(f"{creds.serial:x}.pem")
    said: list[str] = []
    link = _Link(tmp_path)
    renewal = CertificateRenewal(ca, lambda: link, {"w": path}, who="pool-0", say=said.append)
    assert renewal.next_due() == ("w", pytest.approx(time.time() + 20, abs=1))

    async def main() -> None:
        assert await renewal.renew("w")
        assert link.puts == [path] and said == []
        pem = (tmp_path / Path(path).name).read_text()
        assert pem.index("PRIVATE KEY") < pem.index("BEGIN CERTIFICATE"), "key first, as the reload reads it"
        ssl.create_default_context().load_cert_chain(tmp_path / Path(path).name)  # key and certificate match

        link.fails = True
        assert not await renewal.renew("w")
        assert not await renewal.renew("w")
        gone = CertificateRenewal(ca, lambda: None, {"w": path}, who="pool-0", say=said.append)
        assert not await gone.renew("w")
        name, at = renewal.next_due() or ("", 0.0)
        assert name == "w" and at < time.time() + 15, "tried again within a quarter of the life left"

    asyncio.run(main())
    assert len(said) == 2, said  # once per renewal loop, not once per try
    assert "cannot renew worker w's certificate: writing it failed" in said[0] and "expires" in said[0]
    assert "its SSH link is gone" in said[1] and "replaced as a lost one" in said[1]
    assert "PRIVATE KEY" not in caplog.text and "PRIVATE KEY" not in repr(renewal)


def test_a_certificate_that_expired_unrenewed_is_no_longer_tried(tmp_path: Path) -> None:
    ca = ClusterCA("gone", lifetime_days=1, worker_lifetime_s=0.5)
    ca.issue_worker("w", address=None, nanny=None)
    renewal = CertificateRenewal(ca, lambda: None, {"w": "/x/w.pem"}, who="pool-0")
    time.sleep(0.6)
    assert not asyncio.run(renewal.renew("w"))
    assert renewal.next_due() is None


def test_a_renewal_file_that_does_not_load_leaves_the_live_certificate_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = ClusterCA("reload", lifetime_days=1, worker_lifetime_s=60)
    old, other = ca.issue_worker("w", address=None, nanny=None), ca.issue_worker("x", address=None, nanny=None)
    live = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    (tmp_path / "first.pem").write_text(old.key_pem + old.cert_pem)
    live.load_cert_chain(tmp_path / "first.pem")
    assert _served_serial(live, old) == old.serial
    server = types.SimpleNamespace(connection_args={"ssl_context": live}, listeners=[])
    renewal = tmp_path / "renewed.pem"
    reloader = CertificateReloader(server, str(renewal))  # type: ignore[arg-type]
    assert not reloader.check(), "no file yet"
    renewal.write_text(old.key_pem + other.cert_pem)  # a key that is not the certificate's
    assert not reloader.check() and reloader.loads == 0
    assert _served_serial(live, old) == old.serial, "the live context still presents the old one"
    assert "cannot take up the renewed certificate" in caplog.text and "PRIVATE KEY" not in caplog.text
    fresh = ca.renew_worker("w")
    renewal.write_text(fresh.key_pem + fresh.cert_pem + "\n")
    assert reloader.check() and reloader.loads == 1
    assert _served_serial(live, fresh) == fresh.serial
    assert not reloader.check(), "unchanged: not loaded again"


def _served_serial(server_ctx: ssl.SSLContext, creds: Any) -> int:
    """The serial a server context presents, read by a real handshake over a socket pair."""
    import socket
    import threading

    a, b = socket.socketpair()
    client_ctx = ssl.create_default_context(cadata=creds.ca_pem)
    client_ctx.check_hostname = False

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (OSError, ssl.SSLError):
            pass  # the client leaves as soon as it has seen the certificate

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b) as c:
            cert = c.getpeercert()
    finally:
        t.join(5)
    assert cert is not None
    return int(cert["serialNumber"], 16)
