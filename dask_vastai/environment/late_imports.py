"""What was imported too late to travel: a warning before a worker dies of it.

Each boot ships the local modules imported by then, so a module imported after the
instances booted (``import mylib`` in a notebook cell run after the cluster's) is not on
their workers, and distributed kills a worker that cannot unpickle a task's function. The
scheduler runs in the client's process, so :class:`LateImportWarning` can see the module of
each task's function when a graph arrives, and say so before that happens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .shipping import local_modules

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

# The step keeps the one logger it had as a module, so that what filters on its name still works.
logger = logging.getLogger("dask_vastai.environment")


class LateImportWarning(SchedulerPlugin):
    """Warns, when a graph arrives, about tasks whose function lives in a module shipped too late.

    A module imported after the instances booted (``import mylib`` in a notebook cell after
    the cluster's) is not on their workers, and distributed kills a worker that cannot
    unpickle a task's function (the task then waits for a worker that never comes). The
    scheduler runs in the client's process, so it can see the function's module and say so
    before that happens. Instances booted later get the module.
    """

    name = "dask-vastai-late-imports"

    def __init__(self, shipped: Callable[[], frozenset[str] | None]) -> None:
        self.shipped = shipped
        self.warned: set[str] = set()

    def update_graph(self, scheduler: Scheduler, *, tasks: Iterable[Any] = (), **kwargs: Any) -> None:
        shipped = self.shipped()
        if shipped is None:  # no instance booted yet: each boot ships what is imported then
            return
        for key in tasks:
            ts = scheduler.tasks.get(key)
            func = getattr(getattr(ts, "run_spec", None), "func", None)
            top = str(getattr(func, "__module__", "") or "").split(".")[0]
            if not top or top in shipped or top in self.warned or top not in sys.modules:
                continue
            local = local_modules({top: sys.modules[top]})
            if not local:
                continue  # installed from an index: the image has it or the user's packages do
            self.warned.add(top)
            where = local[0].path
            logger.warning(
                "task %s calls %s.%s, but %s was imported after the instances booted, so their workers "
                "cannot import it (a worker that cannot unpickle a task dies). Import %s before starting "
                "the cluster, or run client.upload_file(%r) first; instances booted from now on get it",
                key, top, getattr(func, "__name__", "?"), top, top,
                where if where.endswith(".py") else where + " (zipped)",
            )
