"""Only what a task needs is shipped: an allow-listed dask config, Python files and declared data.

The archive is what an instance receives (``build_shipment``); these tests open it. The e2e
tests (``test_trust_boundary_e2e.py``) look for the same things on a running instance.
"""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
import types
from pathlib import Path

import dask
import pytest

from dask_vastai.environment.shipping import (
    build_shipment,
    local_modules,
    looks_secret,
    shipped_config,
)


def test_the_config_allow_list_ships_worker_settings_and_never_credentials() -> None:
    with dask.config.set({
        "coiled.token": "COILED-TOKEN",
        "gateway.auth.kwargs.password": "GATEWAY-PASSWORD",
        "distributed.nanny.environ.HF_TOKEN": "HF-IN-CONFIG",
        "distributed.nanny.environ.OMP_NUM_THREADS": 2,
        "distributed.worker.memory.spill": 0.61,
        "distributed.comm.timeouts.connect": "61s",
        "distributed.comm.tls.client.key": "/home/me/client.key",
        "distributed.scheduler.worker-saturation": 2.5,
        "dataframe.parquet.storage-url": "s3://me:PASS-IN-URL@bucket/x",
        "temporary-directory": "/home/me/tmp",
        "vastai.api-key": "VAST-KEY",
    }):
        shipped, left_out = shipped_config()
    assert shipped["distributed"]["worker"]["memory"]["spill"] == 0.61
    assert shipped["distributed"]["comm"]["timeouts"]["connect"] == "61s"
    assert shipped["distributed"]["nanny"]["environ"] == {"OMP_NUM_THREADS": 2}
    text = repr(shipped)
    for secret in ("COILED-TOKEN", "GATEWAY-PASSWORD", "HF-IN-CONFIG", "PASS-IN-URL", "VAST-KEY", "client.key",
                   "/home/me/tmp"):
        assert secret not in text
    assert "worker-saturation" not in text, "the scheduler runs here: its settings act here"
    assert {"coiled", "gateway", "distributed.scheduler", "distributed.comm.tls", "temporary-directory",
            "distributed.nanny.environ.HF_TOKEN (looks like a credential)"} <= set(left_out)
    assert not any("vastai" in k for k in left_out), "our section is never even considered"


@pytest.mark.parametrize("name, secret", [
    ("HF_TOKEN", True), ("WANDB_API_KEY", True), ("password", True), ("aws-secret-access-key", True),
    ("tokenize", False), ("chunk-size", False), ("worker-saturation", False), ("OMP_NUM_THREADS", False),
])
def test_what_looks_like_a_credential(name: str, secret: bool) -> None:
    assert looks_secret(name) is secret


def _project(tmp_path: Path) -> Path:
    """A script's folder: a package with declared data, undeclared files, and credentials beside it."""
    root = tmp_path / "project"
    pkg = root / "trustpkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "sub").mkdir()
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "data" / "table.json").write_text('{"declared": true}')
    (pkg / "sub" / "notes.txt").write_text("declared in MANIFEST.in")
    (pkg / "sub" / "scratch.txt.bak").write_text("not declared")
    (pkg / "credentials.json").write_text('{"token": "CREDENTIALS-IN-PACKAGE"}')
    (root / "credentials.json").write_text('{"token": "CREDENTIALS-BESIDE-PACKAGE"}')
    (root / "pyproject.toml").write_text('[tool.setuptools.package-data]\ntrustpkg = ["data/*.json"]\n')
    (root / "MANIFEST.in").write_text("recursive-include trustpkg/sub *.txt\n")
    return root


def test_a_package_travels_as_python_files_and_declared_data(tmp_path: Path, caplog) -> None:
    root = _project(tmp_path)
    pkg = root / "trustpkg"
    modules = local_modules({"trustpkg": types.SimpleNamespace(__file__=str(pkg / "__init__.py"),
                                                               __path__=[str(pkg)])}, [str(root)])
    assert [m.name for m in modules] == ["trustpkg"]
    with caplog.at_level(logging.WARNING, logger="dask_vastai.environment"):
        shipment = build_shipment(modules, {})
    names = set(tarfile.open(fileobj=io.BytesIO(shipment.archive)).getnames())
    assert names == {"site/trustpkg/__init__.py", "site/trustpkg/sub/__init__.py",
                     "site/trustpkg/data/table.json", "site/trustpkg/sub/notes.txt"}
    plain = gzip.decompress(shipment.archive)
    assert b"CREDENTIALS-IN-PACKAGE" not in plain and b"CREDENTIALS-BESIDE-PACKAGE" not in plain
    assert shipment.left_behind == ("trustpkg/credentials.json", "trustpkg/sub/scratch.txt.bak")
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "trustpkg/credentials.json" in warning and "package-data" in warning


def test_without_a_project_only_python_files_travel(tmp_path: Path) -> None:
    pkg = tmp_path / "loose"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.onnx").write_bytes(b"\0" * 10)
    modules = local_modules({"loose": types.SimpleNamespace(__file__=str(pkg / "__init__.py"),
                                                            __path__=[str(pkg)])}, [str(tmp_path)])
    shipment = build_shipment(modules, {})
    assert tarfile.open(fileobj=io.BytesIO(shipment.archive)).getnames() == ["site/loose/__init__.py"]
    assert shipment.left_behind == ("loose/model.onnx",)


def test_dask_vastai_itself_ships_with_its_declared_data() -> None:
    """A development checkout reaches an instance with vastai.yaml, which its config loads at import."""
    shipment = build_shipment([m for m in local_modules(include=["dask_vastai"]) if m.name == "dask_vastai"], {})
    names = tarfile.open(fileobj=io.BytesIO(shipment.archive)).getnames()
    assert "site/dask_vastai/vastai.yaml" in names and "site/dask_vastai/config.py" in names
