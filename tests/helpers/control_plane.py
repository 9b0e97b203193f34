"""The emulated Vast control plane as any HTTP client sees it, and a runtime the test scripts.

- :func:`call` (one API call: status, parsed body, headers), :func:`search`, :func:`rent`,
  :func:`show` and :func:`wait_status`: Vast's REST API through ``urllib``, no client of ours.
- :class:`ScriptedRuntime`: an in-process instance runtime whose workloads end when the test
  says, recording every spec (no sandbox).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from dask_vastai.emulator import Emulator
from dask_vastai.emulator.runtime import SandboxEndpoints, SandboxSpec


def call(emu: Emulator, method: str, path: str, body: dict | None = None, key: str | None = None,
         auth: str = "bearer") -> tuple[int, Any, dict[str, str]]:
    """(status, parsed body or text, headers) of one API call."""
    key = emu.api_key if key is None else key
    url = emu.url + path
    headers = {}
    if auth == "bearer":
        headers["Authorization"] = f"Bearer {key}"
    elif auth == "query":
        url += ("&" if "?" in url else "?") + f"api_key={key}"
    data = None if method == "GET" else json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw, hdrs = r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except json.JSONDecodeError:
        return status, raw, hdrs


def search(emu: Emulator, **filters: Any) -> list[dict]:
    status, body, _ = call(emu, "POST", "/api/v0/bundles/", filters)
    assert status == 200, body
    return body["offers"]


def rent(emu: Emulator, offer_id: int, **fields: Any) -> int:
    status, body, _ = call(emu, "PUT", f"/api/v0/asks/{offer_id}/", {"image": "vastai/base", **fields})
    assert status == 200 and body["success"], body
    return body["new_contract"]


def show(emu: Emulator, instance_id: int) -> dict | None:
    status, body, _ = call(emu, "GET", f"/api/v0/instances/{instance_id}/?owner=me")
    assert status == 200, body
    return body["instances"]


def wait_status(emu: Emulator, instance_id: int, wanted: str, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    row = None
    while time.monotonic() < deadline:
        row = show(emu, instance_id)
        if row and row["actual_status"] == wanted:
            return row
        time.sleep(0.05)
    raise AssertionError(f"instance {instance_id} not {wanted!r} within {timeout_s} s; last row: {row}")


class ScriptedRuntime:
    """An in-process runtime whose workloads end when the test says; it records every spec."""

    def __init__(self, log: str = "", fail: str | None = None) -> None:
        self.specs: list[SandboxSpec] = []
        self.stopped: list[int] = []
        self.exit_codes: dict[int, int] = {}
        self.log = log
        self.fail = fail
        self.public_ipaddr = "127.0.0.1"

    async def start(self, spec: SandboxSpec) -> SandboxEndpoints:
        self.specs.append(spec)
        if self.fail:
            raise RuntimeError(self.fail)
        ports = {p: 41000 + i for i, p in enumerate(spec.container_ports)}
        return SandboxEndpoints(public_ipaddr="127.0.0.1", ports=ports, ssh_host="127.0.0.1", ssh_port=42022)

    async def stop(self, instance_id: int) -> None:
        self.stopped.append(instance_id)

    def exited(self, instance_id: int) -> int | None:
        return self.exit_codes.get(instance_id)

    def logs(self, instance_id: int) -> str:
        return self.log

    async def close(self) -> None:
        pass
