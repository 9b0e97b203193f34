"""Dask clusters whose workers are rented Vast.ai GPUs.

``VastAICluster`` is imported lazily so that ``import dask_vastai`` (the CLI, the emulator)
does not pay for distributed's import. Every public error is importable from here
(``from dask_vastai import NoOfferAvailable``) and derives from :class:`DaskVastAIError`.
"""

from __future__ import annotations

from typing import Any

from . import config  # noqa: F401  (registers the vastai: defaults with dask.config)
from . import exceptions as _exceptions
from .exceptions import *  # noqa: F403  (the public errors; their list is exceptions.__all__)

__version__ = "0.1.0.dev0"

__all__ = ["Secret", "VastAICluster", "__version__", *_exceptions.__all__]  # noqa: F405  (the first two are lazy)


def __getattr__(name: str) -> Any:
    if name == "VastAICluster":
        from .cluster import VastAICluster

        return VastAICluster
    if name == "Secret":
        from .environment import Secret

        return Secret
    raise AttributeError(f"module 'dask_vastai' has no attribute {name!r}")
