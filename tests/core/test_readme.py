"""Every code block of README.md runs as written, so the README stays true.

The README's "Try it locally" block starts an emulator and exports the two variables that
point dask-vastai at it; the test runs that block as it is, keeps the emulator for the
module, and runs every other block with those variables, as a reader who followed the
README would: Python blocks as scripts, shell blocks with bash, YAML blocks parsed. Blocks
that install system packages or run the suite itself are skipped, each listed in
``SKIPPED`` with its reason. After each block nothing may be left rented.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers.sandbox import SANDBOX_OK, SANDBOX_WHY
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

#: text that marks a block the test does not run -> why
SKIPPED = {
    "apt-get install": "installs system packages (openssh-server) as root; .ci/run does that install",
    "python3 -m pytest": "runs the test suite itself (the suite is what runs this test)",
    "DASK_VASTAI_REAL=1": "rents on the real Vast.ai with the reader's own key (the same module runs "
                          "against the emulator's strict profile in the suite: tests/core/test_real_vast.py)",
}
#: the block that starts the emulator every other block talks to
EMULATOR_BLOCK = "dask-vastai emulator"


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(line=text[: m.start()].count("\n") + 1, lang=m.group(1), text=m.group(2))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    ]


def _skip_reason(block: Block) -> str:
    return "; ".join(why for marker, why in SKIPPED.items() if marker in block.text)


def _port(block: Block) -> int:
    found = re.search(r"--port (\d+)", block.text)
    assert found, f"{block.id}: the emulator block should name its port, so the exports can"
    return int(found.group(1))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _rentals_left(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "ls"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return "" if "no dask-vastai rentals" in done.stdout else done.stdout


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment after the README's emulator block ran; the emulator stops at the end."""
    if not SANDBOX_OK:
        pytest.skip(SANDBOX_WHY)
    block = next(b for b in readme_blocks() if EMULATOR_BLOCK in b.text)
    port = _port(block)
    assert not _listening(port), f"port {port} is taken (an emulator from the README left running?)"
    tmp = tmp_path_factory.mktemp("readme")
    env_file = tmp / "env"
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            # `dask-vastai` and `python3` are this interpreter's, as for a reader whose virtualenv is active
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    # The block as written, then the environment it leaves, NUL-separated.
    shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", f"{block.text}\nenv -0 > {env_file}"],
                             env=base, cwd=tmp, start_new_session=True,
                             stdout=open(tmp / "emulator.log", "w"), stderr=subprocess.STDOUT)
    try:
        assert shell.wait(timeout=60) == 0, (tmp / "emulator.log").read_text()
        env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
        wait_until(lambda: _listening(port), 60, f"the README's emulator on port {port}")
        yield env
    finally:
        # The emulator is the shell's background job: same process group.
        try:
            os.killpg(shell.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 60
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.25)


BLOCKS = readme_blocks()


def test_the_readme_has_the_blocks_it_promises() -> None:
    langs = {b.lang for b in BLOCKS}
    assert langs <= {"python", "bash", "yaml"}, f"a block kind this test cannot run: {langs}"
    assert any(EMULATOR_BLOCK in b.text for b in BLOCKS)
    assert sum(b.lang == "python" for b in BLOCKS) >= 3
    assert "docs/widget.png" in README.read_text() and (ROOT / "docs" / "widget.png").is_file()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, readme_env: dict[str, str], tmp_path: Path) -> None:
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    if EMULATOR_BLOCK in block.text:
        # It ran in the fixture: the two exports point at the emulator it started.
        assert readme_env["DASK_VASTAI__API_URL"] == f"http://127.0.0.1:{_port(block)}"
        assert readme_env["VAST_API_KEY"]
        return
    if block.lang == "yaml":
        assert yaml.safe_load(block.text) is not None
        return
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(block.text)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.text]
    done = subprocess.run(command, env=readme_env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert " - INFO - " not in done.stderr, done.stderr[-2000:]
    assert _rentals_left(readme_env) == "", f"{block.id} left rentals"
