"""What a user reads about one job: where its log goes, and what its failure says.

- Each job's full output lands in ``.snakemake/vastaidask/logs/<rule>/<wildcards>.log``
  (``<rule>/<jobid>.log`` without wildcards, ``group-<groupid>/...`` for a group job), a
  name a user can find from the rule and wildcards Snakemake printed.
- The job runs as ``python -m snakemake ... --mode remote`` on the worker, whose output
  is mostly Snakemake's own: its banner, the DAG and job blocks, the error epilogue. A
  failure shows the job's own lines (its stdout and stderr), not that.
- Only the workflow's git-tracked files (plus the Snakefile, its includes, config files and
  ``script:``/``notebook:``/conda files) reach the instances. A job that fails on a file
  that exists here but was not shipped is told to ``git add`` it.

What a job printed comes from a host, and hosts are strangers: the text shown is stripped of
terminal control characters (no escape sequence reaches the user's terminal), and ``git add``
is suggested only for a file the job's own command (known here) names and git does not
ignore, so a host cannot talk the user into shipping ``.env`` to every instance.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

#: every line of ours starts so, so that a user can tell (and grep) them from Snakemake's
PREFIX = "vastaidask: "
#: lines of the job's own output a failure shows (the full output is in its log file)
FAILURE_TAIL_LINES = 20
#: a log file name longer than this (many or long wildcards) is cut and given a hash
MAX_NAME_CHARS = 120


# ----------------------------------------------------------------------------- layout
def _safe(text: str) -> str:
    """``text`` as one path component: readable, and distinct inputs stay distinct.

    Percent-encoding keeps ``/``, spaces and the like out of the name while ``=`` and ``,``
    stay readable; a name too long for a file system is cut and given a hash of the whole.
    """
    name = quote(text, safe="=,.-_+@")
    if name.startswith("."):
        name = "%2E" + name[1:]  # no hidden files, no "." or ".."
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME_CHARS - 11]}-{digest}"
    return name or "_"


def _wildcards(job: Any) -> dict[str, str]:
    """The job's wildcards; for a group, those of its members (first value of a name wins)."""
    members = [j for level in job.toposorted for j in level] if job.is_group() else [job]
    out: dict[str, str] = {}
    for member in members:
        for name, value in (getattr(member, "wildcards_dict", None) or {}).items():
            out.setdefault(str(name), str(value))
    return out


def job_log_path(logs_dir: Path, job: Any) -> Path:
    """``<logs_dir>/<rule>/<wildcards>.log`` (see the module docstring); retries get ``.attemptN``."""
    if job.is_group():
        folder = f"group-{job.groupid}"
    else:
        folder = str(job.name)
    wildcards = _wildcards(job)
    stem = ",".join(f"{k}={v}" for k, v in wildcards.items()) if wildcards else str(job.jobid)
    attempt = int(getattr(job, "attempt", 1) or 1)
    suffix = f".attempt{attempt}" if attempt > 1 else ""
    return logs_dir / _safe(folder) / f"{_safe(stem)}{suffix}.log"


def describe_job(job: Any) -> str:
    """``rule train (i=0)`` / ``group train_eval (i=0)``, as a user recognises the job."""
    kind = f"group {job.groupid}" if job.is_group() else f"rule {job.name}"
    wildcards = _wildcards(job)
    return kind + (f" ({', '.join(f'{k}={v}' for k, v in wildcards.items())})" if wildcards else "")


# ----------------------------------------------------------------------------- the job's own output
_BANNER_START = re.compile(r"^SNAKEMAKE$")
_BANNER_RULE = re.compile(r"^=+$")
_BANNER_FIELD = re.compile(r"^  \S[^:]*: ")
#: a job block's header: ``rule x:``, ``localrule x:``, ``checkpoint x:``, ``group job x (jobs in lexicogr. order):``
_JOB_BLOCK = re.compile(r"^(local)?(rule|checkpoint) \S+:$|^group job \S+.*:$|^Error in (rule|group job) \S+:$")
_JOB_FIELD = re.compile(r"^ {4}\S.*$|^ {8}.*$")
#: Snakemake's own one-line chatter, before and after the job's command
_CHATTER = re.compile(
    r"^(Building DAG of jobs\.\.\.|Using shell: .*|Provided (cores|resources|remote nodes): .*"
    r"|Rules claiming more threads will be scaled down\.|Select jobs to execute\.\.\.|Execute \d+ jobs\.\.\."
    r"|\[\w{3} \w{3} +\d+ [\d:]+ \d{4}\]"
    r"|Finished jobid: .*|\d+ of \d+ steps \(.*\) done|Storing output in storage\.|Elapsed time: .*"
    r"|Shutting down, this might take some time\.|Exiting because a job execution failed\..*"
    r"|Complete log\(s\): .*|Assuming unrestricted shared filesystem usage\."
    r"|Unable to retrieve additional files from git\..*"
    r"|RuleException:|WorkflowError:|At least one job did not complete successfully\."
    r"|Waiting at most \d+ seconds for missing files\.?"
    # the worker's note on how the job started (remote.py), when it needs no reason
    r"|vastaidask: started warm \(forked from this worker's warm snakemake runner\))$"
)
_REMOVING = re.compile(r"^Removing output files of failed job .*:$")


#: what a terminal would act on: C0 controls but tab and newline, DEL, C1 controls (CSI, ...)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def job_output(text: str, key: str) -> str:
    """The job's own lines of a remote Snakemake run's output (banner, blocks, epilogue removed).

    Paths inside the job's scratch directory on the worker (``.../jobs/<key>/x``) are written
    workdir-relative (``x``), as the user knows them; control characters become ``?``.
    """
    text = _CONTROL.sub("?", text.replace("\r\n", "\n"))
    text = re.sub(rf"[^\s'\"]*/jobs/{re.escape(key)}/", "", text)
    kept: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if _BANNER_START.match(line) and i + 1 < len(lines) and _BANNER_RULE.match(lines[i + 1]):
            i += 2
            while i < len(lines) and _BANNER_FIELD.match(lines[i]):
                i += 1
            continue
        if _JOB_BLOCK.match(line):
            i += 1
            while i < len(lines) and _JOB_FIELD.match(lines[i]):
                i += 1
            continue
        if _REMOVING.match(line):
            i += 1
            while i < len(lines) and lines[i].strip() and " " not in lines[i].strip():
                i += 1  # the job's output files, one per line
            continue
        if not _CHATTER.match(line):
            kept.append(line)
        i += 1
    while kept and not kept[-1].strip():
        kept.pop()
    while kept and not kept[0].strip():
        kept.pop(0)
    return "\n".join(kept)


def tail(text: str, lines: int = FAILURE_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``, with a note of how many came before."""
    all_lines = text.splitlines()
    if len(all_lines) <= lines:
        return text
    return f"[... {len(all_lines) - lines} earlier lines in the log file]\n" + "\n".join(all_lines[-lines:])


# ----------------------------------------------------------------------------- files that did not travel
#: a line that says a file was missing, in the words of Python, shells, R and Snakemake
_MISSING = re.compile(
    r"No such file or directory|can't open file|cannot open file|not found|No module named"
    r"|does not exist|FileNotFoundError|MissingInputException|cannot find",
    re.IGNORECASE,
)
_PATH_TOKEN = re.compile(r"[\w.+@%-]+(?:/[\w.+@%-]+)*")


def _candidates(line: str) -> Iterable[str]:
    """Workdir-relative paths a missing-file line may be talking about."""
    for token in _PATH_TOKEN.findall(line):
        token = token.removeprefix("./")
        if token and not token.startswith("..") and ("/" in token or "." in token.strip(".")):
            yield token


def job_commands(job: Any) -> str:
    """The shell commands of the job (every member of a group), as Snakemake formats them here."""
    members = [j for level in job.toposorted for j in level] if job.is_group() else [job]
    commands = []
    for member in members:
        try:
            commands.append(member.shellcmd or "")
        except Exception:  # noqa: BLE001 - a command that cannot be formatted names no file
            continue
    return "\n".join(commands)


def unshipped_files(
    output: str, workdir: Path, shipped: Iterable[str], staged: Iterable[str] = (), *, commands: str,
) -> list[str]:
    """Files a failed job's output says were missing that exist here but were not sent.

    ``output`` is :func:`job_output`'s text (workdir-relative paths); ``shipped`` the paths in
    the source archive, ``staged`` the job's inputs, outputs and logs (they travel, or are
    made, on their own). Only files that ``commands`` (the job's shell commands, known here,
    not told by the host) name and git does not ignore are returned.
    """
    sent = {str(Path(p)) for p in shipped} | {str(Path(p)) for p in staged}
    root = workdir.resolve()
    found: list[str] = []
    for line in output.splitlines():
        if not _MISSING.search(line):
            continue
        for rel in _candidates(line):
            rel = str(Path(rel))
            path = (workdir / rel).resolve()
            if rel in sent or rel in found or rel not in commands:
                continue
            if not path.is_file() or not path.is_relative_to(root) or _git_ignores(workdir, rel):
                continue
            found.append(rel)
    return found


def _git_ignores(workdir: Path, rel: str) -> bool:
    try:
        out = subprocess.run(["git", "check-ignore", "-q", "--", rel], cwd=workdir, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def git_add_hint(paths: list[str], workdir: Path) -> str:
    """The sentence that tells the user to ``git add`` the files that did not travel."""
    quoted = " ".join(quote_arg(p) for p in paths)
    these = "these files exist" if len(paths) > 1 else "this file exists"
    rule = (
        "only the workflow's git-tracked files (plus the Snakefile, its includes, config files and "
        "script:/notebook:/conda files) reach the instances"
    )
    if is_git_repository(workdir):
        fix = f"run `git add {quoted}` (no commit needed) and rerun"
    else:
        fix = f"the workflow is not in a git repository: run `git init && git add {quoted}` and rerun"
    return f"{quoted}: {these} here but not on the instance; {rule}. To send it, {fix}."


def quote_arg(path: str) -> str:
    return path if re.fullmatch(r"[\w./+@%=,-]+", path) else "'" + path.replace("'", "'\\''") + "'"


def is_git_repository(workdir: Path) -> bool:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--is-inside-work-tree"], cwd=workdir, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "true"

