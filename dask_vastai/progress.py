"""What a cluster tells its user while it works: its log lines and the boot of each instance.

An image can take minutes to load on Vast, so silence between "rented" and "registered"
reads as a hang. Where the user is decides how progress is shown:

* a terminal: a ``rich`` live table of the booting instances (phase, time in it, time since
  asked for, Vast's status message such as the image pull), log lines printed above it;
* a notebook: the same table as an HTML display updated in place while the first
  instances boot (the cluster widget takes over once displayed), log lines as plain
  output on stdout, never red stderr;
* anything else (a pipe, a log file): one plain line per phase change, prefixed with the
  seconds since the cluster was made;
* ``quiet=True``: nothing (``cluster.get_logs()`` still has the log lines).

The :class:`Progress` is refreshed by a periodic callback on the cluster's event loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from .display import TextTable, duration, shorten
from .status import BOOTING, InstanceRow, InstanceTable, Phase

Mode = Literal["quiet", "terminal", "notebook", "lines"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def choose_mode(quiet: bool, stream: Any = None) -> Mode:
    if quiet:
        return "quiet"
    if in_notebook():
        return "notebook"
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "terminal" if isatty is not None and isatty() else "lines"


def boot_table(rows: list[InstanceRow]) -> TextTable:
    """The booting instances: phase, time in it, time since asked for, Vast's message."""
    return TextTable(
        ("instance", "rental", "GPU", "phase", "in phase", "since asked", "status"),
        [
            [r.name, "-" if r.id is None else str(r.id), r.gpu, str(r.phase), duration(r.in_phase_s),
             duration(r.elapsed_s), shorten(r.detail, 60)]
            for r in rows
        ],
        title=f"booting {len(rows)} instance(s)",
    )


class Progress:
    """Prints the cluster's log lines and shows its instances booting, as ``mode`` says."""

    def __init__(
        self, rows: Callable[[], InstanceTable], *, mode: Mode, message_every_s: float = 30.0
    ) -> None:
        self.rows = rows
        self.mode = mode
        self.message_every_s = message_every_s
        self.t0 = time.monotonic()
        self._live: Any = None
        self._handle: Any = None
        #: lines mode: per (name, rental) the phase and message last printed, and when
        self._printed: dict[tuple[str, int | None], tuple[Phase, str, float]] = {}

    # ------------------------------------------------------------------ lines
    def _stamp(self, message: str) -> str:
        return f"[{time.monotonic() - self.t0:.1f}s] {message}"

    def log(self, message: str) -> None:
        """One of the cluster's log lines, where the user reads them."""
        if self.mode == "quiet":
            return
        if self._live is not None:
            self._live.console.print(self._stamp(message), markup=False, highlight=False)
        else:
            print(self._stamp(message), file=sys.stdout, flush=True)

    # --------------------------------------------------------------- refresh
    def refresh(self) -> None:
        """Show where the instances stand (called periodically on the cluster's loop)."""
        if self.mode == "quiet":
            return
        rows = list(self.rows())
        booting = [r for r in rows if r.phase in BOOTING]
        if self.mode == "terminal":
            self._refresh_terminal(booting)
        elif self.mode == "notebook":
            self._refresh_notebook(rows, booting)
        else:
            self._print_changes(rows)

    def _print_changes(self, rows: list[InstanceRow]) -> None:
        now = time.monotonic()
        for r in rows:
            # Registered, failed and destroyed are said by the cluster's own log lines.
            if r.phase not in BOOTING:
                continue
            key = (r.name, r.id)
            last = self._printed.get(key)
            changed = last is None or last[0] != r.phase
            # Vast's message (the image pull) when it first comes, then at most every so often.
            news = last is not None and r.detail and r.detail != last[1] and (
                not last[1] or now - last[2] >= self.message_every_s)
            if not (changed or news):
                continue
            where = f" (instance {r.id})" if r.id is not None else ""
            detail = f": {shorten(r.detail, 100)}" if r.detail else ""
            print(self._stamp(f"{r.name}{where}: {r.phase}{detail}"), file=sys.stdout, flush=True)
            self._printed[key] = (r.phase, r.detail, now)

    def _refresh_terminal(self, booting: list[InstanceRow]) -> None:
        if booting and self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                boot_table(booting).rich(), console=Console(), auto_refresh=False, transient=True
            )
            self._live.start()
        if self._live is None:
            return
        if booting:
            self._live.update(boot_table(booting).rich(), refresh=True)
        else:
            self._stop_live()

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def show_in_notebook(self) -> None:
        """Display the boot table in the running cell (call from the kernel's thread)."""
        if self.mode != "notebook" or self._handle is not None:
            return
        from IPython.display import HTML, display

        self._handle = display(HTML(boot_table([]).html()), display_id=True)

    def _refresh_notebook(self, rows: list[InstanceRow], booting: list[InstanceRow]) -> None:
        if self._handle is None:
            return
        from IPython.display import HTML

        if booting:
            self._handle.update(HTML(boot_table(booting).html()))
        else:
            # Booted: what remains in the cell is the instances as they ended up.
            self._handle.update(HTML(InstanceTable(rows)._repr_html_()))
            self._handle = None

    def close(self) -> None:
        """A last refresh, then stop any live display."""
        try:
            self.refresh()
        finally:
            self._stop_live()
            self._handle = None
