"""Close through an API outage: when Vast stays down past ``api.outage-timeout``, the user is
told which rentals may still bill, that their watchdogs destroy them within ``orphan_timeout``,
and how to run ``dask-vastai cleanup``; once Vast answers again, nothing is left rented.

Real sandboxes (each rental's on-instance watchdog is the real one), rate limits on, the
strict profile; Vast answers every call 503 (``faults.outage``) from just before close until
after it has given up. Two ways out, each a test: the watchdog (a short ``orphan_timeout``)
and the printed ``dask-vastai cleanup`` command, run as the user would, long before any
watchdog would act.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
import time

import dask.config
import pytest

from dask_vastai.emulator import Emulator
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

#: how long close keeps trying to destroy through the outage before it says what may still bill
OUTAGE_TIMEOUT_S = 4
#: what close may add to that: the scheduler's and the tunnels' own close (about 0.1 s unloaded)
CLOSE_SLACK_S = 10


def _close_during_outage(emu: Emulator, caplog: pytest.LogCaptureFixture, name: str,
                         orphan_timeout: int) -> tuple[list[int], str, float]:
    """A cluster of 1 booted, then closed while Vast answers 503: its rental ids, the ERROR it said, and
    when (monotonic) the client's last link to the instance went (its watchdog's clock starts then)."""
    from dask_vastai import VastAICluster

    caplog.set_level(logging.ERROR)
    # retries capped at 2 s apart; close's one round of destroys ends OUTAGE_TIMEOUT_S after it began
    with dask.config.set({"vastai.api.outage-timeout": OUTAGE_TIMEOUT_S, "vastai.api.backoff-max": 2}):
        cluster = VastAICluster(gpu="RTX_3090", n=1, api_url=emu.url, api_key=emu.api_key, name=name,
                                boot_timeout=240, orphan_timeout=orphan_timeout, quiet=True)
        try:
            cluster.wait_for_workers(1, timeout=240)
            ids = sorted(cluster.broker.records)
            emu.faults.outage(600)
        finally:
            started = time.monotonic()
            cluster.close(timeout=120)
            closed = time.monotonic()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "may still bill" in errors[0], errors  # one sentence, no traceback
    print(f"\nclose gave up after {closed - started:.1f} s of outage")
    # its stated deadline (vastai.api.outage-timeout), plus the scheduler's own close
    assert closed - started <= OUTAGE_TIMEOUT_S + CLOSE_SLACK_S, closed - started
    return ids, errors[0], closed


def _check_message(message: str, ids: list[int], name: str, orphan_timeout: int) -> str:
    """The ERROR names every rental that may bill, the watchdog's deadline and the cleanup command; returns it."""
    assert all(str(i) in message for i in ids), (ids, message)
    assert "may still bill" in message and f"orphan_timeout={orphan_timeout}s" in message, message
    assert "503" in message, message  # what Vast answered
    command = re.search(r"`(dask-vastai cleanup[^`]*)`", message)
    assert command is not None and f"--cluster {name}" in command.group(1), message
    return command.group(1)


def test_close_through_an_outage_says_what_may_bill_and_the_watchdog_destroys_it(
    market: Emulator, caplog: pytest.LogCaptureFixture,
) -> None:
    orphan_timeout = 20
    ids, message, closed = _close_during_outage(market, caplog, "outwatch", orphan_timeout)
    _check_message(message, ids, "outwatch", orphan_timeout)
    assert [r["id"] for r in market.instances() if r["actual_status"] == "running"] == ids, "still rented"
    market.faults.outage(0)  # Vast is back; nobody runs anything: the watchdog must act
    wait_until(lambda: all(r["destroyed"] for r in market.meter()["instances"]), orphan_timeout + 60,
               "the watchdog to destroy the rental left behind")
    took = time.monotonic() - closed
    # Its clock started when close dropped the link, a few seconds before close returned; once it
    # ran out (Vast answers by then) it destroys at its next try, at most RETRY_MAX_S (10 s)
    # later: not a minute later, billing.
    assert took <= 30, took
    print(f"watchdog destroyed it {took:.1f} s after close (orphan_timeout {orphan_timeout} s)")


def test_close_through_an_outage_then_the_printed_cleanup_command_destroys_it(
    market: Emulator, caplog: pytest.LogCaptureFixture,
) -> None:
    orphan_timeout = 600  # the watchdog would take 10 min: the command must do it
    ids, message, _ = _close_during_outage(market, caplog, "outclean", orphan_timeout)
    command = _check_message(message, ids, "outclean", orphan_timeout)
    market.faults.outage(0)
    argv = shlex.split(command)
    assert argv[0] == "dask-vastai"
    run = subprocess.run([sys.executable, "-m", "dask_vastai.cli", *argv[1:], "--yes",
                          "--api-url", market.url, "--api-key", market.api_key],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert all(r["destroyed"] for r in market.meter()["instances"]), market.meter()["instances"]
    assert [r for r in market.instances() if r["actual_status"] == "running"] == []
