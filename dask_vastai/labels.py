"""The label every rental carries: ``dask-vastai:<cluster>:<worker>``.

Labels are how leftovers are found after a crash (``dask-vastai ls/cleanup``), so the
format lives in one place. Vast allows 1024 characters; names are kept short.
"""

from __future__ import annotations

LABEL_PREFIX = "dask-vastai:"


def rental_label(cluster: str, worker: str) -> str:
    """The label of the rental that runs ``worker`` of ``cluster``."""
    return f"{LABEL_PREFIX}{cluster}:{worker}"


def cluster_label_prefix(cluster: str) -> str:
    """The prefix shared by every rental of ``cluster``."""
    return f"{LABEL_PREFIX}{cluster}:"


def parse_label(label: str) -> tuple[str, str]:
    """``(cluster, worker)`` of a dask-vastai label, or ``("", "")`` for any other label."""
    if not label.startswith(LABEL_PREFIX):
        return "", ""
    cluster, _, worker = label[len(LABEL_PREFIX) :].partition(":")
    return cluster, worker
