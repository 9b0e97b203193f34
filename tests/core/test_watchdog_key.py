"""Where the watchdog finds ``CONTAINER_API_KEY``, and what it does without one.

SSH sessions do not see the container's environment on Vast, so the key is looked for in
the watchdog's own environment (the onstart's), the container's init (``/proc/1/environ``)
and the files Vast's images write the launch environment into (``/etc/environment``). A
template that injects no key leaves the instance without a backstop: the loader says so and
keeps waiting for a client (a late one can still start its workers), and the client warns.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest

from dask_vastai.bootstrap import LOADER, supervisor_program
from tests.core.test_bootstrap import _start
from tests.helpers.fake_vast import FakeVast
from tests.helpers.waiting import wait_until


def supervisor_module(tmp_path: Path) -> ModuleType:
    """The supervisor as installed on an instance, imported here."""
    path = tmp_path / "supervisor.py"
    path.write_bytes(supervisor_program())
    spec = importlib.util.spec_from_file_location("installed_supervisor", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_key_is_found_in_the_environment_files_vasts_images_write(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sup = supervisor_module(tmp_path)
    monkeypatch.delenv("CONTAINER_API_KEY", raising=False)
    monkeypatch.setenv("CONTAINER_ID", "4242")
    etc = tmp_path / "environment"
    monkeypatch.setattr(sup, "ENV_FILES", (str(etc),))
    monkeypatch.setattr(sup, "_proc1_environ", dict)  # this machine's init is no container's
    assert sup.container_api_key() == (None, "4242", None)
    # as vast-ai/base-image's 10-prep-env.sh writes it
    etc.write_text('# Template controlled environment for C.4242\nPATH="/usr/bin"\nCONTAINER_ID="4242"\n'
                   'CONTAINER_API_KEY="k-from-file"\nexport OTHER=\'x y\'\n')
    assert sup.container_api_key() == (str(etc), "4242", "k-from-file")
    monkeypatch.setattr(sup, "_proc1_environ", lambda: {"CONTAINER_ID": "4242", "CONTAINER_API_KEY": "k-init"})
    assert sup.container_api_key() == ("/proc/1/environ", "4242", "k-init")
    monkeypatch.setenv("CONTAINER_API_KEY", "k-env")
    assert sup.container_api_key() == ("environment", "4242", "k-env")


def test_a_loader_without_a_key_says_so_and_still_hands_over_to_a_late_client(tmp_path: Path,
                                                                             fake_vast: FakeVast) -> None:
    vast = fake_vast
    proc = _start(["-"], tmp_path, vast.url, orphan_s=1, env={"CONTAINER_API_KEY": ""})
    proc.stdin.write(LOADER.encode())
    proc.stdin.close()
    log = tmp_path / "dask-vastai.log"
    try:
        wait_until(lambda: log.exists() and "no CONTAINER_API_KEY" in log.read_text(), 15, "the loader to give up")
        time.sleep(1.5)
        assert proc.poll() is None and vast.deletes == [], "nothing to destroy with: it waits on"
        (tmp_path / "state" / "supervisor.py").write_bytes(supervisor_program())  # the client, late
        wait_until(lambda: "supervisor: watching" in log.read_text(), 10, "the supervisor to take over")
        assert "dask-vastai cleanup" in log.read_text()
    finally:
        proc.kill()


def test_heartbeats_keep_the_loader_from_destroying_a_rental_whose_client_is_still_probing(
    tmp_path: Path, fake_vast: FakeVast
) -> None:
    vast = fake_vast
    proc = _start(["-"], tmp_path, vast.url, orphan_s=1.5)
    proc.stdin.write(LOADER.encode())
    proc.stdin.close()
    heartbeat = tmp_path / "state" / "heartbeat"
    try:
        for _ in range(8):  # 4 s of beats, longer than the orphan timeout, before the supervisor comes
            heartbeat.write_text(str(time.time()))
            time.sleep(0.5)
        assert proc.poll() is None and vast.deletes == []
        wait_until(lambda: proc.poll() is not None, 20, "the loader to destroy once the beats stop")
        assert vast.deletes == [("/api/v0/instances/4242/", "Bearer k-4242")]
    finally:
        proc.kill()
