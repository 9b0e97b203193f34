"""Fixtures of the emulator's tests (the suite's own are in ``tests/conftest.py``).

- ``key``: an OpenSSH key pair (the private key's path; ``.pub`` next to it), as a Vast user
  makes one to log in to their instances.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path
