"""What a Snakemake user reads about jobs: where their logs are, and what a failure says.

Runs ``snakemake --executor vastaidask`` against a ``LocalCluster`` (attach mode): the jobs
run as on a rented instance (``python -m snakemake --mode remote`` in a scratch directory of
the worker, sources from the shipped archive), without renting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastaidask.joblog import MAX_NAME_CHARS, job_output
from tests.helpers.checkout import EXAMPLE, checkout_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dask_pool() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
        resources={"GPU": 2, "CPU": 2, "MEMORY": 8e9},
    ) as cluster:
        yield cluster.scheduler_address


def snakemake(workdir: Path, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2",
         "--vastaidask-scheduler-address", address,
         "--vastaidask-worker-cache-dir", str(workdir.parent / "cache"), *args],
        cwd=workdir, env=checkout_env(), capture_output=True, text=True, timeout=180,
    )


_WILDCARDS = """
rule all:
    input: "out/a b.txt", "out/x/y.txt", "plain.txt"

rule work:
    output: "out/{name}.txt"
    resources: gpu=1
    shell: "echo working on {wildcards.name}; echo done > '{output}'"

rule plain:
    output: "plain.txt"
    resources: gpu=1
    shell: "echo plain rule; echo done > {output}"
"""


def test_logs_are_named_by_rule_and_wildcards_and_verbose_prints_each_path(dask_pool: str, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "Snakefile").write_text(_WILDCARDS)
    run = snakemake(wd, dask_pool, "--verbose")
    assert run.returncode == 0, run.stderr[-4000:]
    logs = wd / ".snakemake" / "vastaidask" / "logs"
    # A wildcard value with a space or a slash stays one readable, distinct file name.
    expected = {
        logs / "work" / "name=a%20b.log": "working on a b",
        logs / "work" / "name=x%2Fy.log": "working on x/y",
    }
    plain = list((logs / "plain").glob("*.log"))
    assert len(plain) == 1 and re.fullmatch(r"\d+\.log", plain[0].name), plain
    expected[plain[0]] = "plain rule"
    for path, text in expected.items():
        assert path.exists(), sorted(str(p.relative_to(logs)) for p in logs.rglob("*.log"))
        assert text in path.read_text(), "the log holds the job's own output"
        # --verbose: each job's log path printed when it starts
        assert f"log {path.relative_to(wd)}" in run.stderr, run.stderr[-3000:]
    quiet = snakemake(wd, dask_pool, "--forcerun", "plain")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert ".snakemake/vastaidask/logs" not in quiet.stderr, "paths only with --verbose or on failure"


def test_a_group_job_logs_under_its_group_and_its_wildcards(dask_pool: str, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    shutil.copytree(EXAMPLE, wd)
    run = snakemake(wd, dask_pool, "--config", "samples=2")
    assert run.returncode == 0, run.stderr[-4000:]
    logs = wd / ".snakemake" / "vastaidask" / "logs"
    for i in range(2):
        log = logs / "group-sample" / f"i={i}.log"
        assert log.exists(), sorted(str(p.relative_to(logs)) for p in logs.rglob("*.log"))
        assert "rule train" in log.read_text() and "rule evaluate" in log.read_text()
    assert len(list((logs / "prepare").glob("*.log"))) == 1


_FAILING = """
rule boom:
    output: "boom.txt"
    resources: gpu=1
    shell: "echo first line of the job; echo 'CUDA out of memory (simulated)' >&2; exit 3"
"""


def test_a_failure_shows_the_jobs_own_lines_not_the_remote_banner(dask_pool: str, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "Snakefile").write_text(_FAILING)
    run = snakemake(wd, dask_pool)
    assert run.returncode != 0
    text = run.stderr
    log = wd / ".snakemake" / "vastaidask" / "logs" / "boom"
    [path] = list(log.glob("*.log"))
    full = path.read_text()
    assert "SNAKEMAKE" in full and "Building DAG of jobs" in full, "the log file keeps everything"
    # the path, always on failure
    assert str(path.relative_to(wd)) in text
    message = text[text.index("exited with code"):]
    assert "CUDA out of memory (simulated)" in message and "first line of the job" in message
    assert "returned non-zero exit status 3" in message, "the command's own exit status"
    # none of the remote run's banner, DAG chatter or job block
    for chatter in ("Workflow ID:", "Building DAG of jobs", "Provided cores", "Select jobs to execute",
                    "Python version:", "localrule boom:", "reason: Forced execution"):
        assert chatter not in message, chatter
    # the worker's scratch path is written as the user knows it
    assert "/jobs/smk-" not in message


_UNTRACKED = """
rule all:
    input: "out.txt"

rule use_helper:
    output: "out.txt"
    resources: gpu=1
    shell: "python scripts/helper.py > {output}"
"""


def test_an_untracked_script_is_named_with_git_add_then_runs_once_added(dask_pool: str, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    (wd / "scripts").mkdir(parents=True)
    (wd / "Snakefile").write_text(_UNTRACKED)
    (wd / "scripts" / "helper.py").write_text("print('helped')\n")
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=wd, check=True)
    subprocess.run([*git, "add", "Snakefile"], cwd=wd, check=True)
    run = snakemake(wd, dask_pool)
    assert run.returncode != 0
    assert "`git add scripts/helper.py`" in run.stderr, run.stderr[-3000:]
    assert "git-tracked" in run.stderr
    subprocess.run([*git, "add", "scripts/helper.py"], cwd=wd, check=True)
    again = snakemake(wd, dask_pool)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (wd / "out.txt").read_text() == "helped\n"


def test_an_untracked_script_outside_git_says_git_init(dask_pool: str, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    (wd / "scripts").mkdir(parents=True)
    (wd / "Snakefile").write_text(_UNTRACKED)
    (wd / "scripts" / "helper.py").write_text("print('helped')\n")
    run = snakemake(wd, dask_pool)
    assert run.returncode != 0
    assert "`git init && git add scripts/helper.py`" in run.stderr, run.stderr[-3000:]


def test_job_output_keeps_a_jobs_lines_that_look_like_snakemakes_neighbours() -> None:
    """Only Snakemake's own lines go: a job printing ``total 8`` or indented text keeps them."""
    key = "smk-0123456789-4-1"
    text = (
        "\nSNAKEMAKE\n=========\n  Date: 2026\n  Host: C.1\n\nBuilding DAG of jobs...\n"
        "Using shell: /usr/bin/bash\nProvided cores: 2\nSelect jobs to execute...\nExecute 1 jobs...\n\n"
        "[Sun Nov 29 17:42:24 2026]\nlocalrule x:\n    output: a\n    jobid: 0\n"
        f"total 8\n  indented by the job\nreading /root/.cache/w/jobs/{key}/data/in.csv\n"
        "Shutting down, this might take some time.\n"
    )
    assert job_output(text, key).splitlines() == ["total 8", "  indented by the job", "reading data/in.csv"]
    assert MAX_NAME_CHARS < 255, "a log name fits every file system"


_HOSTILE = r"""
rule lure:
    output: "lure.txt"
    resources: gpu=1
    shell: "printf 'cat: secrets.ya''ml: No such file or directory\\n\\033[2J\\033]0;pwned\\007cleared\\n' >&2; exit 1"
"""


def test_a_hosts_words_cannot_pick_files_to_ship_nor_drive_the_terminal(dask_pool: str, tmp_path: Path) -> None:
    """What a job prints comes from a host: it may not talk the user into `git add secrets.yaml`, nor send
    escape sequences to the user's terminal. (The command spells the name in two quoted halves, as
    only the host's output, not the user's command, names the file.)"""
    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "Snakefile").write_text(_HOSTILE)
    (wd / "secrets.yaml").write_text("api_token: secret\n")
    subprocess.run(["git", "init", "-q"], cwd=wd, check=True)
    run = snakemake(wd, dask_pool)
    assert run.returncode != 0
    assert "cleared" in run.stderr, "the job's lines are shown"
    assert "git add" not in run.stderr, "the job's command names no secrets.yaml: no suggestion to ship it"
    assert "\x1b" not in run.stderr and "\x07" not in run.stderr, "no control character reaches the terminal"
