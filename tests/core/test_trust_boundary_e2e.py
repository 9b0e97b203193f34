"""One cluster on the emulator, looked at as a hostile host would and as the user's machine is.

The client holds secrets of every kind (the API key, a ``Secret`` env entry, ``secret_env``,
a private index token in ``pip_args``, a coiled token and a gateway password in its dask
config, a ``credentials.json`` in and beside a local package). The instance is a real sandbox
with OpenSSH and a real ``dask worker``. The tests check what listens where, what reached
the instance, and that no object of the cluster shows a secret in its repr.
"""

from __future__ import annotations

import gc
import importlib
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import dask
import psutil
import pytest

from tests.helpers.sandbox import listening_sockets, public_listeners

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

# Made at run time: this file travels to the instance too (the tests package is a local
# package of the test process), and its text must not contain them.
_RUN = secrets.token_hex(4)
SECRETS = {
    name: f"{name.upper().replace(' ', '-')}-{_RUN}"
    for name in ("secret env", "Secret env entry", "pip index token", "coiled token", "gateway password",
                 "credentials file")
}


@pytest.fixture(scope="module")
def trust(tmp_path_factory) -> Iterator[dict[str, Any]]:
    from dask_vastai.emulator import Emulator
    from dask_vastai.emulator.sandbox import SandboxRuntime

    ok, why = SandboxRuntime.available()
    if not ok:
        pytest.skip(f"sandbox runtime unavailable here: {why}")
    from distributed import Client

    from dask_vastai import VastAICluster
    from dask_vastai.environment import Secret

    root = tmp_path_factory.mktemp("project")
    pkg = root / "trustpkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    (pkg / "data" / "table.json").write_text('{"declared": true}')
    (pkg / "credentials.json").write_text(f'{{"token": "{SECRETS["credentials file"]}"}}')
    (root / "credentials.json").write_text(f'{{"token": "{SECRETS["credentials file"]}"}}')
    (root / "pyproject.toml").write_text('[tool.setuptools.package-data]\ntrustpkg = ["data/*.json"]\n')
    sys.path.insert(0, str(root))
    importlib.import_module("trustpkg")
    config = {
        "coiled.token": SECRETS["coiled token"],
        "gateway.auth.kwargs.password": SECRETS["gateway password"],
        "distributed.worker.memory.spill": 0.61,
    }
    try:
        with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True,
                      state_dir=tmp_path_factory.mktemp("emu")) as emu, dask.config.set(config):
            with VastAICluster(
                gpu="RTX_3090", n=1, api_url=emu.url, api_key=emu.api_key, name="trust", boot_timeout=180,
                quiet=True, env={"WANDB_API_KEY": Secret(SECRETS["Secret env entry"])},
                secret_env={"HF_TOKEN": SECRETS["secret env"]},
                pip_args=["--index-url", f"https://user:{SECRETS['pip index token']}@127.0.0.1:9/simple"],
            ) as cluster, Client(cluster) as client:
                yield {"emu": emu, "cluster": cluster, "client": client, "api key": emu.api_key}
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("trustpkg", None)


def _run(trust: dict[str, Any], command: str, timeout_s: float = 30) -> str:
    cluster = trust["cluster"]
    (instance,) = cluster.workers.values()
    return cluster.sync(instance.link.run, command, timeout_s=timeout_s)[1]


def test_the_workers_have_the_secrets_they_were_given(trust) -> None:
    def env() -> tuple[str | None, str | None]:
        import os

        return os.environ.get("HF_TOKEN"), os.environ.get("WANDB_API_KEY")

    assert trust["client"].submit(env, pure=False).result() == (SECRETS["secret env"], SECRETS["Secret env entry"])


# ----------------------------------------------------------------------------- listeners
def test_nothing_of_ours_listens_beyond_loopback_on_the_client(trust) -> None:
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    dashboard = trust["cluster"].scheduler.http_server.port
    assert any(a.port == dashboard for a in listening), "the dashboard is one of the sockets looked at"
    assert [a for a in listening if a.ip not in ("127.0.0.1", "::1")] == []


def test_beyond_loopback_only_the_direct_workers_own_port_listens(trust) -> None:
    """The default network is "auto": this instance's ports answer, so its worker listens on
    its public mapped port (mutual TLS, live-peer list), and nothing else does: not the nanny,
    not the worker's HTTP server, not sshd's forwards. (Tunnel mode, where not even the
    worker's port is public, is held by tests/core/test_hostile_host.py.)"""
    (instance,) = trust["cluster"].workers.values()
    assert instance.network == "direct", "the default network ('auto') made this instance direct"
    text = _run(trust, "cat /proc/net/tcp /proc/net/tcp6")
    ((address, worker),) = trust["client"].scheduler_info()["workers"].items()
    worker_port = int(address.rsplit(":", 1)[1])
    ours = {worker_port, int(worker["nanny"].rsplit(":", 1)[1]), worker["services"]["dashboard"]}
    assert ours <= {port for _, port in listening_sockets(text)}, (ours, listening_sockets(text))
    assert public_listeners(text) == {worker_port}, listening_sockets(text)


# ----------------------------------------------------------------------------- what travels
def test_only_allow_listed_config_and_declared_files_reach_the_instance(trust) -> None:
    client = trust["client"]

    def worker_view() -> dict[str, Any]:
        import importlib.resources

        import dask
        import trustpkg

        return {
            "spill": dask.config.get("distributed.worker.memory.spill"),
            "coiled": dask.config.get("coiled", None),
            "gateway": dask.config.get("gateway", None),
            "data": (importlib.resources.files("trustpkg") / "data" / "table.json").read_text(),
            "credentials": (importlib.resources.files("trustpkg") / "credentials.json").is_file(),
            "double": trustpkg.double(21),
        }

    assert client.submit(worker_view, pure=False).result() == {
        "spill": 0.61, "coiled": None, "gateway": None, "data": '{"declared": true}', "credentials": False,
        "double": 42,
    }
    patterns = " ".join(f"-e {SECRETS[n]}" for n in ("coiled token", "gateway password", "credentials file",
                                                        "pip index token"))
    found = _run(trust, "find / -xdev -name credentials.json 2>/dev/null; "
                        f"grep -rlsF {patterns} /root /tmp /workspace /var/log; true",
                 timeout_s=180)  # a whole-disk search: slow on a loaded box (the suite runs 3 files at once)
    assert found.strip() == ""
    shipment = next(iter(trust["cluster"].environment._shipments.values()))
    for name in ("coiled token", "gateway password", "credentials file"):
        assert SECRETS[name].encode() not in __import__("gzip").decompress(shipment.archive)
    assert "trustpkg/credentials.json" in shipment.left_behind


# ----------------------------------------------------------------------------- reprs
def _reachable(root: object, max_depth: int = 12) -> Iterator[object]:
    """Objects reachable from ``root`` through gc referents (modules, types and code not entered)."""
    import types

    seen = {id(root)}
    frontier = [root]
    for _ in range(max_depth):
        nxt = []
        for obj in frontier:
            yield obj
            if isinstance(obj, types.ModuleType | type | types.CodeType | types.FunctionType):
                continue
            for ref in gc.get_referents(obj):
                if id(ref) not in seen:
                    seen.add(id(ref))
                    nxt.append(ref)
        frontier = nxt


def test_no_object_of_the_cluster_shows_a_secret_or_a_private_key_in_its_repr(trust) -> None:
    cluster = trust["cluster"]
    secrets = {**SECRETS, "API key": trust["api key"]}
    key_material = ("PRIVATE KEY-----", "PRIVATE KEY")
    leaks: list[str] = []
    count = 0
    for obj in _reachable(cluster):
        if isinstance(obj, str | bytes | bytearray | memoryview):
            continue  # the values themselves: what matters is whether anything shows them
        count += 1
        try:
            texts = (repr(obj), str(obj))
        except Exception:  # noqa: BLE001 - an object whose repr fails shows nothing
            continue
        for text in texts:
            found = [n for n, v in secrets.items() if v in text] + [m for m in key_material[:1] if m in text]
            if found:
                leaks.append(f"{type(obj).__module__}.{type(obj).__qualname__}: {found}: {text[:200]}")
                break
    assert count > 1000, f"the walk reached only {count} objects"
    assert leaks == [], "\n".join(leaks[:20])
