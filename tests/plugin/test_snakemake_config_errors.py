"""A Snakemake user's configuration mistakes, answered in a sentence that names the flag.

Each test runs ``snakemake --executor vastaidask`` as a user would, against the emulator's
control plane (records only: no instance boots, none is needed to fail configuration).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator
from tests.helpers.checkout import REPO

_SNAKEFILE = 'rule a:\n    output: "a.txt"\n    resources: gpu=1\n    shell: "echo hi > {output}"\n'


def snakemake(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "Snakefile").write_text(_SNAKEFILE)
    home = tmp_path / "home"  # no vastai key file of the machine's user
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "SNAKEMAKE_VASTAIDASK_", "DASK_VASTAI"))}
    base.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1", *args],
        cwd=tmp_path, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


def _error_text(run: subprocess.CompletedProcess[str]) -> str:
    """What follows Snakemake's ``WorkflowError:`` line: the sentence the user reads."""
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "Traceback" not in text, text[-4000:]
    assert "WorkflowError:" in text, text[-4000:]
    return text.split("WorkflowError:", 1)[1].strip()


def test_no_api_key_names_the_flag_and_the_variable(tmp_path: Path) -> None:
    message = _error_text(snakemake(tmp_path))
    first = message.splitlines()[0]
    assert "--vastaidask-api-key" in first and "SNAKEMAKE_VASTAIDASK_API_KEY" in first, message
    assert "api_key=" not in message, "a Snakemake user passes flags, not Python arguments"
    # one sentence: the message line, then at most Snakemake's one-line location of the raise
    assert len(message.splitlines()) <= 2, message


@pytest.fixture
def emu() -> Emulator:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0) as emu:
        yield emu


def test_a_rejected_key_names_the_flag(emu: Emulator, tmp_path: Path) -> None:
    message = _error_text(snakemake(tmp_path, "--vastaidask-api-url", emu.url,
                                    env={"SNAKEMAKE_VASTAIDASK_API_KEY": "wrong-key-123456"}))
    assert "--vastaidask-api-key" in message and "SNAKEMAKE_VASTAIDASK_API_KEY" in message, message
    assert "wrong-key-123456" not in message, "the key itself is never printed"


def test_an_emulator_key_sent_to_vast_says_how_to_point_at_the_emulator(tmp_path: Path) -> None:
    message = _error_text(snakemake(tmp_path, env={"SNAKEMAKE_VASTAIDASK_API_KEY": "emu-00112233445566778899"}))
    assert "export DASK_VASTAI__API_URL=" in message and "--vastaidask-api-url" in message, message
    assert "00112233445566778899" not in message


def test_an_unknown_gpu_names_the_flag_and_close_names(emu: Emulator, tmp_path: Path) -> None:
    message = _error_text(snakemake(tmp_path, "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
                                    "--vastaidask-gpu", "RTX_3099"))
    assert "--vastaidask-gpu='RTX_3099'" in message, message
    assert "RTX_3090" in message, "close names are offered"
    assert "gpu=" not in message.replace("--vastaidask-gpu=", ""), message


def test_no_matching_offer_fails_at_start_naming_flags_and_verbose_brings_dask_logs_back(
    emu: Emulator, tmp_path: Path
) -> None:
    args = ("--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
            "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-price", "0.001")
    run = snakemake(tmp_path, *args)
    message = _error_text(run)
    assert "--vastaidask-gpu=RTX_3090 --vastaidask-max-price=0.001" in message, message
    assert "dask-vastai offers" in message
    assert emu.instances() == [] and not (tmp_path / "a.txt").exists()
    # The scheduler started in this run; its INFO lines stay out of a default run ...
    assert " - distributed." not in run.stderr, run.stderr[-3000:]
    assert run.stdout.strip() == "", "nothing printed beside Snakemake's logger"
    # ... and come back with --verbose.
    verbose = snakemake(tmp_path, *args, "--verbose")
    assert verbose.returncode != 0
    assert "distributed.scheduler - INFO" in verbose.stderr, verbose.stderr[-3000:]


def test_reliability_and_order_reach_the_offer_search(emu: Emulator, tmp_path: Path) -> None:
    # max-price that nothing matches: the run stops after the first search, which is the one checked.
    snakemake(tmp_path, "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
              "--vastaidask-reliability", "0.9", "--vastaidask-order", "dlperf_usd-",
              "--vastaidask-max-price", "0.001")
    searches = [r["body"] for r in emu.requests if r["endpoint"] == "search"]
    assert searches, emu.requests
    assert float(searches[0]["reliability"]["gte"]) == 0.9, searches[0]
    # dlperf_per_dphtotal: the field the SDK sends for dlperf_usd
    assert searches[0]["order"] == [["dlperf_per_dphtotal", "desc"]], searches[0]


def test_a_workflow_profile_sets_the_flags(emu: Emulator, tmp_path: Path) -> None:
    """The README's profile: its keys are the flags (a max-price nothing matches shows they arrived)."""
    profile = tmp_path / "profiles" / "vastai"
    profile.mkdir(parents=True)
    (profile / "config.yaml").write_text(
        f"executor: vastaidask\njobs: 8\nvastaidask-api-url: {emu.url}\nvastaidask-api-key: {emu.api_key}\n"
        "vastaidask-gpu: RTX_3090\nvastaidask-max-price: 0.001\nvastaidask-region: EU\n"
    )
    message = _error_text(snakemake(tmp_path, "--workflow-profile", "profiles/vastai"))
    assert "--vastaidask-gpu=RTX_3090 --vastaidask-max-price=0.001 --vastaidask-region=EU" in message, message
