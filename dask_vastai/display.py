"""Tables a user reads: one set of columns and rows, three renderings.

``cluster.instances``, ``cluster.offers()`` and the cluster widget show tables. Each is a
:class:`TextTable` rendered where it is looked at: HTML in a notebook (``_repr_html_``), a
``rich`` table in a terminal (``__rich__``: ``rich.print``, rich's pretty REPL) and aligned
plain text otherwise (``str``, logs, error messages). Money and durations are written once
here, so that every view spells ``$0.167/h`` and ``2m05s`` alike.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def usd(value: float | None) -> str:
    """Dollars: cents for large sums, fractions of a cent for the small sums of a short run.

    Below a cent, four significant digits (``$0.0004457``, not ``$0.0004``): a short run's
    bill is read against the meter, and a fixed four decimals would be 10% off there.
    """
    if value is None:
        return "-"
    if abs(value) >= 1:
        return f"${value:.2f}"
    if 0 < abs(value) < 0.01:
        return f"${value:.{3 - math.floor(math.log10(abs(value)))}f}"
    return f"${value:.4f}"


def usd_per_hour(value: float | None) -> str:
    return "-" if value is None else f"${value:.3f}/h"


def duration(seconds: float | None) -> str:
    """``42s``, ``2m05s``, ``1h02m``: what a person reads at a glance."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def data_size(n_bytes: float | None) -> str:
    """Bytes as a network bill reads them (powers of 1000, as Vast's $/GB): ``12 kB``, ``1.20 GB``."""
    if n_bytes is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= size:
            value = n_bytes / size
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n_bytes)} B"


def shorten(text: str | None, width: int = 70) -> str:
    """One line of at most ``width`` characters (Vast's status messages can be long)."""
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


#: the look of our HTML tables; inline, as notebook front-ends strip <style> in some views
TABLE_STYLE = "border-collapse: collapse; font-size: 0.9em; text-align: left;"
CELL_STYLE = "padding: 2px 8px; text-align: left; vertical-align: top; white-space: nowrap;"
HEAD_STYLE = CELL_STYLE + " border-bottom: 1px solid #999;"
WRAP_STYLE = "padding: 2px 8px; text-align: left; vertical-align: top; min-width: 16em;"
#: a cell's tone, as CSS and as a rich style: "ok" (registered), "busy" (booting), "bad", "dim"
TONES_CSS = {"ok": "color: #1a7f37;", "busy": "color: #b35900;", "bad": "color: #c62828;", "dim": "color: #888;"}
TONES_RICH = {"ok": "green", "busy": "dark_orange", "bad": "red", "dim": "dim"}


@dataclass(frozen=True)
class TextTable:
    """Columns and rows of strings, with a title above and notes below."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    title: str = ""
    notes: Sequence[str] = ()
    #: shown instead of an empty table
    empty: str = "(none)"
    #: per row, per cell: a tone ("ok", "busy", "bad", "dim") or "" (parallel to ``rows``)
    tones: Sequence[Sequence[str]] = ()

    def _tone(self, r: int, c: int) -> str:
        return self.tones[r][c] if r < len(self.tones) and c < len(self.tones[r]) else ""

    def html(self) -> str:
        esc = html.escape
        parts = []
        if self.title:
            parts.append(f"<div style='font-weight: bold; margin: 4px 0;'>{esc(self.title)}</div>")
        if self.rows:
            last = len(self.columns) - 1  # the free text (a status message) may wrap
            head = "".join(f"<th style='{HEAD_STYLE}'>{esc(c)}</th>" for c in self.columns)
            body = "".join(
                "<tr>" + "".join(
                    f"<td style='{CELL_STYLE if c < last else WRAP_STYLE} {TONES_CSS.get(self._tone(r, c), '')}'>"
                    f"{esc(str(v))}</td>"
                    for c, v in enumerate(row)
                ) + "</tr>"
                for r, row in enumerate(self.rows)
            )
            parts.append(f"<table style='{TABLE_STYLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            parts.append(f"<div><i>{esc(self.empty)}</i></div>")
        parts += [f"<div>{esc(n)}</div>" for n in self.notes]
        return "\n".join(parts)

    def rich(self) -> Any:
        """A ``rich`` renderable (title, table, notes)."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(*self.columns, title=self.title or None, title_justify="left")
        for r, row in enumerate(self.rows):
            table.add_row(*(Text(str(v), style=TONES_RICH.get(self._tone(r, c), "")) for c, v in enumerate(row)))
        body: Any = table if self.rows else Text(f"{self.title}\n{self.empty}" if self.title else self.empty)
        return Group(body, *(Text(n) for n in self.notes))

    def text(self) -> str:
        """Aligned plain text, no colour, no box drawing."""
        lines = [self.title] if self.title else []
        if self.rows:
            cells = [list(self.columns)] + [[str(v) for v in row] for row in self.rows]
            widths = [max(len(r[k]) for r in cells) for k in range(len(self.columns))]
            for r in cells:
                lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        else:
            lines.append(self.empty)
        lines += list(self.notes)
        return "\n".join(lines)
