"""The tunnel and the onstart script in the emulator's real sandboxes, as on Vast.

``SandboxRuntime`` runs the onstart text with the env Vast injects, OpenSSH, a fake
``nvidia-smi`` showing the rented GPUs, and relays the API URL from inside: so this is the
path of one worker from "running with SSH" to "registered", minus only the REST calls.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from dask_vastai.bootstrap import (
    PROBE_COMMAND,
    BootstrapConfig,
    Incarnation,
    incarnation_path,
    incarnation_payload,
    onstart_script,
    parse_probe,
)
from dask_vastai.emulator.runtime import SandboxSpec
from dask_vastai.emulator.sandbox import SandboxRuntime
from dask_vastai.tunnel import ClusterKey, SSHEndpoint, TunnelHub
from tests.helpers.sandbox import requires_sandbox
from tests.helpers.waiting import until

pytestmark = [pytest.mark.sandbox, requires_sandbox]


def _spec(instance_id: int, onstart: str, api_url: str, num_gpus: int = 1) -> SandboxSpec:
    return SandboxSpec(
        instance_id=instance_id, image="vastai/pytorch", runtype="ssh_direc ssh_proxy", onstart=onstart, args=None,
        env={"CONTAINER_ID": str(instance_id), "CONTAINER_API_KEY": f"key-{instance_id}"}, container_ports=(),
        authorized_keys=(), num_gpus=num_gpus, gpu_name="RTX_3090", gpu_ram_mb=24576, cpu_cores=2,
        cpu_ram_mb=8192, disk_gb=1, api_url=api_url,
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_emulated_instances_run_workers_through_the_tunnels(tmp_path: Path, fake_vast):
    from distributed import Client, Scheduler
    from distributed.security import Security

    key = ClusterKey.generate("dask-vastai-emu")
    vast = fake_vast

    async def main() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        security = Security.temporary()
        config = BootstrapConfig("emu", key.public_openssh, vast.url, orphan_timeout_s=600, python=sys.executable)
        try:
            async with Scheduler(protocol="tls", host="127.0.0.1", port=0, security=security,
                                 dashboard_address=":0") as scheduler:
                hub = TunnelHub(key, scheduler_port=int(scheduler.address.rsplit(":", 1)[1]))
                ends = await asyncio.gather(*(runtime.start(_spec(i, onstart_script(config), vast.url, num_gpus=i))
                                              for i in (1, 2)))
                t0 = time.monotonic()
                links = await asyncio.gather(*(
                    hub.connect(f"i{i}", SSHEndpoint(e.public_ipaddr, e.ports[22]), timeout_s=30)
                    for i, e in zip((1, 2), ends, strict=True)))
                names = []
                for link in links:
                    probe = parse_probe((await link.run(PROBE_COMMAND, timeout_s=60))[1])
                    ports = await hub.expose_worker(link, *await hub.allocate_ports(2))
                    inc = Incarnation(
                        worker_name=f"w-{link.name}", scheduler_address=scheduler.address, worker_port=ports[0],
                        nanny_port=ports[1], nthreads=1, memory_limit=2**30,
                        resources={"GPU": float(len(probe["gpus"]))}, env={"CUDA_VISIBLE_DEVICES": "0"},
                        tls_ca=security.tls_ca_file, tls_cert=security.tls_worker_cert,
                        tls_key=security.tls_worker_key, death_timeout_s=30)
                    await link.put(incarnation_path(inc.worker_name), incarnation_payload(inc))
                    names.append(inc.worker_name)
                await until(lambda: {w.name for w in scheduler.workers.values()} == set(names), 90,
                            f"workers to register; log: {runtime.logs(1)[-3000:]}")
                print(f"emulated instances: connect() to 2 workers registered in {time.monotonic() - t0:.1f}s")
                assert {w.name: w.resources["GPU"] for w in scheduler.workers.values()} == {"w-i1": 1.0, "w-i2": 2.0}
                async with Client(scheduler.address, security=security, asynchronous=True) as client:
                    a = client.submit(lambda: list(range(1000)), workers=["w-i1"], pure=False)
                    b = client.submit(sum, a, workers=["w-i2"], resources={"GPU": 2}, pure=False)
                    assert await b == sum(range(1000))
                await hub.close()
                await until(lambda: not scheduler.workers, 20, "the workers to leave after the links closed")
        finally:
            await runtime.close()

    asyncio.run(main())
    assert vast.deletes == []


@pytest.mark.timeout(60)
def test_emulated_instance_nobody_connects_to_destroys_itself(tmp_path: Path, fake_vast):
    key = ClusterKey.generate("dask-vastai-emu")
    vast = fake_vast

    async def main() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        config = BootstrapConfig("emu", key.public_openssh, vast.url, orphan_timeout_s=2, python=sys.executable)
        try:
            await runtime.start(_spec(9, onstart_script(config), vast.url))
            await until(lambda: vast.deletes, 30, f"the DELETE; log: {runtime.logs(9)}")
            assert "no client within the orphan timeout" in runtime.logs(9)  # seen by `vastai logs`
        finally:
            await runtime.close()

    asyncio.run(main())
    assert vast.deletes == [("/api/v0/instances/9/", "Bearer key-9")]
