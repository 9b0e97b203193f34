"""Attach mode never sends credentials over an unencrypted scheduler address.

A job carries its environment (snakemake's ``envvars``, the storage plugins' secrets) to the
scheduler and a worker; over ``tcp://`` anyone on the path reads them, so the executor refuses
before the first job is submitted, naming what would have travelled (never its value).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_vastaidask.backend import refuse_credentials_in_clear

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "10.0.0.5:8786", "ws://h:1"])
def test_credentials_are_refused_over_an_unencrypted_address(address: str) -> None:
    with pytest.raises(WorkflowError, match="tls://") as refused:
        refuse_credentials_in_clear(address, storage_mode=True, env_names=[])
    assert "storage provider" in str(refused.value)
    with pytest.raises(WorkflowError, match="HF_TOKEN"):
        refuse_credentials_in_clear(address, storage_mode=False, env_names=["HF_TOKEN"])
    refuse_credentials_in_clear(address, storage_mode=False, env_names=[])  # nothing secret: allowed


def test_tls_carries_credentials() -> None:
    refuse_credentials_in_clear("tls://10.0.0.5:8786", storage_mode=True, env_names=["HF_TOKEN"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_workflow_with_envvars_is_refused_over_tcp_before_any_job(tmp_path: Path) -> None:
    from distributed import LocalCluster

    (tmp_path / "Snakefile").write_text(
        'envvars:\n    "MY_SERVICE_TOKEN"\n\n'
        'rule a:\n    output: "a.txt"\n    resources: gpu=1\n    shell: "echo $MY_SERVICE_TOKEN > {output}"\n'
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), MY_SERVICE_TOKEN="token-value-never-sent-0417")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                      resources={"GPU": 1, "CPU": 1, "MEMORY": 1e9}) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        run = subprocess.run(
            [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
             "--vastaidask-scheduler-address", cluster.scheduler_address,
             "--vastaidask-worker-cache-dir", str(tmp_path / "cache")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
        )
        assert run.returncode != 0
        assert "MY_SERVICE_TOKEN" in run.stderr and "tls://" in run.stderr, run.stderr[-3000:]
        # Snakemake prints a WorkflowError as its sentence, without a traceback
        assert "WorkflowError:" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert "token-value-never-sent-0417" not in run.stderr + run.stdout
        assert not cluster.scheduler.tasks, "no job reached the scheduler"
    assert not (tmp_path / "a.txt").exists()


def test_an_api_key_given_as_a_flag_warns_and_one_from_the_environment_does_not(emulator, caplog,
                                                                                monkeypatch) -> None:
    from snakemake_executor_plugin_vastaidask.backend import DaskBackend
    from snakemake_executor_plugin_vastaidask.settings import ExecutorSettings

    settings = ExecutorSettings(api_url=emulator.url, api_key=emulator.api_key, max_instances=1)
    for from_env in (False, True):
        if from_env:  # snakemake fills the setting from the variable
            monkeypatch.setenv("SNAKEMAKE_VASTAIDASK_API_KEY", emulator.api_key)
        caplog.clear()
        with caplog.at_level("WARNING", logger="snakemake_executor_plugin_vastaidask"):
            DaskBackend(settings, run_name=f"smk-key-{from_env}").close()
        warned = [r.getMessage() for r in caplog.records if "--vastaidask-api-key" in r.getMessage()]
        assert bool(warned) is not from_env, warned
        assert not any(emulator.api_key in r.getMessage() for r in caplog.records)
