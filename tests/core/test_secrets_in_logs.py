"""No secret in a repr, a log line, a command line or a clear-text request.

The e2e walk over a live cluster's objects is in ``test_trust_boundary_e2e.py``; these are the
single places: the reprs of what holds secrets, the pip install on a real instance (asyncssh
logs every command at INFO), the CLI's ``--api-key`` and ``http://`` API URLs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dask_vastai.bootstrap import Incarnation
from dask_vastai.environment import (
    ClientEnvironment,
    InstanceEnvironment,
    Secret,
    SecretEnv,
    redact_urls,
)
from dask_vastai.instance import ClusterContext
from dask_vastai.security import ClusterCA
from dask_vastai.vast import VastAPI
from tests.helpers.sandbox import make_spec

TOKEN = "idx-token-never-logged-0417"


def test_what_holds_secrets_shows_none_in_its_repr() -> None:
    env = SecretEnv({"HF_TOKEN": "hf-value", "WANDB_API_KEY": Secret("wandb-value")})
    assert env == {"HF_TOKEN": "hf-value", "WANDB_API_KEY": "wandb-value"}  # readable where it is used
    ca = ClusterCA("reprs", lifetime_days=1)
    worker = ca.issue_worker("w", address="tls://127.0.0.1:1", nanny="tls://127.0.0.1:2")
    context = ClusterContext(
        broker=None, hub=None, scheduler_address="tls://127.0.0.1:1", certificates=ca,  # type: ignore[arg-type]
        boot_timeout_s=1, heartbeat_interval_s=1, registered=lambda names: True, log=print, env=env,
        host_key_timeout_s=1,
    )
    incarnation = Incarnation(
        worker_name="w", scheduler_address="tls://127.0.0.1:1", worker_port=1, nanny_port=2, nthreads=1,
        memory_limit=1, resources={}, env=dict(env), tls_ca=worker.ca_pem, tls_cert=worker.cert_pem,
        tls_key=worker.key_pem, death_timeout_s=1,
    )
    assert "PRIVATE KEY" in worker.key_pem
    client = ClientEnvironment.current(pip_args=["--index-url", f"https://me:{TOKEN}@pypi.example/simple"])
    api = VastAPI(api_key="vast-key-never-shown-0417", api_url="http://127.0.0.1:9")
    for obj in (env, context, incarnation, worker, ca, ca.security(), client, InstanceEnvironment(client), api,
                api.__dict__):
        for text in (repr(obj), str(obj)):
            for secret in ("hf-value", "wandb-value", "PRIVATE KEY", TOKEN, "vast-key-never-shown"):
                assert secret not in text, (type(obj).__name__, text)
    assert "HF_TOKEN" in repr(env), "names are fine, values are not"
    assert client.pip_arguments() == ["--index-url", f"https://me:{TOKEN}@pypi.example/simple"]
    assert redact_urls(f"pkg @ git+https://{TOKEN}@github.com/a/b") == "pkg @ git+https://***@github.com/a/b"


@pytest.mark.parametrize("url", ["http://10.1.2.3:8080", "http://console.vast.ai", "http://[2001:db8::1]:80"])
def test_an_api_url_that_would_send_the_key_in_clear_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="https://"):
        VastAPI(api_key="k", api_url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000", "http://localhost:1", "http://[::1]:2",
                                 "https://console.vast.ai"])
def test_loopback_and_https_api_urls_are_fine(url: str) -> None:
    assert VastAPI(api_key="k", api_url=url).api_url == url


def test_api_key_on_the_command_line_warns_and_points_at_the_variable(emulator) -> None:
    base = [sys.executable, "-m", "dask_vastai.cli", "ls", "--api-url", emulator.url]
    flagged = subprocess.run([*base, "--api-key", emulator.api_key], capture_output=True, text=True, timeout=60)
    assert flagged.returncode == 0, flagged.stderr
    assert "warning: --api-key" in flagged.stderr and "VAST_API_KEY" in flagged.stderr
    assert emulator.api_key not in flagged.stderr + flagged.stdout
    quiet = subprocess.run(base, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "VAST_API_KEY": emulator.api_key})
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


@pytest.mark.sandbox
@pytest.mark.timeout(120)
def test_pip_args_reach_the_instance_in_a_file_never_in_a_logged_command(sandbox, tmp_path: Path, caplog) -> None:
    """An install that must use a private index: pip gets the token, no log line or error has it."""
    from dask_vastai.bootstrap import BootstrapConfig, onstart_script, parse_probe, probe_command
    from dask_vastai.emulator.sandbox import SandboxRuntime
    from dask_vastai.exceptions import EnvironmentMismatch
    from dask_vastai.tunnel import ClusterKey, SSHEndpoint, TunnelHub

    key = ClusterKey.generate("dask-vastai-pip")
    client = ClientEnvironment.current(
        packages=["dvt-not-on-any-index==1.0"],
        pip_args=["--index-url", f"http://user:{TOKEN}@127.0.0.1:9/simple", "--retries", "0", "--timeout", "2"],
    )
    lines: list[str] = []

    async def main() -> tuple[str, str]:
        runtime = SandboxRuntime(tmp_path / "state")
        hub = TunnelHub(key, scheduler_port=1)
        config = BootstrapConfig("pip", key.public_openssh, "http://127.0.0.1:9", orphan_timeout_s=600,
                                 python=sys.executable)
        try:
            ends = await runtime.start(make_spec(5, onstart=onstart_script(config)))
            link = await hub.connect("i5", SSHEndpoint(ends.public_ipaddr, ends.ports[22]), timeout_s=30)
            probe = parse_probe((await link.run(probe_command(packages=client.probe_names()), timeout_s=60))[1])
            with pytest.raises(EnvironmentMismatch) as failed:
                await InstanceEnvironment(client)._install(link, sys.executable, probe, log=lines.append,
                                                            timeout_s=60)
            left = (await link.run("ls -a /root/.dask-vastai", timeout_s=20))[1]
            return str(failed.value), left
        finally:
            await hub.close()
            await runtime.close()

    with caplog.at_level(logging.DEBUG):
        error, left = asyncio.run(main())
    assert "dvt-not-on-any-index" in error and "127.0.0.1:9" in error, "pip ran with the index it was given"
    assert TOKEN not in error and TOKEN not in "\n".join(lines)
    assert TOKEN not in caplog.text
    assert "Command: sh /root/.dask-vastai/pip-install-" in caplog.text, "asyncssh logs the command it ran"
    assert "pip-install" not in left, "the file with the token is gone after the install"
