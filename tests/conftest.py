"""Fixtures shared by the suite: a started emulator, and the official CLI as oracle.

- ``emulator``: records-only runtime, no rate limits, no boot delay: a control plane that
  answers at once, for tests of what clients send and read.
- ``emulator_rate_limited``: the same with Vast's per-endpoint intervals on (429s).
- ``oracle``: ``oracle.cli(*args, emu=emu)`` runs ``vastai --url emu.url --api-key
  emu.api_key ARGS`` from the oracle virtualenv (built once, see ``tests/helpers/oracle.py``).
- ``fake_vast``: a :class:`~tests.helpers.fake_vast.FakeVast` on 127.0.0.1, shut down after.
- ``sandbox``: skips, loudly, where real sandboxes cannot run; ``market``: an emulator with them,
  rate limits on and the **strict** profile (every defensible variant of Vast's undocumented
  behaviour, ``docs/emulator-variants.md``): the tests' default marketplace. A test that
  contradicts a strict variant by design pins it off (``market.variants.set(...)``), saying why.

The doubles and helpers themselves live in ``tests/helpers/``; this file only makes fixtures,
and gives Ctrl-C back to a suite started in the background (below).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest

from dask_vastai.emulator import Emulator
from tests.helpers.fake_vast import FakeVast
from tests.helpers.oracle import Oracle
from tests.helpers.sandbox import SANDBOX_OK, SANDBOX_WHY

# A suite started in the background of a non-interactive shell (``bash -c '... &'``, some CI
# runners) gets SIGINT ignored, and every process it starts inherits that: the tests that press
# Ctrl-C on a snakemake run or a cluster script would wait for an exit that never comes. A
# handler here (in the controller and in each xdist worker) becomes SIGINT's default in them.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Under the strict profile a quarter of the hosts drop SYNs on their direct SSH port. A healthy
#: emulated port accepts at once, so the suite gives a silent one 5 s (the default, 45 s, covers
#: SYN retransmissions on real networks) before the proxy is tried; subprocesses read the env.
TEST_SSH_DIRECT_TIMEOUT_S = 5
os.environ.setdefault("DASK_VASTAI__SSH_DIRECT_TIMEOUT", str(TEST_SSH_DIRECT_TIMEOUT_S))
dask.config.set({"vastai.ssh-direct-timeout": float(os.environ["DASK_VASTAI__SSH_DIRECT_TIMEOUT"])})
#: A healthy emulated direct worker port answers the probe within a second; a blocked one costs this.
TEST_DIRECT_PROBE_TIMEOUT_S = 3
os.environ.setdefault("DASK_VASTAI__DIRECT_PROBE_TIMEOUT", str(TEST_DIRECT_PROBE_TIMEOUT_S))
dask.config.set({"vastai.direct-probe-timeout": float(os.environ["DASK_VASTAI__DIRECT_PROBE_TIMEOUT"])})


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0) as emu:
        yield emu


@pytest.fixture
def emulator_rate_limited() -> Iterator[Emulator]:
    with Emulator(runtime="record", rate_limits=True, boot_delay_s=0) as emu:
        yield emu


@pytest.fixture
def fake_vast() -> Iterator[FakeVast]:
    """Where an instance's watchdog destroys its own rental: records the DELETEs, answers 200."""
    with FakeVast() as vast:
        yield vast


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture
def sandbox() -> None:
    """Skip, loudly, where the emulator's real sandboxes cannot run (not Linux, no user namespaces)."""
    if not SANDBOX_OK:
        pytest.skip(SANDBOX_WHY)


@pytest.fixture
def market(sandbox: None, tmp_path: Path) -> Iterator[Emulator]:
    """An emulator with real sandboxes, Vast's rate limits and the strict profile: the user's marketplace."""
    with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=tmp_path / "emu",
                  profile="strict") as emu:
        yield emu

