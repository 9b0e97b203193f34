"""Short-lived worker certificates on a cluster, as a user runs one, in both network modes.

Worker certificates live 24 s here (the shipped default is hours) and are renewed at half
their life over each instance's SSH link, while two workers on the strict marketplace
keep computing (direct: public ports; tunnel: forwards through this machine). What must hold: after each worker's certificate was renewed twice and the
first ones expired, new connections (scheduler links, a direct worker-to-worker transfer)
work; the first certificate and key, which the host still holds on disk from its incarnation,
fail the TLS handshake at the other worker's address and at the scheduler; the host's
files now hold the renewed one; and no key shows in the cluster's logs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import dask
import pytest

from dask_vastai.emulator import Emulator
from tests.core.test_certificate_renewal_tls import handshake_error
from tests.core.test_direct_network_e2e import PRICED, _certificate_of
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.sandbox

LIFETIME_S = 24.0


def _presenting(creds: dict[str, str], folder: Path) -> ssl.SSLContext:
    """A TLS client context presenting a certificate read from a host (files, as it holds them)."""
    for name, text in creds.items():
        (folder / name).write_text(text)
    ctx = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx


@pytest.mark.parametrize("network", ["direct", "tunnel"])
def test_workers_compute_across_renewals_and_the_first_keys_expire(sandbox: None, tmp_path: Path, network: str) -> None:
    import numpy as np
    from distributed import Client, wait

    from dask_vastai import VastAICluster

    with Emulator(runtime="sandbox", boot_delay_s=0.5, rate_limits=True, state_dir=tmp_path / "emu",
                  profile="strict", catalog=PRICED, variants={"destroy_linger_s": "0"}) as emu, \
            dask.config.set({"vastai.worker-certificate-lifetime": f"{LIFETIME_S:g}s"}):
        with VastAICluster(
            gpu="RTX_3090", n=2, api_url=emu.url, api_key=emu.api_key, name="cr", quiet=True,
            boot_timeout=240, network=network, worker_options={"nthreads": 1},
        ) as cluster, Client(cluster) as client:
            ca = cluster.certificates
            assert [w.network for w in cluster.workers.values()] == [network, network]
            addresses = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            a, b = addresses["cr-0"], addresses["cr-1"]
            first = _certificate_of(cluster, "cr-0")  # what cr-0's host holds from its incarnation
            expires = ca.expires_at("cr-0")
            assert expires is not None and expires - time.time() <= LIFETIME_S
            seen: dict[str, set[int]] = {name: set() for name in addresses}

            def renewed_twice() -> bool:
                for name, serials in seen.items():
                    serials.add(ca.current_serial(name) or 0)
                return all(len(s) >= 3 for s in seen.values()) and time.time() > expires + 2

            x = client.submit(lambda: np.ones(10**6 // 8), workers=[a], pure=False)
            wait(x)
            wait_until(renewed_twice, 4 * LIFETIME_S, f"two switches per worker past the first expiry ({seen})",
                       interval_s=0.5)

            async def fresh_connections() -> None:
                cluster.scheduler.rpc.collect()

            cluster.sync(fresh_connections)
            client.run(lambda dask_worker: dask_worker.rpc.collect())
            z = client.submit(lambda u: float(u.sum()), x, workers=[b], pure=False)
            assert z.result() == 10**6 // 8, "a transfer between workers after the first certificates expired"
            assert sorted(w["name"] for w in client.scheduler_info()["workers"].values()) == ["cr-0", "cr-1"]

            held = _presenting(first, tmp_path)
            for address in (b, cluster.scheduler.address):
                why = asyncio.run(handshake_error(address, held))
                assert why is not None and "certificate expired" in why, (address, why)
            assert _certificate_of(cluster, "cr-0")["cert.pem"] != first["cert.pem"], "the host's files renewed"
            logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
            assert "PRIVATE KEY" not in logs and "cannot renew" not in logs, logs[-2000:]
