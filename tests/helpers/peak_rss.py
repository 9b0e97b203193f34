"""A child process's peak memory, and large incompressible input files, for tests and benchmarks
of the client's memory (the child is the client: ``python -m snakemake`` with the plugin)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Runs its arguments as a child; writes to the file named first the child's peak RSS (kB), its
#: last ``/proc/<pid>/io`` (file and pipe bytes: sockets' ``send``/``recv`` are not in it) and
#: the bytes its TCP sockets sent and received (``ss -tinp`` every 0.2 s while it runs, each
#: socket's last count; a socket opened and closed between two looks is missed).
_WRAPPER = (
    "import json, re, resource, subprocess, sys, time\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "io, sockets = {}, {}\n"
    "mine = f'pid={child.pid},'\n"
    "while child.poll() is None:\n"
    "    try:\n"
    "        io = dict(line.split(': ') for line in open(f'/proc/{child.pid}/io').read().splitlines())\n"
    "    except OSError:\n"
    "        pass\n"
    "    lines = subprocess.run(['ss', '-tinpH'], capture_output=True, text=True).stdout.splitlines()\n"
    "    for head, detail in zip(lines, lines[1:]):\n"
    "        if mine in head and not head.startswith((' ', '\\t')):\n"
    "            sent = re.search(r'bytes_sent:(\\d+)', detail)\n"
    "            got = re.search(r'bytes_received:(\\d+)', detail)\n"
    "            sockets[' '.join(head.split()[3:5])] = [int(sent[1]) if sent else 0, int(got[1]) if got else 0]\n"
    "    time.sleep(0.2)\n"
    "usage = {'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'io': io,\n"
    "         'net': [sum(v[0] for v in sockets.values()), sum(v[1] for v in sockets.values())]}\n"
    "open(sys.argv[1], 'w').write(json.dumps(usage))\n"
    "sys.exit(child.returncode)\n"
)


@dataclass(frozen=True)
class Usage:
    """What one child process used: peak RSS, bytes it read and wrote through files and pipes,
    and bytes its TCP sockets sent and received."""

    peak_rss: int
    bytes_read: int
    bytes_written: int
    net_sent: int
    net_received: int


def run_measured(args: list[str], cwd: Path, env: Mapping[str, str],
                 timeout: float) -> tuple[subprocess.CompletedProcess[str], Usage]:
    """The finished run and its ``Usage``, from a wrapper whose only child it is, so nothing else
    this process started counts."""
    with tempfile.NamedTemporaryFile(prefix="peak-rss-") as out:
        run = subprocess.run([sys.executable, "-c", _WRAPPER, out.name, *args], cwd=cwd, env=dict(env),
                             capture_output=True, text=True, timeout=timeout)
        usage = json.loads(Path(out.name).read_text() or "{}")
    io = usage.get("io") or {}
    sent, received = usage.get("net") or (0, 0)
    return run, Usage(int(usage.get("maxrss_kb", 0)) * 1024, int(io.get("rchar", 0)), int(io.get("wchar", 0)),
                      int(sent), int(received))


def random_file(path: Path, size_mb: int) -> str:
    """``size_mb`` MB that do not compress (one random MB, each copy numbered); their SHA-256."""
    whole = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size_mb):
            data = i.to_bytes(4, "little") + block[4:]
            whole.update(data)
            f.write(data)
    return whole.hexdigest()
