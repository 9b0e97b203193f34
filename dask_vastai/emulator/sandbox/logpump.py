"""A sandbox's logs, written by the host from a pipe, and capped.

The sandbox never holds a file of the host's: its container log (what the onstart or the
``args`` workload print) and its sshd log are pipes, and a thread here appends what arrives to
the file in the sandbox's state folder. A file that grows past ``max_bytes`` keeps only its
last ``keep_bytes`` (what ``vastai logs`` would show of it: the tail), so a sandbox printing
without end cannot fill the host's disk.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class LogPump:
    """Copies one pipe into one file, capped; ``writer`` is the end the sandbox gets."""

    def __init__(self, path: Path, *, max_bytes: int, keep_bytes: int) -> None:
        if not 0 < keep_bytes < max_bytes:
            raise ValueError(f"keep_bytes={keep_bytes} must be positive and below max_bytes={max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._size = path.stat().st_size if path.exists() else 0
        reader, self.writer = os.pipe()
        self._thread = threading.Thread(target=self._pump, args=(reader,), name=f"log {path}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Append ``data`` as the host (a message of the emulator's own)."""
        with self._lock:
            with open(self.path, "ab") as f:
                f.write(data)
            self._size += len(data)
            if self._size > self.max_bytes:
                self._truncate()

    def tail(self, limit: int) -> str:
        """The last ``limit`` bytes of the file, as text (never a half-rewritten file)."""
        with self._lock:
            return read_tail(self.path, limit)

    def _pump(self, reader: int) -> None:
        try:
            while chunk := os.read(reader, 1 << 16):
                self.write(chunk)
        except OSError:
            pass
        finally:
            os.close(reader)

    def _truncate(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(-self.keep_bytes, os.SEEK_END)
            tail = f.read()
        cut = tail.find(b"\n")  # start at a line
        tail = tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail
        with open(self.path, "wb") as f:
            f.write(tail)
        self._size = len(tail)

    def close_writer(self) -> None:
        """Our copy of the sandbox's end: once passed on, the pipe ends when the sandbox does."""
        if self.writer >= 0:
            os.close(self.writer)
            self.writer = -1

    def join(self, timeout_s: float) -> None:
        """Wait until everything the sandbox wrote is in the file (its processes are gone)."""
        self._thread.join(timeout_s)


def read_tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of ``path`` as text; "" when it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
