"""The workers' environment, client side: what must match, what is installed, what travels.

Fast tests, no sandbox: version comparison and install plans, the shipped archive (unpacked
and imported here as the instance would), the onstart's uv steps for ``python="3.x"``, the
probe's test hook, secrets kept out of Vast's create request, and the scheduler's version
gate refusing a real worker process that reports other versions.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import dask.config
import pytest

from dask_vastai._testing import WORKER_VERSIONS_ENV, worker_env
from dask_vastai.bootstrap import (
    ONSTART_MAX_CHARS,
    PYTHON_VENV,
    STATE_DIR,
    BootstrapConfig,
    onstart_script,
    probe_command,
)
from dask_vastai.environment import InstanceEnvironment, Secret, split_env
from dask_vastai.environment.shipping import (
    build_shipment,
    local_modules,
    non_default_config,
    unpack_command,
)
from dask_vastai.environment.versions import (
    SYNCED_PACKAGES,
    ClientEnvironment,
    check_python,
    install_command,
    packages_to_install,
    python_option,
    version_mismatches,
)
from dask_vastai.exceptions import EnvironmentMismatch
from dask_vastai.tunnel import ClusterKey

HERE = "%d.%d.%d" % sys.version_info[:3]  # noqa: UP031
MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _client(**kw) -> ClientEnvironment:
    return ClientEnvironment.current(**kw)


# ------------------------------------------------------------------------------ secrets
def test_secret_values_are_split_out_and_never_printed():
    token = Secret("hunter2")
    assert "hunter2" not in repr(token) and "hunter2" not in str(token) and "hunter2" not in f"{token}"
    assert "hunter2" not in repr({"A": token})
    public, secret = split_env({"A": "1", "TOKEN": token}, {"OTHER": "x"})
    assert public == {"A": "1"}
    assert secret == {"TOKEN": "hunter2", "OTHER": "x"}
    with pytest.raises(ValueError, match="both env and secret_env"):
        split_env({"TOKEN": "1"}, {"TOKEN": "2"})


def test_cluster_sends_vast_only_the_public_env(emulator):
    from dask_vastai import VastAICluster

    with VastAICluster(
        api_url=emulator.url, api_key=emulator.api_key, quiet=True,
        env={"PUBLIC": "yes", "WANDB_API_KEY": Secret("wandb-secret-1")}, secret_env={"HF_TOKEN": "hf-secret-2"},
    ) as cluster:
        create = cluster.pools["default"].create_request
        body = json.dumps(create.body(1))
        assert "PUBLIC" in body
        assert "wandb-secret-1" not in body and "hf-secret-2" not in body
        assert "wandb-secret-1" not in cluster.onstart_script()
        assert cluster.context is not None
        assert cluster.context.env == {"WANDB_API_KEY": "wandb-secret-1", "HF_TOKEN": "hf-secret-2"}


# ------------------------------------------------------------------------------ versions
def test_matched_instance_installs_nothing():
    client = _client()
    installed = {n: client.versions[n] for n in SYNCED_PACKAGES}
    assert packages_to_install(client, installed) == []
    assert version_mismatches(client, {**installed, "python": HERE}) == []


def test_only_what_differs_is_installed_and_user_packages_are_kept_as_written():
    client = _client(packages=["toolz>=0.10", "numpy==1.0.0", "git+https://example.invalid/x.git"])
    installed = {n: client.versions[n] for n in SYNCED_PACKAGES}
    installed["distributed"] = "2020.1.0"
    installed["toolz"] = "0.12.1"
    installed["numpy"] = "2.1.0"
    specs = packages_to_install(client, installed)
    assert specs == [
        f"distributed=={client.versions['distributed']}",
        "numpy==1.0.0",
        "git+https://example.invalid/x.git",
    ]
    assert "toolz" in client.probe_names() and "numpy" in client.probe_names()


@pytest.mark.parametrize(
    ("packages", "pip_args", "message"),
    [
        (["numpy>=>1"], [], "pip cannot read"),
        (["--upgrade"], [], "pip option; put options in pip_args"),
        ([""], [], "empty string"),
        ("numpy", [], "lists of strings"),
    ],
)
def test_bad_packages_fail_at_construction_with_the_value(packages, pip_args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _client(packages=packages, pip_args=pip_args)


def test_python_mismatch_names_both_versions_and_both_fixes():
    client = _client()
    with pytest.raises(EnvironmentMismatch) as info:
        check_python(client, "3.8.10", image="vastai/pytorch:2.1")
    text = str(info.value)
    assert "3.8.10" in text and HERE in text and "vastai/pytorch:2.1" in text
    assert f"python={MINOR!r}" in text and "image" in text
    check_python(client, HERE)  # same minor: fine
    lines = version_mismatches(client, {"python": "3.8.10", "distributed": "2020.1.0"})
    assert any("python: client" in line and "3.8.10" in line for line in lines)
    assert any(line.startswith("distributed: client") and "2020.1.0" in line for line in lines)


def test_python_option_is_a_version_to_install_or_an_interpreter():
    client = _client()
    assert python_option(None, client) == (None, None)
    assert python_option(MINOR, client) == (None, MINOR)
    assert python_option("/opt/conda/bin/python", client) == ("/opt/conda/bin/python", None)
    with pytest.raises(ValueError, match=f"this client runs Python {HERE}"):
        python_option("3.7", client)


def test_install_command_prefers_uv_and_reports_versions_after(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "uv").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "uv").chmod(0o755)
    cmd = install_command(sys.executable, ["distributed==1.0"], ["--index-url", "https://pypi.example/simple"],
                          ["dask", "distributed"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert calls.read_text().split() == [
        "pip", "install", "--python", sys.executable, "--index-url", "https://pypi.example/simple", "distributed==1.0",
    ]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["python"] == HERE and report["versions"]["dask"] == dask.__version__
    # no uv anywhere: pip of the same interpreter
    plain = install_command("/nonexistent/python", ["x==1"], [], ["x"])
    assert "/nonexistent/python -m pip install" in plain


# ----------------------------------------------------------------------------- shipping
def test_local_modules_are_those_next_to_the_script_and_editable_installs(tmp_path: Path):
    (tmp_path / "mylib_env_test.py").write_text("VALUE = 41\n")
    pkg = tmp_path / "mypkg_env_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .inner import X\n")
    (pkg / "inner.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mylib_env_test  # noqa: F401
        import mypkg_env_test  # noqa: F401

        found = {m.name: m for m in local_modules()}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mylib_env_test", None)
        sys.modules.pop("mypkg_env_test", None)
        sys.modules.pop("mypkg_env_test.inner", None)
    assert found["mylib_env_test"].why == "next to the script"
    assert found["mypkg_env_test"].path == str(pkg)
    assert "dask_vastai" in found  # this checkout: an editable install, outside site-packages
    for installed in ("json", "dask", "distributed", "pytest", "yaml"):
        assert installed not in found
    # an installed package is shipped only when asked (the instance lacks it)
    assert {m.name for m in local_modules(include=["yaml"])} >= {"yaml"}


def test_shipment_unpacks_into_an_importable_folder_with_the_dask_config(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "shipped_mod.py").write_text("def f(x):\n    return x + 1000\n")
    (tmp_path / "src" / "__pycache__").mkdir()
    pkg = tmp_path / "src" / "shipped_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / ".env").write_text("TOKEN=never-leaves\n")
    fake_modules = {
        "shipped_mod": types.SimpleNamespace(__file__=str(tmp_path / "src" / "shipped_mod.py")),
        "shipped_pkg": types.SimpleNamespace(__file__=str(pkg / "__init__.py"), __path__=[str(pkg)]),
    }
    mods = local_modules(fake_modules, [str(tmp_path / "src")])
    assert [m.name for m in mods] == ["shipped_mod", "shipped_pkg"]
    mods += [m for m in local_modules() if m.name == "dask_vastai"]
    with dask.config.set({"array.chunk-size": "77MiB", "vastai.api-key": "never-shipped"}):
        config = non_default_config()
    assert config["array"]["chunk-size"] == "77MiB" and "vastai" not in config
    one = build_shipment(mods, config)
    assert one.digest == build_shipment(mods, config).digest, "same inputs, same archive"
    names = tarfile.open(fileobj=__import__("io").BytesIO(one.archive)).getnames()
    assert "site/shipped_mod.py" in names and "site/dask_vastai/environment/__init__.py" in names
    assert "dask-config/client.yaml" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert "site/shipped_pkg/__init__.py" in names and "site/shipped_pkg/.env" not in names
    plain = gzip.decompress(one.archive)
    assert b"never-shipped" not in plain and b"never-leaves" not in plain and b"77MiB" in plain

    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(one.archive)
    folder = tmp_path / "ship" / "x"
    folder.parent.mkdir()
    out = subprocess.run(["sh", "-c", unpack_command(sys.executable, str(archive), str(folder))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not archive.exists()
    env = {**os.environ, **{k: v.replace(one.folder, str(folder)) for k, v in one.env().items()}}
    check = "import shipped_mod, dask; print(shipped_mod.f(1), dask.config.get('array.chunk-size'))"
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert run.stdout.split() == ["1001", "77MiB"], run.stderr


# ------------------------------------------------------------------ onstart and the probe
def _bootstrap(**kw) -> BootstrapConfig:
    key = ClusterKey.generate(comment="dask-vastai-env")
    return BootstrapConfig(cluster_name="env", public_key=key.public_openssh, api_url="https://console.vast.ai",
                           orphan_timeout_s=600, **kw)


def test_python_version_makes_the_onstart_install_it_with_uv():
    script = onstart_script(_bootstrap(python_version=MINOR))
    assert f'"$U" python install {MINOR}' in script
    # The onstart names its state folder once ($D) to stay under Vast's length limit.
    assert f"D={STATE_DIR};" in script and PYTHON_VENV == f"{STATE_DIR}/venv"
    assert f'"$U" venv --allow-existing --python {MINOR} $D/venv' in script
    assert "https://astral.sh/uv/install.sh" in script
    assert script.index("authorized_keys") < script.index("python install"), "SSH works while uv runs"
    assert script.index("python install") < script.index(f"for c in {PYTHON_VENV}/bin/python "), (
        "the venv's interpreter is tried first, once uv made it"
    )
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    assert len(script) < ONSTART_MAX_CHARS
    assert "uv" not in onstart_script(_bootstrap()), "no uv step when the image's Python is used"
    with pytest.raises(ValueError, match="not a version"):
        onstart_script(_bootstrap(python_version="3.x"))


def test_onstart_stays_under_vasts_limit_with_two_hundred_packages(emulator):
    from dask_vastai import VastAICluster

    packages = [f"package-number-{i}>=1.{i}" for i in range(200)]
    with VastAICluster(api_url=emulator.url, api_key=emulator.api_key, quiet=True, packages=packages,
                       pip_args=["--extra-index-url", "https://download.pytorch.org/whl/cu121"],
                       python=MINOR) as cluster:
        script = cluster.onstart_script()
        assert len(script) < ONSTART_MAX_CHARS
        assert "uv" in script and "package-number-7" not in script  # packages travel over SSH
        assert cluster.environment.client.packages == tuple(packages)
        assert "package-number-199" in cluster.environment.client.probe_names()


def test_probe_reports_extra_packages_and_the_test_hooks_versions(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "python").write_text(sys.executable)
    cmd = probe_command(str(state), packages=["pyyaml"], fake_versions={"python": "3.9.1", "distributed": "1.0"})
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["python"] == "3.9.1" and data["versions"]["distributed"] == "1.0"
    assert data["versions"]["pyyaml"] and data["versions"]["dask"] == dask.__version__
    assert data["dask_vastai_importable"] is True


def test_probe_waits_for_the_onstarts_python_install(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "python-pending").touch()
    t0 = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", probe_command(str(state), wait_s=30)], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert proc.poll() is None, "the probe must wait while the interpreter is being installed"
    (state / "python").write_text(sys.executable)
    (state / "python-pending").unlink()
    out, _ = proc.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1])["executable"] == sys.executable
    assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------ the scheduler's gate
async def _worker_against(scheduler_address: str, tmp_path: Path, name: str, fake: dict[str, str] | None):
    env = {k: v for k, v in os.environ.items() if k != WORKER_VERSIONS_ENV}
    if fake:  # the hook's environment, as the incarnation carries it to a worker on an instance
        with dask.config.set({"vastai.testing.worker-versions": fake}):
            env.update(worker_env())
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "distributed.cli.dask_worker", scheduler_address, "--name", name, "--nanny",
        "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--preload", "dask_vastai._testing",
        "--local-directory", str(tmp_path / name), env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_version_gate_refuses_a_worker_with_other_versions_and_admits_a_matched_one(tmp_path: Path):
    from distributed import Scheduler

    async def main() -> None:
        env = InstanceEnvironment(_client())
        async with Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0", plugins=[env.gate]) as s:
            bad = await _worker_against(s.address, tmp_path, "bad", {"distributed": "2020.1.0"})
            good = await _worker_against(s.address, tmp_path, "good", None)
            try:
                deadline = time.monotonic() + 60
                while ("bad" not in env.refused or "good" not in {w.name for w in s.workers.values()}):
                    assert time.monotonic() < deadline, f"refused={env.refused}, workers={list(s.workers)}"
                    await asyncio.sleep(0.1)
                reason = env.refusal(["bad"])
                assert reason and "2020.1.0" in reason and f"client {_client().versions['distributed']}" in reason
                assert env.refusal(["good"]) is None
                # the refused worker leaves with its nanny, and nothing restarts it
                assert await asyncio.wait_for(bad.wait(), 30) == 0
                assert {w.name for w in s.workers.values()} == {"good"}
            finally:
                for p in (bad, good):
                    if p.returncode is None:
                        p.terminate()
                        await asyncio.wait_for(p.wait(), 30)

    asyncio.run(main())



def test_supervisor_puts_the_shipped_folder_before_the_images_pythonpath(tmp_path: Path, monkeypatch):
    """The worker's interpreter (a stand-in that records its environment) sees ours first."""
    from dask_vastai.bootstrap import Incarnation, incarnation_payload
    from dask_vastai.supervisor import Supervisor

    record = tmp_path / "env.json"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, os\njson.dump(dict(os.environ), open({str(record)!r}, 'w'))\n"
    )
    fake_python.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", "/image/site")
    inc = Incarnation(
        worker_name="w", scheduler_address="tls://127.0.0.1:1", worker_port=2, nanny_port=3, nthreads=1,
        memory_limit=2**30, resources={}, env={"PYTHONPATH": "/root/.dask-vastai/ship/x/site", "TOKEN": "t0k"},
        tls_ca="ca", tls_cert="cert", tls_key="key", death_timeout_s=5, python=str(fake_python),
    )
    lines: list[str] = []
    sup = Supervisor("http://127.0.0.1:9", 60, str(tmp_path / "hb"), str(tmp_path), lambda m, who="s": lines.append(m))
    proc = sup.start("w", incarnation_payload(inc))
    assert proc is not None and proc.wait(timeout=30) == 0
    env = json.loads(record.read_text())
    assert env["PYTHONPATH"] == "/root/.dask-vastai/ship/x/site:/image/site"
    assert env["TOKEN"] == "t0k"
    assert not any("t0k" in line for line in lines), "the supervisor logs env names, never values"


def test_tasks_from_a_module_imported_after_the_boot_are_warned_about(tmp_path: Path, caplog):
    from distributed import Client, Scheduler

    (tmp_path / "late_env_mod.py").write_text("def f(x):\n    return x + 1\n")

    async def main() -> None:
        env = InstanceEnvironment(_client())
        env.shipped_everywhere = frozenset({"dask_vastai"})  # what the instances got at boot
        async with Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0", plugins=env.scheduler_plugins) as s:
            async with Client(s.address, asynchronous=True) as client:
                sys.path.insert(0, str(tmp_path))
                try:
                    import late_env_mod

                    futures = [
                        client.submit(late_env_mod.f, 1),
                        client.submit(len, [1, 2]),  # a builtin: nothing to say
                        client.submit(late_env_mod.f, 2),  # said once per module
                    ]
                    deadline = time.monotonic() + 10
                    while len(s.tasks) < len(futures):
                        assert time.monotonic() < deadline, f"the scheduler got {len(s.tasks)} of 3 tasks"
                        await asyncio.sleep(0.05)
                finally:
                    sys.path.remove(str(tmp_path))
                    sys.modules.pop("late_env_mod", None)

    with caplog.at_level("WARNING", logger="dask_vastai.environment"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "dask_vastai.environment"]
    assert len(said) == 1, said
    assert "late_env_mod was imported after the instances booted" in said[0]
    assert f"client.upload_file('{tmp_path / 'late_env_mod.py'}')" in said[0]
