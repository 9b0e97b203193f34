"""The emulator in a process of its own, for benchmarks that measure the client's process alone.

The emulator's sandboxes (their OpenSSH, their relays) then cost nothing to the process
whose CPU a benchmark reads, as on Vast where the instances run elsewhere:

    with EmulatorProcess(variants={"direct_blocked": "all"}) as emu:
        VastAICluster(api_url=emu.url, api_key=emu.api_key, ...)
        emu.meter()   # GET /_emulator/meter: the marketplace's own bill
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dask_vastai.credentials import EMULATOR_KEY_PREFIX


class EmulatorProcess:
    """``python -m dask_vastai.emulator.main`` with real sandboxes, stopped (every sandbox with it) on exit."""

    def __init__(self, *, boot_delay_s: float = 0.5, rate_limits: bool = False, profile: str = "default",
                 variants: Mapping[str, str] | None = None, catalog: list[dict[str, Any]] | None = None) -> None:
        self.api_key = f"{EMULATOR_KEY_PREFIX}{secrets.token_hex(16)}"
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-emulator-")
        args = [sys.executable, "-m", "dask_vastai.emulator.main", "--api-key", self.api_key, "--runtime", "sandbox",
                "--boot-delay", str(boot_delay_s), "--profile", profile, "--state-dir", f"{self._tmp.name}/state"]
        if not rate_limits:
            args.append("--no-rate-limits")
        for name, value in (variants or {}).items():
            args += ["--variant", f"{name}={value}"]
        if catalog is not None:
            path = Path(self._tmp.name) / "catalog.json"
            path.write_text(json.dumps(catalog))
            args += ["--catalog", str(path)]
        self.args = args
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        #: what it printed after it started (its last lines)
        self.output: collections.deque[str] = collections.deque(maxlen=200)

    def __enter__(self) -> EmulatorProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                # its later lines (warnings) are read on, so that a full pipe never blocks it
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.__exit__(None, None, None)
        raise RuntimeError(f"the emulator did not start: {' '.join(self.args)}")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def meter(self) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/_emulator/meter",
                                         headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: it stops every sandbox, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._tmp.cleanup()
