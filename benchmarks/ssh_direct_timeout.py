"""How long may a direct SSH port stay silent before Vast's proxy is tried (``ssh-direct-timeout``)?

Question (issue 11): some hosts firewall their direct ports; the client must not wait the
whole boot timeout on them, nor give up on a healthy port that is merely slow. The timeout
only runs while the port accepts no TCP connection at all (once it accepts, sshd may still be
starting or the key not yet authorized, and the client waits the whole boot), so what matters
is how soon a healthy port accepts after the rental says ``running``, and how long a lossy path
needs (Linux retransmits a lost SYN after 1, 2, 4, 8, 16 s: 31 s for five retransmissions).

This rents ``--instances`` offers on a sandboxed emulator (rate limits off, nothing blocked)
and measures, from the first list that shows each ``running``: the first TCP accept on its
direct port, and the first SSH login with the cluster key (the onstart authorizes it).

    python benchmarks/ssh_direct_timeout.py [--instances 8]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path


async def measure(instances: int) -> list[tuple[float, float]]:
    from dask_vastai.bootstrap import BootstrapConfig, onstart_script
    from dask_vastai.emulator import Emulator
    from dask_vastai.offers import OfferRequirements
    from dask_vastai.tunnel import ClusterKey, SSHEndpoint, TunnelHub
    from dask_vastai.vast import CreateRequest, VastAPI

    key = ClusterKey.generate("bench")
    state = Path(tempfile.mkdtemp(prefix="ssh-timeout-"))
    async with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=False, state_dir=state) as emu:
        onstart = onstart_script(BootstrapConfig("bench", key.public_openssh, emu.url, 600))
        async with VastAPI(emu.api_key, emu.url, pace=False) as api:
            offers = await api.search_offers(OfferRequirements(gpu="RTX_3090").filters(), limit=instances)
            made = await api.create_instances([o.id for o in offers],
                                              CreateRequest(image="img", disk_gb=10, onstart=onstart, label="b"))
            ids = [m.instance_id for m in made]
            running: dict[int, tuple[float, tuple[str, int]]] = {}
            while len(running) < len(ids):
                for row in await api.list_instances():
                    if row.id in ids and row.id not in running and row.actual_status == "running" and row.direct_ssh():
                        running[row.id] = (time.monotonic(), row.direct_ssh())  # type: ignore[assignment]
                await asyncio.sleep(0.05)

            async def one(start: float, endpoint: tuple[str, int]) -> tuple[float, float]:
                while True:
                    try:
                        with socket.create_connection(endpoint, timeout=1):
                            break
                    except OSError:
                        await asyncio.sleep(0.01)
                tcp = time.monotonic() - start
                hub = TunnelHub(key, scheduler_port=1, stop_command=None)
                link = await hub.connect("b", SSHEndpoint(*endpoint), timeout_s=60)
                ssh = time.monotonic() - start
                await hub.close_link(link, stop_workers=False)
                return tcp, ssh

            results = await asyncio.gather(*(one(*running[i]) for i in ids))
            await api.destroy_instances(ids)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=8)
    args = parser.parse_args()
    results = asyncio.run(measure(args.instances))
    tcp = [r[0] for r in results]
    ssh = [r[1] for r in results]
    print(f"{len(results)} instances, seconds after the list first said running:")
    print(f"  first TCP accept on the direct port: median {statistics.median(tcp):.3f}, max {max(tcp):.3f}")
    print(f"  first SSH login with the cluster key: median {statistics.median(ssh):.3f}, max {max(ssh):.3f}")


if __name__ == "__main__":
    main()
