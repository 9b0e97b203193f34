"""The emulator bills bandwidth: bytes counted at each sandbox's network boundary, at the offer's rates.

Vast bills each rental per byte it sends (``inet_up_cost``) and receives (``inet_down_cost``).
The emulator counts those bytes where they cross a sandbox's boundary (its pid 1 relays the
mapped ports and other instances' ports, and reads the kernel's counters of every SSH
connection it hands to sshd), independently of any client, so that a client's own estimate
can be checked against it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator
from dask_vastai.emulator.runtime import RecordOnlyRuntime
from dask_vastai.emulator.sandbox import SandboxRuntime
from tests.helpers.sandbox import make_spec, requires_sandbox, run_scenario, ssh, wait_for_log

SINK = shlex.quote(
    "import os, socket\n"
    "s = socket.create_server(('0.0.0.0', int(os.environ['VAST_TCP_PORT_70000'])))\n"
    "print('sink ready', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); n = 0\n"
    "    while (d := c.recv(1 << 20)): n += len(d)\n"
    "    print('sink got', n, flush=True); c.close()\n"
)


@pytest.mark.sandbox
@requires_sandbox
def test_bytes_are_counted_where_they_cross_each_sandbox_and_kept_after_it_stops(tmp_path: Path, key: Path) -> None:
    sent, pulled = 20_000_000, 5_000_000

    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            sink = (await runtime.start(make_spec(41, key, container_ports=(70000,),
                                                  onstart=f"python3 -c {SINK} &"))).ports[70000]
            a = await runtime.start(make_spec(42, key))
            await wait_for_log(runtime, 41, "sink ready")
            # instance 42 sends to instance 41's public port (the relay between instances)
            send = ("import socket, sys\n"
                    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
                    f"s.sendall(bytes({sent})); s.close()\n")
            await ssh(key, a.ports[22], "python3", "-c", shlex.quote(send), str(sink))
            await wait_for_log(runtime, 41, f"sink got {sent}")
            # bytes leave 42 over SSH (what SFTP or a tunnel carries)
            out = await ssh(key, a.ports[22], f"head -c {pulled} /dev/zero")
            assert len(out) == pulled
            await runtime.stop(42)
            await runtime.stop(41)
            up41, down41 = runtime.traffic(41)
            up42, down42 = runtime.traffic(42)
            assert sent <= down41 <= sent + 65_536, (up41, down41)
            assert up41 <= 65_536, "41 only received"
            # 42 sent the 20 MB, and over SSH the 5 MB with SSH's framing
            assert sent + pulled <= up42 <= 1.05 * (sent + pulled) + 200_000, up42
            assert 0 < down42 <= 200_000, down42
            assert runtime.traffic(41) == (up41, down41), "kept after the sandbox stopped"
            assert runtime.traffic(99) == (0, 0), "a rental that never ran moved nothing"
        finally:
            await runtime.close()

    run_scenario(scenario())


class _Moving(RecordOnlyRuntime):
    """Records only, with traffic: each rental sent 3 GB and received 1 GB."""

    def traffic(self, instance_id: int) -> tuple[int, int]:
        return 3_000_000_000, 1_000_000_000


def test_the_meter_bills_bandwidth_at_each_offers_rates_on_top_of_time() -> None:
    offers = [{"id": 1_000_001, "gpu_name": "RTX 3090", "dph_base": 0.3, "inet_up_cost": 0.02,
               "inet_down_cost": 0.05}]
    with Emulator(runtime=_Moving(), rate_limits=False, boot_delay_s=0, catalog=offers) as emu:
        emu._run_on_loop(lambda: emu.market.create(1_000_001, {"image": "img", "disk": 10}))
        meter = emu.meter()
    [rental] = meter["instances"]
    assert (rental["bytes_up"], rental["bytes_down"]) == (3_000_000_000, 1_000_000_000)
    assert rental["bandwidth_usd"] == pytest.approx(3 * 0.02 + 1 * 0.05)
    assert rental["cost_usd"] == pytest.approx(rental["time_usd"] + rental["bandwidth_usd"])
    assert meter["total_usd"] == pytest.approx(meter["time_usd"] + meter["bandwidth_usd"])
    assert meter["bandwidth_usd"] == pytest.approx(0.11)
