"""Each worker incarnation gets its own certificate, minted once its ports are known.

``VastInstance._start_workers`` allocates ports, has the hub expose them (which may swap a
busy one), then writes each incarnation with a certificate naming that worker and the
addresses the supervisor will use. A stand-in hub and link record what would be sent; the
certificates are real (``ClusterCA``), read back as ``getpeercert()`` shows them.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import types
from pathlib import Path
from typing import Any

from dask_vastai.bootstrap import Incarnation, incarnation_path
from dask_vastai.instance import VastInstance
from dask_vastai.pools import Pool, PoolShape
from dask_vastai.roles import Peer
from dask_vastai.security import ClusterCA


class _Hub:
    async def allocate_ports(self, count: int) -> list[int]:
        return list(range(21000, 21000 + count))

    async def expose_worker(self, link: Any, worker_port: int, nanny_port: int) -> tuple[int, int]:
        return worker_port + 100, nanny_port + 100  # as if both were busy somewhere: fresh ones


class _Link:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    async def put(self, path: str, data: bytes) -> None:
        self.files[path] = data


def _incarnation(name: str) -> Incarnation:
    return Incarnation(worker_name=name, scheduler_address="tls://127.0.0.1:8786", worker_port=0, nanny_port=0,
                       nthreads=1, memory_limit=1, resources={}, env={}, tls_ca="CA", tls_cert="", tls_key="",
                       death_timeout_s=60)


def test_every_worker_gets_its_own_certificate_naming_its_final_addresses(tmp_path: Path) -> None:
    ca = ClusterCA("c", lifetime_days=1)
    pool = Pool.from_shape("a", PoolShape(gpu="RTX_3090", num_gpus=2), onstart="true")
    context = types.SimpleNamespace(hub=_Hub(), certificates=ca)
    instance = VastInstance("tls://127.0.0.1:8786", "c-0", context=context, pool=pool, group=pool.group())
    instance.link = _Link()
    asyncio.run(instance._start_workers([_incarnation("c-0-gpu0"), _incarnation("c-0-gpu1")]))
    peers = []
    for path, payload in sorted(instance.link.files.items()):
        inc = json.loads(payload)
        assert path == incarnation_path(inc["worker_name"])
        pem = tmp_path / "cert.pem"
        pem.write_text(inc["tls_cert"])
        peer = Peer.from_peercert(ssl._ssl._test_decode_cert(str(pem)))  # type: ignore[attr-defined]
        assert peer is not None and peer.role == "worker" and peer.name == inc["worker_name"]
        assert peer.address == f"tls://127.0.0.1:{inc['worker_port']}"
        assert peer.nanny == f"tls://127.0.0.1:{inc['nanny_port']}"
        assert "PRIVATE KEY" in inc["tls_key"] and ca.is_current(peer)
        peers.append(peer)
    assert [p.address for p in peers] == ["tls://127.0.0.1:21100", "tls://127.0.0.1:21102"]
    assert len({p.serial for p in peers}) == 2, "one certificate and key per worker"
