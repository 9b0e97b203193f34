"""Root inside one instance of a 2-instance cluster attacks the rest; everything is refused.

The attacker is ``hostile_host.py``, run as root inside instance A over SSH with the
cluster's key (what a host's operator has anyway): it holds every file A holds (its
incarnation, certificate, key, the CA certificate) and reaches every port forwarded into A.
It tries to run code on the user's machine and on instance B, to act as a client, to speak
for B on the scheduler and to read B's environment. Afterwards the user's client still does
all of that, and nothing ran where it should not have. Once with the tunnel, once in direct
mode, where B's worker listens on a public port that A reaches too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.sandbox import public_listeners, ssh_options

ATTACKER = Path(__file__).with_name("hostile_host.py")


def _ssh(cluster, name: str, key: Path, command: str, stdin: str = "", timeout: float = 240) -> str:
    endpoint = cluster.workers[name].link.endpoint
    run = subprocess.run(["ssh", *ssh_options(), "-i", str(key), "-p", str(endpoint.port), f"root@{endpoint.host}", command],
                         input=stdin, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"ssh {name} {command!r}: {run.stderr[-3000:]}"
    return run.stdout


def _p2p_shuffle_across(client) -> None:
    """What workers legitimately do to each other still works: a p2p dataframe shuffle."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import dask
    import dask.dataframe as dd

    df = dd.from_pandas(pd.DataFrame({"k": range(4000), "v": range(4000)}), npartitions=8)
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        shuffled = client.persist(df.shuffle("k"))
        assert client.compute(shuffled.v.sum()).result() == sum(range(4000))
    holders = {w for ws in client.who_has(shuffled).values() for w in ws}
    assert len(holders) == 2, f"the shuffle's output should span both instances: {holders}"
    del shuffled


@pytest.mark.slow
@pytest.mark.parametrize("network", ["tunnel", "direct"])
def test_root_in_one_instance_can_act_only_as_that_worker(market, tmp_path: Path, network: str) -> None:
    """In direct mode the workers listen on public ports, which A also reaches (B's included)."""
    import os

    from distributed import Client

    from dask_vastai import VastAICluster

    laptop_marker = tmp_path / "ran-on-the-users-machine"
    with VastAICluster(
        gpu="RTX_3090", n=2, api_url=market.url, api_key=market.api_key, name="hh", quiet=True,
        boot_timeout=240, secret_env={"HF_TOKEN": "hf-secret-of-the-user"}, network=network,
    ) as cluster, Client(cluster) as client:
        assert [w.network for w in cluster.workers.values()] == [network] * 2
        key = tmp_path / "cluster_key"
        key.write_bytes(cluster.key.private.export_private_key("openssh"))
        key.chmod(0o600)
        workers = {w["name"]: address for address, w in client.scheduler_info()["workers"].items()}
        a, b = workers["hh-0"], workers["hh-1"]
        _p2p_shuffle_across(client)
        nanny_a = client.scheduler_info()["workers"][a]["nanny"]
        config = {
            "scheduler": cluster.scheduler_address, "a_name": "hh-0", "a_address": a, "a_nanny": nanny_a,
            "b_address": b, "laptop_marker": str(laptop_marker),
            "a_cert": f"/root/.dask-vastai/hh-0-{a.rsplit(':', 1)[1]}/cert.pem",
        }
        out = _ssh(cluster, "hh-0", key, f"{sys.executable} - {json.dumps(json.dumps(config))}",
                   stdin=ATTACKER.read_text())
        report = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        attempts = {r["attempt"]: r["outcome"] for r in report}
        assert "cert.pem" in attempts["credentials found"], "the attacker found A's certificate and key"
        attacks = {k: v for k, v in attempts.items() if not k.startswith(("credentials", "re-register"))}
        accepted = {k: v for k, v in attacks.items() if not v.startswith("refused")}
        assert not accepted, json.dumps(accepted, indent=1)
        for needed in ("run_function on port", "run on port", "register-client + update-graph",
                       "unregister B", "connection_stream + compute-task on B", "run on B",
                       "update-graph on A's own worker stream"):
            assert any(k.startswith(needed) for k in attacks), f"the attack {needed!r} was not tried: {attempts}"
        scheduler_port = cluster.scheduler_address.rsplit(":", 1)[1]
        assert any(f"port {scheduler_port} " in k for k in attacks), "the scheduler's forwarded port was tried"

        # What A's root can reach from outside B: in tunnel mode nothing listens beyond B's
        # loopback; in direct mode only B's own worker port (mutual TLS, live-peer list).
        public_b = public_listeners(_ssh(cluster, "hh-1", key, "cat /proc/net/tcp /proc/net/tcp6"))
        assert public_b == ({int(b.rsplit(":", 1)[1])} if network == "direct" else set()), public_b

        # Nothing ran here or on B; B stayed registered and running, not paused by A's stream.
        assert not laptop_marker.exists()
        assert _ssh(cluster, "hh-1", key, "test -e /root/pwned-by-a && echo RAN || echo clean").strip() == "clean"
        info = client.scheduler_info()["workers"]
        assert b in info and info[b]["status"] == "running", info.get(b)

        # The user's client keeps every power: code here, on B, B's environment, tasks on B.
        assert client.run_on_scheduler(lambda: "here") == "here"
        env_b = client.run(lambda: dict(os.environ), workers=[b])[b]
        assert env_b["HF_TOKEN"] == "hf-secret-of-the-user"
        assert client.submit(lambda x: x + 1, 1, workers=[b]).result() == 2
