"""Boot progress in a terminal (a pseudo-terminal: a live table per instance) and in a pipe (plain lines).

A script rents two instances from an emulator whose boot delay (the image "pull") lasts a
few seconds; what it prints is read as a user's terminal or log file would get it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _script(tmp_path: Path, boot_delay_s: float) -> Path:
    path = tmp_path / "boot.py"
    path.write_text(textwrap.dedent(f"""
        from dask_vastai import VastAICluster
        from dask_vastai.emulator import Emulator

        with Emulator(runtime="sandbox", boot_delay_s={boot_delay_s}, state_dir={str(tmp_path / "emu")!r}) as emu:
            with VastAICluster(gpu="RTX_3090", n=2, name="tty", api_url=emu.url, api_key=emu.api_key,
                               boot_timeout=150) as cluster:
                print("UP", sorted(r["state"] for r in cluster.instances), flush=True)
            print("LEFT", len(emu.instances()), flush=True)
    """))
    return path


def _env() -> dict[str, str]:
    # Without COLUMNS/LINES (pytest's workers may set them): the script sizes its table by its pty.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_a_terminal_shows_each_instance_moving_through_its_phases(sandbox, tmp_path) -> None:
    child = pexpect.spawn(sys.executable, [str(_script(tmp_path, 3.0))], env=_env(), cwd=str(tmp_path),
                          dimensions=(60, 200), encoding="utf-8", codec_errors="replace", timeout=240)
    child.expect(pexpect.EOF)
    raw = child.before
    child.close()
    assert child.exitstatus == 0, raw[-3000:]
    assert "\x1b[" in raw, "a terminal gets a live display (cursor movement)"
    text = ANSI.sub("", raw)
    assert "UP ['registered', 'registered']" in text and "LEFT 0" in text, text[-3000:]
    assert " - INFO - " not in text
    # Rows of the live table: │ tty-0 │ 7000001 │ 1x RTX 3090 │ loading image │ 2s │ ...
    row = re.compile(r"│ (tty-\d)\s+│ [-\d]+\s+│ [^│]+│ ([a-z ]+?)\s+│ (\d+)s\s+│")
    seen: dict[str, list[tuple[str, int]]] = {}
    for name, phase, in_phase in row.findall(text):
        seen.setdefault(name, []).append((phase, int(in_phase)))
    assert set(seen) == {"tty-0", "tty-1"}, text[-3000:]
    order = ["renting", "loading image", "connecting", "installing", "starting workers"]
    for name, frames in seen.items():
        phases = [p for p, _ in frames]
        assert all(p in order for p in phases), phases
        assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases
        assert "loading image" in phases and any(p in phases for p in order[2:]), (name, phases)
        # While the image loads, the time in the phase counts up on screen.
        loading = {s for p, s in frames if p == "loading image"}
        assert len(loading) >= 2, (name, frames)
    assert "Pulling image" in text
    for name in ("tty-0", "tty-1"):
        assert re.search(rf"\[\d+\.\ds\] {name}: instance \d+ ready", text), text[-3000:]


def test_a_pipe_gets_plain_lines_for_each_phase(sandbox, tmp_path) -> None:
    done = subprocess.run([sys.executable, str(_script(tmp_path, 1.0))], env=_env(), cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    out = done.stdout
    assert done.returncode == 0, out[-3000:]
    assert "\x1b" not in out and "│" not in out
    assert " - INFO - " not in out
    for name in ("tty-0", "tty-1"):
        # With Vast's status message (the pull, then the container start) when the poll had one.
        assert re.search(rf"^\[\d+\.\ds\] {name} \(instance \d+\): loading image(: .+)?$", out, re.M), out
        assert re.search(rf"^\[\d+\.\ds\] {name} \(instance \d+\): installing$", out, re.M), out
        assert re.search(rf"^\[\d+\.\ds\] {name}: instance \d+ ready", out, re.M), out
        # One line per phase, not one per refresh.
        assert len(re.findall(rf"{name} \(instance \d+\): installing", out)) == 1, out
    assert "UP ['registered', 'registered']" in out and "LEFT 0" in out
