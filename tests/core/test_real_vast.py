"""The user story on the real Vast.ai, opt-in; the same module against the emulator in CI.

How a user with an account verifies a release (it costs a few cents at most)::

    VAST_API_KEY=<key> DASK_VASTAI_REAL=1 pytest -m real_vast -s tests/core/test_real_vast.py

It rents the cheapest matching offer (any GPU, at most ``$0.40/h``) for about a minute, runs
GPU tasks on it, then one Snakemake job (a second short rental), checks that nothing is left
billing, prints what it cost (well under $0.10), and writes every distinct shape of Vast's
answers it saw into ``vast-api-shapes-<time>.jsonl`` in the current folder, with
``instance_api_key``, e-mail, balance, IP addresses and SSH keys redacted: attach that file
to a bug report. It is also where only the real service can answer what the emulator plays
as variants (bulk answers, remote forwards through Vast's proxy, boot times).

Without those two variables the real case is skipped and the same test runs against the
emulator's strict profile, only the endpoint differing, so that it cannot rot.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.config
import pytest

REPO = Path(__file__).resolve().parents[2]
REAL = bool(os.environ.get("VAST_API_KEY", "").strip()) and os.environ.get("DASK_VASTAI_REAL") == "1"
#: at most this per hour for each rental: with boot and close, a run stays well under $0.10
MAX_PRICE = 0.40

SNAKEFILE = textwrap.dedent(
    """
    rule gpu:
        output:
            "gpu.txt",
        resources:
            gpu=1,
        shell:
            "nvidia-smi --query-gpu=name --format=csv,noheader > {output}"
    """
)


@dataclass(frozen=True)
class Endpoint:
    """Where the story runs: the real Vast or the emulator (``emu``), and where answers are recorded."""

    name: str
    url: str
    key: str
    report: Path
    boot_timeout_s: int
    emu: object | None = None


@pytest.fixture(params=[
    pytest.param("emulator", marks=pytest.mark.sandbox),
    pytest.param("vast", marks=[pytest.mark.real_vast, pytest.mark.skipif(
        not REAL, reason="the real Vast only with VAST_API_KEY and DASK_VASTAI_REAL=1 (it rents, for cents)")]),
])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Endpoint]:
    if request.param == "vast":
        report = Path.cwd() / f"vast-api-shapes-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        yield Endpoint("vast", "https://console.vast.ai", os.environ["VAST_API_KEY"].strip(), report, 900)
        return
    request.getfixturevalue("sandbox")  # skips, loudly, where sandboxes cannot run
    from dask_vastai.emulator import Emulator

    with Emulator(runtime="sandbox", boot_delay_s=0.5, rate_limits=True, state_dir=tmp_path / "emu",
                  profile="strict") as emu:
        yield Endpoint("emulator", emu.url, emu.api_key, tmp_path / "vast-api-shapes.jsonl", 240, emu)


async def _balance(url: str, key: str) -> float:
    from dask_vastai.vast import VastAPI

    async with VastAPI(api_key=key, api_url=url) as api:
        return float((await api.current_user()).get("balance") or 0.0)


async def _billing(url: str, key: str, prefix: str) -> list[str]:
    """Rentals under ``prefix`` that are not being torn down: what still bills."""
    from dask_vastai.vast import VastAPI, looks_torn_down

    async with VastAPI(api_key=key, api_url=url) as api:
        rows = await api.list_instances(label_prefix=prefix)
    return [f"{r.id} ({r.label}, {r.actual_status})" for r in rows if not looks_torn_down(r)]


def test_the_user_story_and_a_snakemake_job_leave_nothing_billing(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    def gpu_name() -> str:  # defined here: pickled by value
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()

    run_id = secrets.token_hex(3)
    story = f"rv{run_id}"
    report = endpoint.report
    monkeypatch.setenv("DASK_VASTAI__API__RECORD_RESPONSES", str(report))  # the Snakemake process too
    before = asyncio.run(_balance(endpoint.url, endpoint.key))
    with dask.config.set({"vastai.api.record-responses": str(report)}):
        with VastAICluster(n=1, max_price=MAX_PRICE, api_url=endpoint.url, api_key=endpoint.key, name=story,
                           boot_timeout=endpoint.boot_timeout_s, quiet=True) as cluster, Client(cluster) as client:
            rented = cluster.instances[0]["gpu"]
            assert client.submit(gpu_name, resources={"GPU": 1}, pure=False).result(), "a GPU in nvidia-smi"
            squares = client.gather(client.map(lambda x: x * x, range(16), resources={"GPU": 1}))
            assert squares == [x * x for x in range(16)]
            log = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        story_cost = cluster.cost
        # what only the real service can tell: the SSH path taken and the boot time
        boot = [line for line in str(log).splitlines() if "SSH to instance" in line or "registered" in line]
        assert any("SSH to instance" in line for line in boot), log

        wf = tmp_path / "wf"
        wf.mkdir()
        (wf / "Snakefile").write_text(SNAKEFILE)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        snakemake = subprocess.run(
            [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
             "--vastaidask-api-url", endpoint.url, "--vastaidask-api-key", endpoint.key,
             "--vastaidask-max-instances", "1", "--vastaidask-max-price", str(MAX_PRICE),
             "--vastaidask-boot-timeout", str(endpoint.boot_timeout_s)],
            cwd=wf, env=env, capture_output=True, text=True, timeout=endpoint.boot_timeout_s + 600,
        )
        assert snakemake.returncode == 0, snakemake.stderr[-4000:]
        assert (wf / "gpu.txt").read_text().strip(), "the job ran where nvidia-smi shows a GPU"

        # Nothing bills any more (rows being torn down may linger a while).
        deadline = time.monotonic() + 60
        while (left := asyncio.run(_billing(endpoint.url, endpoint.key, "dask-vastai:"))) and time.monotonic() < deadline:
            time.sleep(5)
        assert left == [], f"still billing: {left}; run `dask-vastai cleanup`"
    after = asyncio.run(_balance(endpoint.url, endpoint.key))
    spent = before - after  # Vast's balance may trail the meter by a while: cluster.cost is exact
    print(f"\n[{endpoint.name}] rented {rented}; " + "; ".join(boot))
    print(f"[{endpoint.name}] the user story cost ${story_cost:.4f} (cluster.cost), both rentals ${spent:.4f} "
          f"by the account's balance; every answer's shape is in {report}")
    assert story_cost < 0.10 and spent < 0.10

    # The report a user attaches: every shape, nothing personal.
    entries = [json.loads(line) for line in report.read_text().splitlines()]
    seen = {(e["method"], e["path"]) for e in entries}
    for call in [("GET", "/users/current/"), ("POST", "/bundles/"), ("GET", "/api/v1/instances/")]:
        assert call in seen, (call, sorted(seen))
    assert any(path.startswith("/asks/") for _, path in seen), "a create's answer"
    text = report.read_text()
    assert endpoint.key not in text
    assert not re.search(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", text), "no IP address"
    assert not re.search(r"ssh-ed25519 [A-Za-z0-9+/]{20,}", text), "no SSH key"
    for entry in entries:
        example = json.dumps(entry["example"])
        for field in ("instance_api_key", "email", "balance"):
            assert not re.search(rf'"{field}": (?!"<redacted>")[^,}}]+', example), (field, example[:300])

