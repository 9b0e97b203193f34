"""``snakemake --executor vastaidask`` renting from the emulator: real sandboxes, rate limits on.

The sandboxes cannot see this checkout (nor the workdir), so the job function travels by
value and every file moves through the staging; snakemake itself is importable there
(same interpreter, site-packages visible), as it would be after the environment sync.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.checkout import EXAMPLE, checkout_env
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


@pytest.fixture(autouse=True)
def no_lingering_rows(market) -> None:
    """Strict, but destroyed rows do not linger: these tests assert they are gone once snakemake exits."""
    market.variants.set(destroy_linger_s=0)


def _args(emu, *extra: str, max_instances: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "4",
        "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
        "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", str(max_instances),
        "--vastaidask-boot-timeout", "240", *extra,
    ]


def test_example_pipeline_on_rented_instances(market, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    shutil.copytree(EXAMPLE, wd)
    run = subprocess.run(_args(market, "--config", "samples=6"), cwd=wd, env=checkout_env(), capture_output=True,
                         text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-5000:]
    assert (wd / "results" / "summary.txt").read_text().count("evaluated") == 6
    assert "RTX 3090" in (wd / "train" / "0.txt").read_text(), "the job ran on a rented GPU"
    rentals = market.meter()["instances"]
    assert 1 <= len(rentals) <= 2 < 6, "fewer instances than GPU jobs: instances are reused"
    assert market.instances() == [], "0 rentals remain"
    shared = hashlib.sha256((wd / "prepared" / "shared.bin").read_bytes()).hexdigest()
    lines = [json.loads(x) for x in (wd / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    per_worker = Counter(t["worker_name"] for t in lines for sha, _ in t["fetched"] if sha == shared)
    assert all(n <= 1 for n in per_worker.values()), per_worker
    again = subprocess.run(_args(market, "--config", "samples=6"), cwd=wd, env=checkout_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert market.instances() == []


def test_sigint_mid_run_leaves_no_rental(market, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    shutil.copytree(EXAMPLE, wd)
    proc = subprocess.Popen(_args(market, "--config", "samples=4", "seconds=120"), cwd=wd, env=checkout_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        eventually(lambda: (wd / "prepared" / "shared.bin").exists(), 240, interval_s=0.5)
        assert (wd / "prepared" / "shared.bin").exists(), "the first job never finished"
        time.sleep(5)  # GPU jobs running on the instances
        assert market.instances(), "instances should be rented mid-run"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    eventually(lambda: not market.instances(), 60, interval_s=0.5)
    assert market.instances() == []
    assert not (wd / "train" / "0.txt").exists(), "cancelled jobs report no outputs"


def test_sigkill_mid_run_leaves_it_to_the_watchdog(market, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    shutil.copytree(EXAMPLE, wd)
    proc = subprocess.Popen(
        _args(market, "--vastaidask-orphan-timeout", "8", "--config", "samples=2", "seconds=120"),
        cwd=wd, env=checkout_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: (wd / "prepared" / "shared.bin").exists(), 240, interval_s=0.5)
        assert market.instances(), "instances should be rented mid-run"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    eventually(lambda: not market.instances(), 120, interval_s=1)
    assert market.instances() == [], "the on-instance watchdog destroys what a SIGKILLed run left"


_TWO_SHAPES = """
rule all:
    input: "a3090.txt", "b4090.txt"

rule a:
    output: "a3090.txt"
    resources: gpu=1
    shell: "nvidia-smi --query-gpu=name --format=csv,noheader > {output}"

rule b:
    output: "b4090.txt"
    resources: gpu=1, gpu_model="RTX_4090"
    shell: "nvidia-smi --query-gpu=name --format=csv,noheader > {output}"
"""


def test_rule_gpu_model_gets_its_own_pool(market, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(_TWO_SHAPES)
    run = subprocess.run(_args(market), cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "RTX 3090" in (tmp_path / "a3090.txt").read_text()
    assert "RTX 4090" in (tmp_path / "b4090.txt").read_text()
    assert market.instances() == []


def test_job_no_pool_can_run_fails_clearly_and_rents_nothing(market, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(
        'rule big:\n    output: "x"\n    resources: gpu=1, gpu_model="RTX_9999"\n    shell: "touch {output}"\n'
    )
    run = subprocess.run(_args(market), cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode != 0
    assert "RTX_9999" in run.stderr, run.stderr[-3000:]
    assert market.meter()["instances"] == [], "nothing rented for a job no pool can run"


def test_multi_gpu_job_gets_an_instance_with_that_many_gpus(market, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(
        'rule two:\n    output: "gpus.txt"\n    resources: gpu=2\n'
        '    shell: "nvidia-smi --query-gpu=name --format=csv,noheader > {output}"\n'
    )
    run = subprocess.run(_args(market), cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-5000:]
    assert len((tmp_path / "gpus.txt").read_text().splitlines()) == 2
    assert market.instances() == []
