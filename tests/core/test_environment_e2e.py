"""The workers' environment end to end, on the emulator's sandboxes.

The sandboxes see this interpreter and its site-packages (read-only) but not the checkout:
``import dask_vastai`` fails there, as it would on a Vast image for a development checkout.
So what these tests show is what a user of an editable install sees on Vast: our code, the
user's local modules and dask config reach the workers; secrets reach them without being
stored by the marketplace; a worker whose versions differ is refused with both versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator

pytestmark = [pytest.mark.sandbox, pytest.mark.slow, pytest.mark.usefixtures("sandbox")]


SECRET = "s3cr3t-token-value-9f2c"


@pytest.fixture
def market(tmp_path: Path):
    """Rate limits off: these tests are about what reaches the instances, not pacing.

    Strict, but destroyed rows do not linger: the tests assert they are gone once close returns.
    """
    with Emulator(runtime="sandbox", boot_delay_s=0.5, rate_limits=False, state_dir=tmp_path / "emu",
                  profile="strict", variants={"destroy_linger_s": 0}) as emu:
        yield emu


def test_checkout_code_config_and_secrets_reach_the_workers_but_not_vast(market, oracle) -> None:
    import dask
    from distributed import Client

    from dask_vastai import VastAICluster
    from dask_vastai._testing import remote_square
    from dask_vastai.environment import SHIP_DIR, Secret

    def sandbox_view() -> dict[str, object]:
        import os

        import dask

        import dask_vastai

        return {
            "dask_vastai": dask_vastai.__file__,
            "chunk": dask.config.get("array.chunk-size"),
            "token": os.environ.get("MY_TOKEN"),
            "other": os.environ.get("OTHER_SECRET"),
            "checkout_visible": os.path.exists("/work/main/dask_vastai/__init__.py"),
        }

    with dask.config.set({"array.chunk-size": "77MiB"}):
        with VastAICluster(
            gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="env", quiet=True,
            boot_timeout=240, env={"PUBLIC_FLAG": "1", "MY_TOKEN": Secret(SECRET)},
            secret_env={"OTHER_SECRET": SECRET + "-2"}, packages=["toolz>=0.1"],
        ) as cluster, Client(cluster) as client:
            # a module-level function of dask_vastai, pickled by reference
            assert client.submit(remote_square, 7, pure=False).result() == 49
            view = client.submit(sandbox_view, pure=False).result()
            assert view["checkout_visible"] is False
            assert str(view["dask_vastai"]).startswith(SHIP_DIR + "/")
            assert view["chunk"] == "77MiB"
            assert view["token"] == SECRET and view["other"] == SECRET + "-2"
            logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
            assert "shipped dask_vastai" in logs and "environment in step with the client" in logs
            assert "installing" not in logs, "a matched instance must install nothing"

            rows = market.instances()
            assert rows and rows[0]["extra_env"] and ["PUBLIC_FLAG", "1"] in rows[0]["extra_env"]
            stored = json.dumps(rows) + json.dumps(market.requests) + cluster.onstart_script()
            shown = oracle.cli("show", "instances", "--raw", emu=market).stdout
            assert "PUBLIC_FLAG" in shown
            instance_logs = json.dumps({k: str(v) for k, v in cluster.get_logs().items()})
            assert "MY_TOKEN" in instance_logs, "the supervisor logs the names of the worker's env"
            for text in (stored, shown, instance_logs):
                assert SECRET not in text


MYLIB = """
def f(x):
    return x + 1000
"""

SCRIPT = """
import sys
from distributed import Client
from dask_vastai import VastAICluster
import mylib

def g(x):  # defined in __main__: travels by value, as from a notebook
    return mylib.f(x) * 2

url, key = sys.argv[1:3]
with VastAICluster(gpu="RTX_3090", n=1, api_url=url, api_key=key, name="script", quiet=True,
                   boot_timeout=240) as cluster, Client(cluster) as client:
    print("F", client.submit(mylib.f, 1, pure=False).result())
    print("G", client.submit(g, 2, pure=False).result())
    print("WHERE", client.submit(lambda: __import__("mylib").__file__, pure=False).result())
"""


def test_script_with_a_local_module_runs_it_on_the_workers(market, tmp_path: Path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / "mylib.py").write_text(textwrap.dedent(MYLIB))
    (work / "run.py").write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "run.py", market.url, market.api_key], cwd=work, env=env,
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert "F 1001" in out and "G 2004" in out, proc.stdout
    where = next(line for line in out if line.startswith("WHERE"))
    assert "/root/.dask-vastai/ship/" in where and where.endswith("/site/mylib.py")
    assert market.instances() == []


def test_instance_with_another_python_is_refused_naming_both(market) -> None:
    import dask

    from dask_vastai import VastAICluster

    here = "%d.%d.%d" % sys.version_info[:3]  # noqa: UP031
    with (
        dask.config.set({"vastai.testing.probe-versions": {"python": "3.9.18"}}),
        pytest.raises(RuntimeError) as info,
    ):
        VastAICluster(
            gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="oldpy", quiet=True,
            boot_timeout=120,
        )
    message = str(info.value)
    assert "3.9.18" in message and here in message
    assert "image" in message and f"python='{sys.version_info[0]}.{sys.version_info[1]}'" in message
    assert market.instances() == []


def test_instance_with_another_distributed_is_refused_when_install_fails(market) -> None:
    import dask
    from distributed import __version__ as ours

    from dask_vastai import VastAICluster

    with (
        dask.config.set({"vastai.testing.probe-versions": {"distributed": "2020.1.0"}}),
        pytest.raises(RuntimeError) as info,
    ):
        VastAICluster(
            gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="olddist", quiet=True,
            boot_timeout=120, pip_args=["--no-index"],
        )
    message = str(info.value)
    assert f"distributed: client {ours}, instance 2020.1.0" in message
    assert f"distributed=={ours}" in message
    assert market.instances() == []


def test_python_version_option_boots_even_where_uv_cannot_be_fetched(market) -> None:
    """The sandbox has no network: uv's install fails, the image's matching Python is used."""
    from distributed import Client

    from dask_vastai import VastAICluster

    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    with VastAICluster(
        gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="uvpy", quiet=True,
        boot_timeout=240, python=minor,
    ) as cluster, Client(cluster) as client:
        assert "python install" in cluster.onstart_script()
        assert client.submit(lambda: __import__("sys").version_info[:2], pure=False).result() == sys.version_info[:2]
        logs = "\n".join(str(text) for name, text in cluster.get_logs().items() if name.startswith("instance"))
        assert f"uv could not install Python {minor}" in logs, logs[-2000:]


def test_worker_registering_with_other_versions_is_refused_by_the_scheduler(market) -> None:
    """The probe saw a matching instance, but the worker reports another msgpack: refused."""
    import dask

    from dask_vastai import VastAICluster

    with (
        dask.config.set({"vastai.testing.worker-versions": {"msgpack": "0.6.0"}}),
        pytest.raises(RuntimeError) as info,
    ):
        VastAICluster(
            gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="gate", quiet=True,
            boot_timeout=120,
        )
    message = str(info.value)
    assert "gate-0 was refused" in message
    assert "msgpack: client" in message and "0.6.0" in message
    assert market.instances() == []


def test_a_package_the_instance_cannot_install_fails_the_boot_with_pips_reason(market) -> None:
    """The install really runs on the instance (pip, no uv there), and its failure is told."""
    from dask_vastai import VastAICluster

    with pytest.raises(RuntimeError) as info:
        VastAICluster(
            gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="nopkg", quiet=True,
            boot_timeout=120, packages=["dask-vastai-no-such-package==1.0"], pip_args=["--no-index"],
        )
    message = str(info.value)
    assert "installing dask-vastai-no-such-package==1.0 failed" in message
    assert "No matching distribution" in message or "no matching distribution" in message.lower()
    assert market.instances() == []
