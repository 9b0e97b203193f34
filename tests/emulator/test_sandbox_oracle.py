"""Rent through the emulator with the official ``vastai`` CLI and meet a real sandbox.

The user's path on Vast: add an SSH key to the account, search offers, create an instance
with an onstart script and a ``-p`` port, wait for ``running``, read ``vastai logs``, log in
at ``vastai ssh-url``, destroy. Everything here goes through the CLI, as a user types it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.oracle import run_cli
from tests.helpers.sandbox import requires_sandbox, ssh_options
from tests.helpers.waiting import wait_until

emulator = pytest.importorskip("dask_vastai.emulator")

pytestmark = [
    pytest.mark.sandbox, pytest.mark.oracle, pytest.mark.slow,
    pytest.mark.skipif(not hasattr(emulator, "Emulator"), reason="the emulator's control plane is not there yet"),
    requires_sandbox,
]

SSH_OPTS = ssh_options()


def test_rent_with_the_vastai_cli_read_logs_log_in_and_destroy(tmp_path: Path, monkeypatch) -> None:
    # the CLI caches `ssh-url` per instance id under $XDG_CACHE_HOME: ids repeat across emulators
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with emulator.Emulator(runtime="sandbox", boot_delay_s=0.5, state_dir=tmp_path / "emu") as emu:
        def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return run_cli(*args, url=emu.url, api_key=emu.api_key, check=check)

        cli("create", "ssh-key", key.with_suffix(".pub").read_text().strip())
        offers = json.loads(cli("search", "offers", "num_gpus=1 rentable=true", "--raw").stdout)
        assert offers, "the emulator's catalog has no 1-GPU offer"
        offer = offers[0]
        onstart = ('echo "hello from $CONTAINER_ID: $(nvidia-smi --query-gpu=name,memory.total '
                   '--format=csv,noheader,nounits) port=$VAST_TCP_PORT_8000 $GREETING"; '
                   "cd /workspace && echo served > index.txt && python3 -m http.server 8000 >/dev/null 2>&1 &")
        created = json.loads(cli(
            "create", "instance", str(offer["id"]), "--image", "vastai/pytorch", "--ssh", "--direct",
            "--disk", "5", "--env", "-p 8000:8000 -e GREETING=hi", "--onstart-cmd", onstart, "--raw").stdout)
        instance_id = created["new_contract"]

        def running() -> dict | None:
            row = json.loads(cli("show", "instance", str(instance_id), "--raw").stdout)
            return row if row and row.get("actual_status") == "running" else None

        row = wait_until(running, 60, f"instance {instance_id} to be running", interval_s=0.3)
        host_port_8000 = row["ports"]["8000/tcp"][0]["HostPort"]
        log = wait_until(lambda: (out := cli("logs", str(instance_id)).stdout) and "hello from" in out and out,
                         30, "the onstart output in `vastai logs`", interval_s=0.3)
        expected_gpu = offer["gpu_name"].replace("_", " ")
        assert f"hello from {instance_id}: " in log and expected_gpu in log, log
        assert f"port={host_port_8000} hi" in log, log

        ssh_url = cli("ssh-url", str(instance_id)).stdout.strip()
        assert ssh_url.startswith("ssh://root@127.0.0.1:"), ssh_url
        port = ssh_url.rsplit(":", 1)[1]
        out = subprocess.run(["ssh", "-i", str(key), "-p", port, *SSH_OPTS, "root@127.0.0.1",
                              "cat /workspace/index.txt; hostname"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.split() == ["served", f"C.{instance_id}"], out.stderr

        cli("destroy", "instance", str(instance_id), "-y")
        wait_until(lambda: subprocess.run(["ssh", "-i", str(key), "-p", port, *SSH_OPTS, "root@127.0.0.1", "true"],
                                          capture_output=True, timeout=30).returncode != 0,
                   20, "the destroyed instance's SSH port to close", interval_s=0.3)


def test_args_launch_runs_the_entrypoint_and_the_instance_exits(tmp_path: Path) -> None:
    """``--entrypoint/--args`` (runtype args): the workload is the container; its end is ``exited``."""
    with emulator.Emulator(runtime="sandbox", boot_delay_s=0.2, state_dir=tmp_path / "emu") as emu:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli(*args, url=emu.url, api_key=emu.api_key)

        offers = json.loads(cli("search", "offers", "num_gpus=1 rentable=true", "--raw").stdout)
        created = json.loads(cli("create", "instance", str(offers[0]["id"]), "--image", "vastai/pytorch",
                                 "--entrypoint", "/bin/sh", "--raw", "--args", "-c",
                                 "echo workload ran on $(hostname); exit 3").stdout)
        instance_id = created["new_contract"]

        def exited() -> dict | None:
            row = json.loads(cli("show", "instance", str(instance_id), "--raw").stdout)
            return row if row and row.get("actual_status") == "exited" else None

        row = wait_until(exited, 60, f"instance {instance_id} to exit", interval_s=0.3)
        assert "3" in row["status_msg"] and "22/tcp" not in (row.get("ports") or {})
        log = wait_until(lambda: (out := cli("logs", str(instance_id)).stdout) and "workload ran" in out and out,
                         30, "the workload's output in `vastai logs`", interval_s=0.3)
        assert f"workload ran on C.{instance_id}" in log
        cli("destroy", "instance", str(instance_id), "-y")
