"""Load the shipped defaults into ``dask.config`` once, at import.

As in dask-jobqueue, every option has exactly one default, in ``vastai.yaml``; code
reads it with ``dask.config.get("vastai.<key>", override_with=value)`` and nowhere else.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_DEFAULTS_PATH = os.path.join(os.path.dirname(__file__), "vastai.yaml")

with open(_DEFAULTS_PATH) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def option(key: str, value: Any = None) -> Any:
    """The value of option ``key``: ``value`` when given, else the configured default."""
    return dask.config.get(f"vastai.{key}", override_with=value)
