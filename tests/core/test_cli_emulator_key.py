"""The emulator's key and URL: printed as lines to paste, and an emulator key sent to Vast caught at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dask_vastai import InvalidAPIKey, VastAICluster


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_VASTAI", "VAST_API_KEY"))}
    return {**env, **extra}


def test_the_emulators_export_lines_point_the_cli_at_it() -> None:
    emu = subprocess.Popen([sys.executable, "-m", "dask_vastai.cli", "emulator", "--runtime", "record"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_clean_env())
    try:
        exports = {}
        while not (line := emu.stdout.readline().strip()).startswith("Ctrl-C"):
            assert line or emu.poll() is None, "the emulator stopped before printing its lines"
            if line.startswith("export "):
                name, value = line.removeprefix("export ").split("=", 1)
                exports[name] = value
        assert set(exports) == {"VAST_API_KEY", "DASK_VASTAI__API_URL"}, exports
        assert exports["VAST_API_KEY"].startswith("emu-"), "emulator keys are recognisable"
        # Pasted as printed: nothing else is needed.
        proc = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "offers", "--gpu", "RTX_3090"],
                              capture_output=True, text=True, timeout=60, env=_clean_env(**exports))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "RTX 3090" in proc.stdout
    finally:
        emu.send_signal(signal.SIGTERM)
        emu.wait(timeout=30)


def test_an_emulator_key_against_vast_fails_at_once_with_the_export_lines() -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "ls"], capture_output=True, text=True,
                          timeout=60, env=_clean_env(VAST_API_KEY="emu-0123456789abcdef0123456789abcdef"))
    elapsed = time.monotonic() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    assert "dask-vastai emulator" in text and "export DASK_VASTAI__API_URL=" in text, text
    assert "0123456789abcdef" not in text, "the key itself is not printed"
    assert elapsed < 15, f"answered without a round trip to Vast, in {elapsed:.1f}s (interpreter start included)"
    # The library says the same, at construction.
    with pytest.raises(InvalidAPIKey, match="DASK_VASTAI__API_URL"):
        VastAICluster(api_key="emu-0123456789abcdef0123456789abcdef", api_url="https://console.vast.ai")
