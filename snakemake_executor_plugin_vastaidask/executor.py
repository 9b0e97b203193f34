"""The Snakemake executor: each job becomes one Dask task on a pooled worker.

Snakemake's traps this class answers (each one found in snakemake's executor interface):

- ``--directory`` is stripped from the job command: the remote runs in its own scratch
  directory and must never write into the user's workdir behind the staging's back.
- A group job's outputs, logs and benchmarks of *every* member come back, not only
  ``GroupJob.output`` (which leaves out group-internal files the main process still checks).
- Each attempt has a fresh Dask key (``smk-<run>-<jobid>-<attempt>``): resubmitting a key the
  scheduler still holds would hand back the old, failed future.
- A task whose resources no worker has would wait forever: it fails at hand-off with the
  resources asked for and those the workers advertise.
- ``future.cancel()`` lets a running subprocess finish: the task polls its own key on its
  worker and kills the job's process group once it is cancelled. No ``Event`` or other
  client-side object is used inside tasks: the hosts of a dask-vastai cluster act only as
  workers (the cluster's ``allow_worker_clients`` stays off).
- A job's ``python -m snakemake`` spends 2-3 s importing before it runs anything: the
  payload carries the arguments apart (``warm_args``) so that each worker forks the job from
  a process that imported snakemake once (``remote.py``), or says why it cannot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import re
import tarfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.utils import join_cli_args

from .joblog import (
    PREFIX,
    describe_job,
    git_add_hint,
    job_commands,
    job_log_path,
    job_output,
    tail,
    unshipped_files,
)
from .retrieval import OutputPuller, PullReport
from .settings import ExecutorSettings
from .staging import Stager, remote_function, restamp, sha256_bytes, unpack_results

_DIRECTORY_ARG = re.compile(r"\s--directory\s+('[^']*'|\S+)")
STATUS_INTERVAL_S = 0.5


def strip_directory(command: str) -> str:
    """The job command without ``--directory <local path>`` (the remote has its own directory)."""
    return _DIRECTORY_ARG.sub("", command)


@dataclass
class _Job:
    """One attempt of one job, from hand-off to report."""

    info: SubmittedJobInfo
    payload: dict[str, Any]
    resources: dict[str, float]
    results: list[str]
    log_path: Path
    shas: list[str] = field(default_factory=list)  # blob references held for this attempt
    submitted_at: float = field(default_factory=time.monotonic)
    future: Any = None
    result: dict[str, Any] | None = None  # the task's result, while its large outputs are pulled
    pull: concurrent.futures.Future[PullReport] | None = None


def job_resources(job: JobExecutorInterface) -> dict[str, float]:
    """Dask resources of a job from the names Snakemake users know (gpu/nvidia_gpu, threads, mem_mb)."""
    res = job.resources
    gpu = res.get("gpu", None) or res.get("nvidia_gpu", None) or 0
    try:
        gpu = float(gpu)
    except (TypeError, ValueError):
        raise ValueError(
            f"resources gpu={gpu!r} of {job}: give a number of GPUs (gpu=1); the model goes in gpu_model"
        ) from None
    out: dict[str, float] = {"CPU": float(job.threads or 1)}
    if gpu:
        out["GPU"] = gpu
    mem_mb = res.get("mem_mb", None)
    if isinstance(mem_mb, int | float) and mem_mb > 0:
        out["MEMORY"] = float(mem_mb) * 1e6
    return out


def job_disk_gb(job: JobExecutorInterface) -> float | None:
    """GB of disk a job asks for (``disk_mb``; Snakemake turns ``disk="50GB"`` into it), or None."""
    disk_mb = job.resources.get("disk_mb", None)
    if isinstance(disk_mb, int | float) and not isinstance(disk_mb, bool) and disk_mb > 0:
        return float(disk_mb) / 1000.0
    return None


def temp_outputs(job: JobExecutorInterface, workflow: Any) -> list[str]:
    """The temp() files among the outputs of every member of a group that Snakemake deletes once
    their consumers are done (its ``DAG.handle_temp``): so the user's disk never needs their data.
    Not a requested target's (Snakemake keeps those), nor a checkpoint's (Snakemake reads it
    here to go on), nor any with ``--notemp``; directories always come back."""
    if workflow.storage_settings.notemp:
        return []
    dag = workflow.dag
    targets = {str(f) for f in getattr(dag, "targetfiles", ()) or ()}
    target_jobs = getattr(dag, "targetjobs", ()) or ()
    members = [j for level in job.toposorted for j in level] if job.is_group() else [job]
    out = []
    for j in members:
        if getattr(j, "is_checkpoint", False) or (j in target_jobs and j.rule.name != workflow.default_target):
            continue
        for f in j.output:
            flags = getattr(f, "flags", None) or {}
            if "temp" in flags and "directory" not in flags and str(f) not in targets:
                out.append(str(f))
    return out


def consumed_outputs(job: JobExecutorInterface, workflow: Any) -> set[str]:
    """The outputs of ``job`` (every member of a group) that a job outside it consumes on a
    worker (a local rule, such as ``all``, reads this machine's copy): the worker caches those
    (a consumer placed there needs no transfer), and keeps no copy of the others once this
    machine has them."""
    depending = getattr(workflow.dag, "depending", {})
    members = [j for level in job.toposorted for j in level] if job.is_group() else [job]
    out: set[str] = set()
    for j in members:
        for dependent, files in depending.get(j, {}).items():
            if dependent not in members and not getattr(dependent, "is_local", False):
                out.update(str(f) for f in files)
    return out


def job_result_paths(job: JobExecutorInterface) -> tuple[list[str], list[str]]:
    """(outputs+benchmarks, logs) of every member of a group, in topological order."""
    members = [j for level in job.toposorted for j in level] if job.is_group() else [job]
    outputs: list[str] = []
    logs: list[str] = []
    for j in members:
        outputs.extend(str(f) for f in j.output)
        bench = getattr(j, "benchmark", None)
        if bench:
            outputs.append(str(bench))
        logs.extend(str(f) for f in j.log)
    return list(dict.fromkeys(outputs)), list(dict.fromkeys(logs))


class Executor(RemoteExecutor):
    """``--executor vastaidask``: Snakemake jobs as Dask tasks on a warm pool of workers."""

    def _stop_status_thread(self) -> None:
        """Snakemake's status thread started before ``__post_init__``; when we refuse to start, it
        must end before the interpreter does, or its next check meets the closed thread pool and
        prints "cannot schedule new futures after shutdown" under the user's error."""
        with self.lock:
            self.wait = False
        self.wait_thread.join(timeout=5)

    def __post_init__(self) -> None:
        from .backend import (
            DaskBackend,
            configuration_error,
            quiet_dask_logs,
            refuse_credentials_in_clear,
        )
        from .progress import RentalProgress

        self.settings: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        self.run_id = uuid.uuid4().hex[:10]
        self.next_seconds_between_status_checks = STATUS_INTERVAL_S
        self.workdir = Path.cwd()
        self.state_dir = self.workdir / ".snakemake" / "vastaidask"
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.transfer_log = self.state_dir / "transfers.jsonl"
        output_settings = getattr(self.workflow, "output_settings", None)
        self.verbose = bool(getattr(output_settings, "verbose", False))
        # distributed's INFO lines (scheduler start, every connection: ~30 a run) are noise to a
        # Snakemake user, also outside the cluster's life and when attached; --verbose brings them back.
        quiet_dask_logs(not self.verbose)
        self.progress = RentalProgress()
        self._dispatch_lock = threading.Lock()
        self._job_ended = threading.Event()
        self._jobs: dict[str, _Job] = {}
        self._backlog: deque[str] = deque()
        self._refused: dict[str, str] = {}
        self._closed = False
        try:
            self.backend = DaskBackend(self.settings, run_name=f"smk-{self.run_id}", verbose=self.verbose)
        except Exception as e:
            self._stop_status_thread()
            mapped = configuration_error(e, self.settings)
            if mapped is e:
                raise
            raise mapped from None
        try:
            if not self.backend.renting:
                refuse_credentials_in_clear(str(self.settings.scheduler_address), storage_mode=self.storage_mode,
                                            env_names=self._secret_env_names())
            self.stager = Stager(self.backend.client, self.workdir, note=lambda line: self.logger.info(PREFIX + line),
                                 chunk_bytes=int(self.settings.chunk_mb) << 20,
                                 cache_dir=self.settings.worker_cache_dir)
            #: bytes of job results (outputs, logs) received on this machine
            self.received_bytes = 0
            self.puller = OutputPuller(self.backend.client, self.workdir, self.stager.chunk_bytes,
                                       self.settings.worker_cache_dir, note=lambda line: self.logger.info(PREFIX + line))
            # One pull at a time: the client holds two chunks of it, not two per job that ends.
            self._pulls = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vastaidask-pull")
            self._remote = remote_function()
            if self.storage_mode:
                # Bucket mode: jobs fetch the sources (--deploy-sources) and read and write
                # files in the bucket themselves; nothing but the logs travels over Dask.
                self.workflow.upload_sources()
                self.sources, self.sources_sha = b"", None
            else:
                archive = Path(self.tmpdir) / "workflow-sources.tar.xz"
                self.workflow.write_source_archive(archive)
                self.sources = archive.read_bytes()
                self.sources_sha = sha256_bytes(self.sources)
        except BaseException:
            self.backend.close()
            self._stop_status_thread()
            raise
        self._ready = True

    def _secret_env_names(self) -> list[str]:
        """The variables each job carries that may be credentials: the ones the workflow declares
        (``envvars:``, ``--envvars``: they exist to carry tokens) and storage plugins' settings
        whose names say so (``..._SECRET_KEY``), when set."""
        from dask_vastai.environment import looks_secret

        declared = {*self.workflow.envvars, *self.workflow.remote_execution_settings.envvars}
        return sorted(n for n, v in self.envvars().items() if v and (n in declared or looks_secret(n)))

    # ------------------------------------------------------------ the command
    @property
    def storage_mode(self) -> bool:
        """``--default-storage-provider`` given: files go through the bucket, not over Dask."""
        return self.workflow.storage_settings.default_storage_provider is not None

    @property
    def common_settings(self):  # type: ignore[override]
        # Core reads the module-level settings (can_transfer_local_files: no bucket needed);
        # the job command reads this property: in bucket mode it must deploy the sources
        # from the bucket (--deploy-sources) as every storage-based executor does.
        base = self.workflow.executor_plugin.common_settings
        return dataclasses.replace(base, can_transfer_local_files=False) if self.storage_mode else base

    def format_job_exec(self, job: JobExecutorInterface) -> str:
        return strip_directory(super().format_job_exec(job))

    def warm_start(self, command: str) -> tuple[str | None, str]:
        """(the arguments after ``python -m snakemake`` in ``command``, "") for a job a worker's
        warm runner can fork, else (None, why it starts as a fresh process)."""
        if self.settings.no_warm_start:
            return None, "--vastaidask-no-warm-start"
        deployment = getattr(self.workflow.deployment_settings, "deployment_method", None) or ()
        methods = sorted(m.name.lower() for m in deployment if m.name in ("CONDA", "APPTAINER"))
        if methods:
            return None, (f"--software-deployment-method {' '.join(methods)}: the job builds its "
                          "environment with its own snakemake, which the warm runner leaves to a fresh one")
        precommand = self.workflow.spawned_job_args_factory.precommand(executor_common_settings=self.common_settings)
        if precommand:
            return None, "a command runs before snakemake (--precommand, or sources deployed from the storage)"
        head = join_cli_args([self.get_envvar_declarations(), self.get_python_executable(), "-m snakemake"])
        if not command.startswith(head + " "):
            return None, f"the job command does not start with {head!r}"
        return command[len(head) + 1:], ""

    def additional_general_args(self) -> str:
        """Software environments (``--sdm conda/apptainer``) are built once per worker, into a
        persistent prefix in its cache, not once per job in a scratch directory (the shell
        running the job expands the variable the worker sets)."""
        return (
            '--conda-prefix "$VASTAIDASK_WORKER_CACHE/conda" '
            '--apptainer-prefix "$VASTAIDASK_WORKER_CACHE/apptainer"'
        )

    # ------------------------------------------------------------- hand-off
    def run_job(self, job: JobExecutorInterface) -> None:
        key = f"smk-{self.run_id}-{job.jobid}-{job.attempt}"
        info = SubmittedJobInfo(job, external_jobid=key, aux={})
        staged: list[str] = []
        log_path = job_log_path(self.logs_dir, job)
        if self.verbose:
            self.logger.info(f"{PREFIX}{describe_job(job)}: log {log_path.relative_to(self.workdir)}")
        try:
            resources = job_resources(job)
            resources.update(
                self.backend.pool_resource(
                    job.resources.get("gpu_model", None), job.resources.get("vastai_query", None),
                    resources.get("GPU", 0), job_disk_gb(job),
                )
            )
            outputs, logs = job_result_paths(job)
            inputs = []
            if self.sources_sha is not None:
                staged.append(self.stager.stage_bytes(self.sources, self.sources_sha))
            for f in [] if self.storage_mode else job.input:
                inputs.append(self.stager.stage_path(self._relative(str(f), job)))
                staged.extend(inputs[-1].blob_shas)
            shas = staged
            command = self.format_job_exec(job)
            warm_args, warm_refused = self.warm_start(command)
            payload = {
                "key": key,
                "command": command,
                "warm_args": warm_args,
                "warm_refused": warm_refused,
                "warm_python": self.get_python_executable(),
                "sources": self.sources_sha,
                "inputs": [i.manifest() for i in inputs],
                "blob_keys": {sha: self.stager.key(sha) for sha in shas},
                "outputs": [] if self.storage_mode else [self._relative(p, job) for p in outputs],
                "keep_remote": [] if self.storage_mode or self.settings.no_keep_temp_remote
                else [self._relative(p, job) for p in temp_outputs(job, self.workflow)],
                "chunk_bytes": self.stager.chunk_bytes,
                # Outputs beyond this many bytes in all stay on the worker and are pulled in chunks.
                "pull_outputs": not self.storage_mode,
                "inline_bytes": self.stager.chunk_bytes,
                # Outputs no later job consumes on a worker: the worker keeps no copy in its cache.
                "uncache": [] if self.storage_mode else
                [self._relative(p, job) for p in outputs if p not in consumed_outputs(job, self.workflow)],
                "logs": [self._relative(p, job) for p in logs],
                "env": self.envvars(),
                "cache_dir": self.settings.worker_cache_dir,
                "cache_quota_bytes": int(self.settings.cache_quota_gb * 1e9),
            }
        except Exception as e:
            self.stager.release(staged)
            self.report_job_submission(info)
            self.report_job_error(info, msg=f"vastaidask could not prepare {job}: {e}")
            return
        self._jobs[key] = _Job(info, payload, resources, outputs, log_path, shas=staged)
        self.report_job_submission(info)
        with self._dispatch_lock:
            self._backlog.append(key)
        self._dispatch()

    def _relative(self, path: str, job: JobExecutorInterface) -> str:
        p = Path(path)
        if not p.is_absolute():
            return path
        try:
            return str(p.relative_to(self.workdir))
        except ValueError:
            raise ValueError(
                f"{path} ({job}) lies outside the working directory {self.workdir}; only files "
                "below it travel to the workers. Move it below, or use --default-storage-provider"
            ) from None

    def _dispatch(self) -> None:
        """Hand queued jobs to Dask, GPU jobs only while GPUs (registered or booting) plus a
        margin are free: the first instance to boot must not take every queued job.

        From a cold start (renting, no GPU registered or booting) the GPUs the default pool
        may rent count as free: adapt rents from the jobs it sees, and seeing them all in its
        first round it rents every instance in one batch, which boots together, instead of
        "margin" more per round, each batch paced by Vast's create interval (P1: the last
        two registered 3-4 s after the first two). No instance can take a job before it
        registers; spreading them then is placement's.

        Jobs that cannot run anywhere land in ``self._refused`` (key -> why), for the status
        loop to report.
        """
        with self._dispatch_lock:
            if self._closed or not self._backlog:
                return
            slots = self.backend.gpu_slots()
            if slots == 0 and self.backend.renting:
                slots = float(max(1, self.settings.max_instances) * (self.settings.num_gpus or 1))
            slots += max(0, self.settings.submit_margin)
            busy = sum(
                j.resources.get("GPU", 0) for j in self._jobs.values() if j.future is not None
            )
            advertised = self.backend.advertised()
            while self._backlog:
                job = self._jobs[self._backlog[0]]
                gpu = job.resources.get("GPU", 0)
                if gpu and busy + gpu > slots and busy > 0:
                    break
                self._backlog.popleft()
                resources = dict(job.resources)
                if advertised is not None:
                    # An attached cluster that has no CPU/MEMORY counters runs jobs unrestricted on them.
                    for name in ("CPU", "MEMORY"):
                        if name not in advertised:
                            resources.pop(name, None)
                why = self.backend.impossible(resources)
                if why:
                    self._refused[job.payload["key"]] = why
                    continue
                busy += gpu
                # Blobs travel by key, never as dependencies, even those still in the task that
                # holds them until a worker registers: a job waiting on a dependency is not
                # "no-worker", so the GPU demand would not count it and a cold start would rent
                # one instance for the blob task, the others only once it registered.
                job.future = self.backend.client.submit(
                    self._remote, job.payload, key=job.payload["key"], resources=resources, pure=False,
                )
                job.future.add_done_callback(lambda _: self._job_ended.set())

    # ---------------------------------------------------------------- status
    async def sleep(self) -> None:
        """Between status checks, at most ``STATUS_INTERVAL_S``: the status thread starts before
        ``__post_init__`` and would otherwise wait Snakemake's 10 s default after its first
        check, while the cluster starts, so that boot phases and the first finished jobs went
        unseen for that long. It ends early when a job's task ends: a finished job is reported
        (and the next one handed over) at once, not at the next poll (0.25 s later on average,
        per job of a chain)."""
        ended = getattr(self, "_job_ended", None)
        if ended is None:  # still in __post_init__
            await asyncio.sleep(STATUS_INTERVAL_S)
            return
        await asyncio.to_thread(ended.wait, STATUS_INTERVAL_S)
        ended.clear()  # before the check that follows, which sees every task ended so far

    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        if not getattr(self, "_ready", False):
            # The status thread starts before __post_init__ has connected.
            for info in active_jobs:
                yield info
            return
        await asyncio.to_thread(self._dispatch)
        await asyncio.to_thread(self._report_rentals)
        await asyncio.to_thread(self.stager.sweep_kept)
        for info in active_jobs:
            key = info.external_jobid
            job = self._jobs.get(key)
            if job is None:
                continue
            try:
                why = self._refused.pop(key, None)
                if why is not None:
                    self._forget(key)
                    self.report_job_error(info, msg=f"no worker can run {info.job}: {why}")
                    continue
                if job.future is None or job.future.status == "pending" or (
                        job.pull is not None and not job.pull.done()):
                    yield info
                    continue
                if job.pull is not None:
                    self._pulled(job)
                elif await self._finish(job):
                    yield info  # its large outputs are on their way
            except Exception as e:  # one job's trouble must not stop the status loop
                self._forget(key)
                self.report_job_error(info, msg=f"vastaidask lost {info.job} ({key}): {e!r}")

    def _report_rentals(self) -> None:
        """A line per rental and per change of its state (never one per poll)."""
        try:
            rows = self.backend.instances()
        except Exception:  # noqa: BLE001 - a report must not fail the status loop
            return
        for line in self.progress.update(rows):
            self.logger.info(line)

    def _forget(self, key: str) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        if job.future is not None:
            job.future.release()
        self.stager.release(job.shas)

    async def _finish(self, job: _Job) -> bool:
        """Report a job whose task ended; True when it stays active while its large outputs are
        pulled (``_pulled`` reports it then)."""
        info = job.info
        key = job.payload["key"]
        future = job.future
        if future.status != "finished":
            error = await asyncio.to_thread(future.exception) if future.status == "error" else future.status
            self._forget(key)
            self.report_job_error(info, msg=f"{info.job} ({key}) failed on the cluster: {error!r}")
            return False
        result = await asyncio.to_thread(future.result)
        log_path = job.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(result.get("output", ""))
        pull = result.get("pull") or {}
        succeeded = result.get("rc") == 0 and not result.get("cancelled")
        try:
            await asyncio.to_thread(unpack_results, result.get("tar", b""), self.workdir,
                                    job.payload["outputs"] + job.payload["logs"])
        except ValueError as e:
            self._discard_pull(job, result)
            self._forget(key)
            self.report_job_error(info, msg=f"{info.job} ({key}) on worker {result.get('worker_name')}: {e}")
            return False
        self.received_bytes += len(result.get("tar", b""))
        if succeeded and pull:
            declared = [p for p in job.payload["outputs"] if p not in (result.get("kept") or {})]
            job.result = result
            job.pull = self._pulls.submit(self.puller.pull, key, str(result.get("worker")), pull, declared)
            job.pull.add_done_callback(lambda _: self._job_ended.set())
            self.stager.release(job.shas)  # its inputs are not needed while its outputs come back
            job.shas = []
            return True
        self._forget(key)
        if pull:  # a job that failed or was cancelled stowed nothing; a worker that says so is not believed
            self._discard_pull(job, result)
        self._report(job, result, PullReport())
        return False

    def _discard_pull(self, job: _Job, result: dict[str, Any]) -> None:
        """Have the worker delete an outbox that will not be pulled (the job's results were refused)."""
        if result.get("pull"):
            self._pulls.submit(self.puller.pull, job.payload["key"], str(result.get("worker")), {}, [])

    def _pulled(self, job: _Job) -> None:
        """Report a job whose large outputs were being pulled: whole and checked, or refused."""
        key, result = job.payload["key"], job.result or {}
        self._forget(key)
        try:
            report = job.pull.result() if job.pull is not None else PullReport()
        except Exception as e:  # noqa: BLE001 - OutputRefused names the file; anything else, as it is
            self._record_transfers(key, result, time.monotonic() - job.submitted_at)
            self.report_job_error(job.info, msg=f"{job.info.job} ({key}) ran on worker {result.get('worker_name')}, "
                                  f"but its outputs did not come back: {e}", aux_logs=[str(job.log_path)])
            return
        self.received_bytes += report.bytes
        self._report(job, result, report)

    def _report(self, job: _Job, result: dict[str, Any], report: PullReport) -> None:
        """Success (outputs in place, kept ones recorded, restamped) or the failure's story."""
        info, key = job.info, job.payload["key"]
        if result.get("rc") == 0 and not result.get("cancelled"):
            for rel, manifest in (result.get("kept") or {}).items():
                if rel in job.payload["keep_remote"]:  # a worker names only what it was asked to keep
                    self.stager.keep(rel, manifest, str(result.get("worker")))
            restamp(job.payload["outputs"], self.workdir)
            self._record_transfers(key, result, time.monotonic() - job.submitted_at, report)
            self.report_job_success(info)
            return
        self._record_transfers(key, result, time.monotonic() - job.submitted_at, report)
        self.report_job_error(info, msg=self._failure_message(job, result), aux_logs=[str(job.log_path)])

    def _failure_message(self, job: _Job, result: dict[str, Any]) -> str:
        """What failed where, the log's path, the job's own last lines, and a missing file's fix."""
        why = "was cancelled" if result.get("cancelled") else f"exited with code {result.get('rc')}"
        own = job_output(result.get("output", ""), job.payload["key"])
        lines = [
            f"{PREFIX}{describe_job(job.info.job)} {why} on worker {result.get('worker_name')}; "
            f"full output in {job.log_path.relative_to(self.workdir)}"
        ]
        if not result.get("cancelled"):
            staged = [i[0] for i in job.payload["inputs"]] + job.payload["outputs"] + job.payload["logs"]
            missing = unshipped_files(
                own, self.workdir, self._shipped_sources(), staged, commands=job_commands(job.info.job)
            )
            if missing:
                lines.append(f"{PREFIX}{git_add_hint(missing, self.workdir)}")
            lines.append("its own output, last lines:" if own else "it printed nothing of its own")
            lines.extend("    " + line for line in tail(own).splitlines())
        # Under Snakemake's "message:" (indented by 4), and ending the line it appends to.
        return "\n    ".join(lines) + "\n"

    def _shipped_sources(self) -> list[str]:
        """The workdir-relative files of the source archive the instances got."""
        if self.sources:
            with tarfile.open(fileobj=io.BytesIO(self.sources), mode="r:xz") as tf:
                return [m.name for m in tf.getmembers() if m.isfile()]
        return sorted(self.workflow.dag.get_sources())

    def _record_transfers(self, key: str, result: dict[str, Any], latency_s: float,
                          pulled: PullReport | None = None) -> None:
        """One JSON line per job: what crossed to which worker, and hand-off -> outputs on disk."""
        cache = result.get("cache", {})
        line = {
            "key": key,
            "worker": result.get("worker"),
            "worker_name": result.get("worker_name"),
            "fetched": cache.get("fetched", []),
            "cache_hits": cache.get("hits", 0),
            "chunks": cache.get("chunks", 0),
            "resumed_chunks": cache.get("resumed_chunks", 0),
            "returned_bytes": len(result.get("tar", b"")),
            "pulled_bytes": pulled.bytes if pulled else 0,
            "pulled_chunks": pulled.chunks if pulled else 0,
            "resumed_pull_chunks": pulled.resumed_chunks if pulled else 0,
            "refetched": pulled.refetched if pulled else [],
            "kept": [[rel, m[0], m[1]] for rel, m in (result.get("kept") or {}).items()],
            "seconds": round(float(result.get("seconds", 0.0)), 3),
            "start": result.get("start"),
            "latency_s": round(latency_s, 3),
            "done_at": round(time.time(), 3),
        }
        with open(self.transfer_log, "a") as f:
            f.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------ cancel/end
    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        """Cancel every handed-over job (running tasks see it and kill their process groups)."""
        with self._dispatch_lock:
            self._backlog.clear()
        futures = [j.future for j in self._jobs.values() if j.future is not None]
        with contextlib.suppress(Exception):
            self.backend.client.cancel(futures, force=True)

    def shutdown(self) -> None:
        """Idempotent (Snakemake calls it after ``cancel_jobs`` and at normal end)."""
        super().shutdown()
        if not getattr(self, "_ready", False):
            return
        with self._dispatch_lock:
            if self._closed:
                return
            self._closed = True
        self.puller.close()
        self.stager.release_all()
        self.logger.info(
            f"{PREFIX}data: {self.stager.uploaded_bytes / 1e6:.1f} MB staged from this machine, "
            f"{self.received_bytes / 1e6:.1f} MB of results received; "
            f"{self.stager.worker_bytes / 1e6:.1f} MB of temp() outputs went worker to worker"
        )
        self.backend.close()
        self._pulls.shutdown(wait=True, cancel_futures=True)
        if self.backend.renting:
            # After close: every rental destroyed, so this is the final bill.
            self.logger.info(self.progress.summary(self.backend.instances(), self.backend.cost_usd,
                                                   self.backend.bandwidth_usd, self.backend.losses()))
        if self.storage_mode:
            # Core removes the archive only when it uploaded it itself.
            with contextlib.suppress(Exception):
                self.workflow.cleanup_source_archive()

