"""Dollars and durations as users read them, wherever they are shown (CLI, Snakemake, reprs).

A rental costs fractions of a cent per minute, so a fixed two decimals would show most bills
as ``$0.00``: :func:`usd` keeps four significant digits however small the amount is.
"""

from __future__ import annotations

import math


def usd(amount: float) -> str:
    """``$0.0005521``, ``$0.1234``, ``$12.34``, ``$1234.57``: four significant digits, at least cents."""
    if amount <= 0:
        return "$0.00"
    digits = max(2, 3 - math.floor(math.log10(amount)))
    return f"${amount:.{digits}f}"


def rate(dph: float) -> str:
    """An hourly price as Vast shows it: ``$0.167/h``."""
    return f"${dph:.3f}/h"


def duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 07m``, ``3d 04h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"
