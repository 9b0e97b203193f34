"""``vastaidask`` in bucket mode (``--default-storage-provider s3``) against moto's S3 server.

Jobs read and write the bucket themselves (sources deployed from it with --deploy-sources);
nothing but logs travels over Dask, and the source archive is removed at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.checkout import REPO

pytest.importorskip("snakemake_storage_plugin_s3")
boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.slow

SNAKEFILE = """
rule all:
    input: "b.txt"
rule a:
    output: "a.txt"
    shell: "echo a > {output}"
rule b:
    input: "a.txt"
    output: "b.txt"
    resources: gpu=1
    shell: "cat {input} > {output}; echo b >> {output}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(tmp_path: Path):
    if not any(Path(p, "moto_server").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("moto_server (pip install 'moto[server]') is not installed")
    port = _free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="smk")
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)
    yield url, client
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def dask_pool(tmp_path: Path):
    """A TLS scheduler (the plugin refuses to send storage credentials over tcp://), and the
    dask config (as environment) that lets snakemake's client in."""
    from distributed import LocalCluster
    from distributed.security import Security

    security = Security.temporary()
    files = {}
    for name, pem in (("CA_FILE", security.tls_ca_file), ("CLIENT__CERT", security.tls_client_cert),
                      ("CLIENT__KEY", security.tls_client_key)):
        path = tmp_path / f"{name.lower()}.pem"
        path.write_text(pem)
        path.chmod(0o600)
        files[f"DASK_DISTRIBUTED__COMM__TLS__{name}"] = str(path)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0",
                      resources={"GPU": 1, "CPU": 2, "MEMORY": 8e9}, security=security) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        yield cluster.scheduler_address, files


def test_bucket_mode_reads_and_writes_the_bucket(s3, dask_pool: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, client = s3
    dask_pool, tls_env = dask_pool
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    env = dict(os.environ, PYTHONPATH=str(REPO), **tls_env)
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2",
         "--vastaidask-scheduler-address", dask_pool, "--vastaidask-worker-cache-dir", str(tmp_path / "cache"),
         "--default-storage-provider", "s3", "--default-storage-prefix", "s3://smk/wf",
         "--storage-s3-endpoint-url", url, "--storage-s3-access-key", "x", "--storage-s3-secret-key", "y"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="smk").get("Contents", []))
    assert keys == ["wf/a.txt", "wf/b.txt"], keys  # outputs there, the source archive cleaned up
    body = client.get_object(Bucket="smk", Key="wf/b.txt")["Body"].read()
    assert body == b"a\nb\n"
