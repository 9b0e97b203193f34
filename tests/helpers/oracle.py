"""The official ``vastai`` CLI, our test oracle, in a virtualenv of its own.

vastai pins cryptography, pillow and pycares exactly, so it never enters our environment:
the suite builds one virtualenv per machine (cached under ~/.cache, rebuilt when the
version changes) and runs the CLI as a subprocess, as a user would. :class:`Oracle` is
what the ``oracle`` fixture hands a test: the CLI pointed at an emulator.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dask_vastai.emulator import Emulator

VASTAI_VERSION = "1.9.1"
_VENV = Path(os.environ.get("DASK_VASTAI_ORACLE_VENV", "~/.cache/dask-vastai/vastai-oracle")).expanduser()


def oracle_python() -> Path:
    """The interpreter of the oracle virtualenv, made (once) if missing."""
    python = _VENV / "bin" / "python"
    marker = _VENV / f".vastai-{VASTAI_VERSION}"
    if marker.exists():
        return python
    _VENV.parent.mkdir(parents=True, exist_ok=True)
    # The suite runs in several processes (pytest-xdist): one builds, the others wait for it.
    with open(_VENV.parent / f"{_VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(_VENV)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 f"vastai=={VASTAI_VERSION}"],
                check=True,
            )
            marker.touch()
    return python


def run_cli(*args: str, url: str, api_key: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``vastai --url URL --api-key KEY ARGS...`` as a subprocess; returns the completed process."""
    python = oracle_python()
    cli = python.parent / "vastai"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "PYTHON"))}
    proc = subprocess.run(
        [str(cli), "--url", url, "--api-key", api_key, *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vastai {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_sdk(code: str, timeout: float = 60) -> object:
    """Run ``code`` in the oracle's interpreter; it must print one JSON document, returned parsed.

    For facts only the SDK's functions give (e.g. ``vastai.api.query.parse_query``), never
    imported into our own process.
    """
    python = oracle_python()
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"oracle code failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Oracle:
    """The official ``vastai`` CLI pointed at an emulator."""

    def cli(self, *args: str, emu: Emulator, api_key: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, url=emu.url, api_key=api_key or emu.api_key, timeout=timeout, check=check)

    def sdk(self, code: str, timeout: float = 60) -> object:
        """:func:`run_sdk`: ``code`` in the oracle's interpreter, its one JSON document parsed."""
        return run_sdk(code, timeout=timeout)


if __name__ == "__main__":  # pragma: no cover - manual warm-up: python -m tests.helpers.oracle
    print(oracle_python(), file=sys.stderr)
