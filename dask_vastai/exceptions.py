"""Every public error of dask-vastai, under one base class.

``except DaskVastAIError`` catches anything this package raises on purpose. Each class
keeps the builtin base its callers already catch (``RuntimeError`` for a failed boot or
a missing offer, ``ConnectionError`` for the SSH link, ``TimeoutError`` for logs that never
appeared), so code written against those keeps working.

Every message is written for the user: what was wrong, the value, what to do instead.
This module imports nothing of the package, so any module may raise from it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BootFailed",
    "BudgetExceeded",
    "BudgetExhausted",
    "ClusterNotAttachable",
    "DaskVastAIError",
    "EnvironmentMismatch",
    "HostKeyMismatch",
    "ImpossibleResources",
    "InstanceNotFound",
    "InvalidAPIKey",
    "LogsNotReady",
    "MissingAPIKey",
    "NoOfferAvailable",
    "OfferUnavailable",
    "PortBusy",
    "RateLimited",
    "SSHUnreachable",
    "TunnelError",
    "VastError",
    "VastRequestError",
    "VastServerError",
    "VastUnreachable",
    "WorkerClientsDisabled",
]


class DaskVastAIError(Exception):
    """The base of every error dask-vastai raises on purpose."""


# ------------------------------------------------------------------ the Vast API
class VastError(DaskVastAIError):
    """Anything Vast (or the way to it) refused; ``.status``, ``.error`` and ``.msg`` are Vast's."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None,
                 msg: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.msg = msg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, status={self.status}, error={self.error!r})"


class MissingAPIKey(VastError):
    """No key given and none found where the vastai CLI keeps one."""


class InvalidAPIKey(VastError):
    """Vast answered 401: the key is wrong, revoked, or meant for another server."""


class OfferUnavailable(VastError):
    """The offer was rented by someone else (offers are single-use) or never existed."""

    def __init__(self, message: str, *, offer_id: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.offer_id = offer_id


class RateLimited(VastError):
    """Still refused for calling too often after every retry (or the daily search quota)."""


class InstanceNotFound(VastError):
    """The instance does not exist (destroyed, or another account's)."""


class VastServerError(VastError):
    """Vast kept answering 5xx."""


class VastRequestError(VastError):
    """Vast refused the request (a 4xx other than the ones above); ``.msg`` says why."""


class VastUnreachable(VastError):
    """No answer: connection refused, reset or timed out on every attempt."""


class LogsNotReady(VastError, TimeoutError):
    """The logs Vast promised never appeared at their URL in time."""


# ------------------------------------------------------------------ renting and booting
class NoOfferAvailable(DaskVastAIError, RuntimeError):
    """No offer matches the requirements (the message shows the query and the nearest offers)."""


class BootFailed(DaskVastAIError, RuntimeError):
    """A rental did not become a registered worker; it has been destroyed.

    Raised for one rental (a fatal Vast state, a boot timeout, GPUs missing) and by the
    cluster when its first instances could not start (the cause is chained).
    """


class EnvironmentMismatch(DaskVastAIError, RuntimeError):
    """An instance's Python or packages cannot match this client's; the message names both."""


class ClusterNotAttachable(DaskVastAIError, NotImplementedError):
    """``VastAICluster.from_name``: a cluster lives in the process that made it."""


class ImpossibleResources(DaskVastAIError):
    """A task asks for resources no pool of the cluster can provide."""


# ------------------------------------------------------------------ spending caps
class BudgetExceeded(DaskVastAIError, RuntimeError):
    """A rental was refused: it would take the cluster past ``max_hourly`` or ``max_cost``.

    The message names the cap, the cluster's rate or spend now and the offer's rate.
    """


class BudgetExhausted(BudgetExceeded):
    """The cluster's ``max_cost`` is reached: its rentals were destroyed, and every task that
    was still queued or running fails with this error (the message names the cap)."""


# ------------------------------------------------------------------ the SSH link
class TunnelError(DaskVastAIError, ConnectionError):
    """The SSH link to an instance could not be made, or a forward could not be set up."""


class SSHUnreachable(TunnelError):
    """No SSH server answered at an endpoint at all (connections refused or timing out)."""


class PortBusy(TunnelError):
    """A port chosen for a worker is taken somewhere (client or instance); pick another."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


class HostKeyMismatch(TunnelError):
    """An instance's SSH endpoint presented a host key other than the one pinned for it.

    Pinned: the keys its sshd printed into the instance's log (read through Vast's API), or
    the first key seen where the log had none in time. Someone else answers at that address;
    nothing was sent to it.
    """


# ------------------------------------------------------------------ the trust boundary
class WorkerClientsDisabled(DaskVastAIError, PermissionError):
    """A task asked for a client (``get_client()``, ``worker_client()``) on a host of a cluster
    that does not let hosts act as clients (``allow_worker_clients``, off by default)."""
