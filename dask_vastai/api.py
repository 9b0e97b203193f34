"""``VastAPI``: the one module that speaks HTTP to Vast (or to anything serving its API).

Why our own client and not the official SDK: the SDK is blocking ``requests`` (it would
stall the scheduler's event loop), retries for 0.4 s against limits of 1-5 s, pins exact
versions of cryptography/pillow/pycares, and returns loosely typed dicts
(``reference/vast_api.md`` §10). Why aiohttp rather than tornado's HTTP client (which
distributed already has): one pooled session for all calls, a timeout per request, and
async context managers that always release the connection.

What a caller can rely on:

* **Pacing, not retrying.** Vast refuses (429) a call that comes sooner than an endpoint's
  threshold after the previous call of that endpoint (create 4.5 s, destroy 3 s, ...). All
  calls of one client queue per endpoint and go out no sooner than the interval after the
  previous call's *answer* (the server stamps a call somewhere between our send and its
  answer, so counting from the answer can never be too early). N concurrent callers thus
  never trip a 429; they wait their turn. ``pace=False`` turns the queue off. The queue is
  per client: two clients of one account (two clusters, or the CLI beside a cluster) can
  still meet a 429, which the retries absorb.
* **Retries** with exponential backoff and jitter, up to ``max_attempts`` in all: a 429 (no
  Retry-After exists: wait at least the endpoint's threshold, which the plain-text body
  names), 502/503/504 and 500, timeouts and connection errors. Other 4xx are never retried.
* **Creates are never sent twice when the first may have worked.** A create that timed
  out, lost its connection after sending, or got a 500/504 may have rented. Instead of
  retrying (a double rental bills twice), the client lists rentals under the request's
  label (for up to ``ambiguous_create_grace_s`` after a timeout or 5xx, when Vast may still
  be working on it): a single create that shows up is returned as if it had answered; when
  the connection merely dropped and nothing shows up, the create is sent once more.
  Rentals of an ambiguous *bulk* create cannot be matched to offers, so they are destroyed
  before the error is raised. Without a label the error says to check the account.
* **Typed errors** (all :class:`VastError`), with Vast's ``error`` code and ``msg``, and
  messages that say what to do. The key is sent only as a Bearer header, never in a URL,
  and appears in no log line, repr or message (``***abcd`` at most).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote_plus

import aiohttp
import yarl

from .config import option
from .credentials import KEY_HELP_URL, find_api_key, mask_key
from .exceptions import (
    InstanceNotFound,
    InvalidAPIKey,
    LogsNotReady,
    MissingAPIKey,
    OfferUnavailable,
    RateLimited,
    VastError,
    VastRequestError,
    VastServerError,
    VastUnreachable,
)
from .offers import Offer
from .vast.query import search_body

__all__ = [
    "CreateRequest", "Instance", "InstanceNotFound", "InvalidAPIKey", "MissingAPIKey", "Offer",
    "OfferUnavailable", "RateLimited", "Rental", "VastAPI", "VastError", "VastRequestError",
    "VastServerError", "VastUnreachable", "DEFAULT_MIN_INTERVALS_S",
]

logger = logging.getLogger("dask_vastai.api")

#: Vast's per-endpoint thresholds (vast_api.md §2); search has none published.
DEFAULT_MIN_INTERVALS_S: Mapping[str, float] = {
    "search": 0.5,
    "create": 4.5,  # also bulk create
    "destroy": 3.0,  # also bulk destroy
    "show": 2.0,
    "list": 1.0,
    "update": 1.0,  # state and label
    "reboot": 1.0,
    "command": 1.5,
    "logs": 1.0,
    "ssh": 1.0,
    "user": 0.5,
}
#: Vast's bulk endpoints take at most this many ids per call (as the CLI splits them).
BULK_CHUNK = 64
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_AMBIGUOUS_CREATE_STATUS = frozenset({500, 504})


# ----------------------------------------------------------------------------- errors


class _AmbiguousCreate(Exception):
    """A create that may have been carried out although no answer says so.

    ``settled`` is True when the server cannot still be working on it (the connection
    dropped: nothing under the label means nothing was rented, and it is safe to send it
    again); False after a timeout or a 500/504, when it may still be in progress.
    """

    def __init__(self, why: str, *, settled: bool) -> None:
        super().__init__(why)
        self.why = why
        self.settled = settled


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CreateRequest:
    """How to rent an offer: what ``VastAI().create_instance(...)`` takes, typed.

    ``price`` is a bid ($/h): it makes the rental interruptible. ``ports`` open container
    ports (``-p N:N``). ``cancel_unavail`` makes Vast refuse (410) a machine that cannot
    start now instead of creating a rental stuck in "scheduling".
    """

    image: str
    disk_gb: float
    label: str | None = None
    onstart: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    ports: Sequence[int] = ()
    runtype: str = "ssh_direc ssh_proxy"
    args: Sequence[str] | None = None
    price: float | None = None
    cancel_unavail: bool = True

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("image is empty: name a Docker image, e.g. 'vastai/pytorch:@vastai-automatic-tag'")
        if not self.disk_gb or self.disk_gb <= 0:
            raise ValueError(f"disk_gb={self.disk_gb!r}: an instance needs a positive disk size in GB")
        if self.price is not None and not 0.001 <= self.price <= 128:
            raise ValueError(f"price={self.price!r}: a bid must be between 0.001 and 128 $/h")
        for port in self.ports:
            # Vast maps ports above 70000 to an identical random external port (vast_api.md §5).
            if not 1 <= int(port) <= 99999:
                raise ValueError(f"ports: {port!r} is not a port number (1-65535, or >70000 for identity mapping)")

    def body(self, offer_id: int | Sequence[int] | None = None) -> dict[str, Any]:
        """The JSON the SDK sends for this request (with ``ids`` when ``offer_id`` is a list: bulk)."""
        env: dict[str, str] = {f"-p {int(p)}:{int(p)}": "1" for p in self.ports}
        env.update({str(k): str(v) for k, v in self.env.items()})
        body: dict[str, Any] = {
            "client_id": "me",
            "image": self.image,
            "env": env,
            "price": self.price,
            "disk": self.disk_gb,
            "label": self.label,
            "extra": None,
            "onstart": self.onstart,
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            "cancel_unavail": self.cancel_unavail,
            "template_hash_id": None,
            "user": None,
        }
        if self.runtype:
            body["runtype"] = self.runtype
        if self.args is not None:
            body["args"] = list(self.args)
        if offer_id is not None and not isinstance(offer_id, int):
            body["ids"] = [int(i) for i in offer_id]
        return body


@dataclass(frozen=True)
class Rental:
    """What a successful create returns: the new instance's id (Vast's ``new_contract``)."""

    instance_id: int
    offer_id: int
    instance_api_key: str | None = field(default=None, repr=False)


def _host_ports(ports: Any) -> dict[int, int]:
    """``{"22/tcp": [{"HostPort": "40022"}]}`` -> ``{22: 40022}`` (TCP only)."""
    out: dict[int, int] = {}
    if not isinstance(ports, Mapping):
        return out
    for key, mappings in ports.items():
        port, _, proto = str(key).partition("/")
        if proto not in ("", "tcp") or not port.isdigit() or not mappings:
            continue
        first = mappings[0] if isinstance(mappings, list) else mappings
        host_port = first.get("HostPort") if isinstance(first, Mapping) else first
        try:
            out[int(port)] = int(host_port)
        except (TypeError, ValueError):
            continue
    return out


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Instance:
    """One rental as ``show instances`` reports it (MB, GB, $/h; ports container -> host)."""

    id: int
    label: str | None
    actual_status: str | None
    intended_status: str | None
    status_msg: str | None
    public_ipaddr: str | None
    ports: dict[int, int] = field(hash=False)
    ssh_host: str | None = None
    ssh_port: int | None = None
    num_gpus: int = 0
    gpu_name: str = ""
    gpu_ram_mb: float = 0.0
    cpu_cores_effective: float = 0.0
    cpu_ram_mb: float = 0.0
    disk_space_gb: float = 0.0
    dph_total: float = 0.0
    start_date: float | None = None
    is_bid: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> Instance:
        """An instance from a list/show row (missing fields become None/0, never KeyError)."""
        ssh_port = row.get("ssh_port")
        start = row.get("start_date")
        return cls(
            id=int(row["id"]),
            label=_opt_str(row.get("label")),
            actual_status=_opt_str(row.get("actual_status")),
            intended_status=_opt_str(row.get("intended_status")),
            status_msg=_opt_str(row.get("status_msg")),
            public_ipaddr=_opt_str(row.get("public_ipaddr")),
            ports=_host_ports(row.get("ports")),
            ssh_host=_opt_str(row.get("ssh_host")),
            ssh_port=int(ssh_port) if ssh_port not in (None, "") else None,
            num_gpus=int(_float(row.get("num_gpus"))),
            gpu_name=str(row.get("gpu_name") or ""),
            gpu_ram_mb=_float(row.get("gpu_ram")),
            cpu_cores_effective=_float(row.get("cpu_cores_effective")),
            cpu_ram_mb=_float(row.get("cpu_ram")),
            disk_space_gb=_float(row.get("disk_space")),
            dph_total=_float(row.get("dph_total")),
            start_date=_float(start) if start is not None else None,
            is_bid=bool(row.get("is_bid")),
            raw=dict(row),
        )

    def direct_ssh(self) -> tuple[str, int] | None:
        """The public IP and the host port mapped to container port 22, when the offer has one."""
        if self.public_ipaddr and 22 in self.ports:
            return self.public_ipaddr, self.ports[22]
        return None

    def proxy_ssh(self) -> tuple[str, int] | None:
        """Vast's SSH proxy endpoint (``sshN.vast.ai``, port), present on every SSH runtype."""
        if self.ssh_host and self.ssh_port:
            return self.ssh_host, self.ssh_port
        return None


# ----------------------------------------------------------------------------- pacing


class _Pacer:
    """One queue per endpoint: a call goes out no sooner than the interval after the last answer."""

    def __init__(self, intervals_s: Mapping[str, float], enabled: bool) -> None:
        self.intervals_s = dict(intervals_s)
        self.enabled = enabled
        self._locks: dict[str, asyncio.Lock] = {}
        self._next_at: dict[str, float] = {}

    def interval(self, endpoint: str) -> float:
        return self.intervals_s.get(endpoint, 0.0)

    @asynccontextmanager
    async def turn(self, endpoint: str) -> AsyncIterator[None]:
        if not self.enabled:
            delay = self._next_at.get(endpoint, 0.0) - time.monotonic()
            if delay > 0:  # a 429 seen by another caller holds everyone back
                await asyncio.sleep(delay)
            yield
            return
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            delay = self._next_at.get(endpoint, 0.0) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                yield
            finally:
                self.hold(endpoint, self.interval(endpoint))

    def hold(self, endpoint: str, seconds: float) -> None:
        """No call of ``endpoint`` before ``seconds`` from now."""
        self._next_at[endpoint] = max(self._next_at.get(endpoint, 0.0), time.monotonic() + seconds)


# ----------------------------------------------------------------------------- the client


def _body_fields(body: Any) -> tuple[str | None, str | None]:
    """Vast's ``(error, msg)`` from a JSON error body, or ``(None, text)`` for plain text."""
    if isinstance(body, Mapping):
        error = body.get("error")
        msg = body.get("msg") or body.get("message") or body.get("detail")
        return (str(error) if error else None), (str(msg) if msg else None)
    text = str(body or "").strip()
    return None, (text[:500] or None)


class VastAPI:
    """An async client for the Vast REST API: one session, paced per endpoint, typed results.

    Use as ``async with VastAPI() as api:`` or call :meth:`close`. ``api_key`` and
    ``api_url`` default to the dask config (``vastai.api-key``/``vastai.api-url``) and the
    vastai CLI's key lookup (see :mod:`dask_vastai.credentials`).
    """

    def __init__(
        self,
        api_key: str | None = None,
        api_url: str | None = None,
        *,
        pace: bool = True,
        request_timeout_s: float = 30.0,
        max_attempts: int = 8,
        min_intervals_s: Mapping[str, float] | None = None,
        backoff_s: float = 0.5,
        backoff_max_s: float = 20.0,
        logs_timeout_s: float = 30.0,
        ambiguous_create_grace_s: float = 10.0,
    ) -> None:
        key, source = find_api_key(api_key if api_key is not None else option("api-key"))
        url = str(api_url or option("api-url") or "https://console.vast.ai").strip().rstrip("/")
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"api_url={url!r} is not an http(s) URL; the default is https://console.vast.ai")
        if parsed.query_string:
            raise ValueError(f"api_url={parsed.with_query(None)!s}... must not carry a query; the key goes in api_key")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be at least 1")
        self._api_key = key
        self._key_source = source
        self.api_url: str = url
        self.request_timeout_s = float(request_timeout_s)
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.logs_timeout_s = float(logs_timeout_s)
        self.ambiguous_create_grace_s = float(ambiguous_create_grace_s)
        intervals = {**DEFAULT_MIN_INTERVALS_S, **dict(min_intervals_s or {})}
        self._pacer = _Pacer(intervals, enabled=pace)
        self._session: aiohttp.ClientSession | None = None
        self._known_ids: set[int] = set()
        from . import __version__

        self._headers = {
            "Authorization": f"Bearer {key}",
            "Accept": "application/json",
            "User-Agent": f"dask-vastai/{__version__}",
        }

    # ------------------------------------------------------------------ lifecycle
    def __repr__(self) -> str:
        return f"VastAPI(api_url={self.api_url!r}, api_key={mask_key(self._api_key)})"

    def credentials(self) -> tuple[str, str]:
        """``(api_url, api_key)``: what a fresh client needs to act for this account (exit handlers)."""
        return self.api_url, self._api_key

    async def __aenter__(self) -> VastAPI:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (idempotent)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                connector=aiohttp.TCPConnector(limit=32),
            )
            # aiohttp silently resends a PUT or DELETE once when a reused connection drops
            # (RFC 9112 allows it for idempotent methods), but Vast's PUT /asks/{id}/ rents: a
            # resent create would find its own rental and report the offer as taken, leaking
            # it. Our retries decide instead. No public switch exists; aiohttp's own test
            # client turns it off the same way.
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session

    # ------------------------------------------------------------------ plumbing
    def _url(self, path: str, query: Mapping[str, Any] | None = None) -> yarl.URL:
        """As the SDK builds it: ``/api/v0`` unless versioned, JSON-then-quote_plus query values."""
        if not re.match(r"^/api/v\d+/", path):
            path = "/api/v0" + path
        text = self.api_url + path
        if query:
            text += "?" + "&".join(
                f"{k}={quote_plus(v if isinstance(v, str) else json.dumps(v))}" for k, v in query.items()
            )
        return yarl.URL(text, encoded=True)

    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    async def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        create: bool = False,
    ) -> tuple[int, Any]:
        """``(status, parsed body)`` after pacing and retries; raises for what cannot be retried.

        ``create=True`` raises ``_AmbiguousCreate`` instead of retrying when the request may
        have been carried out.
        """
        url = self._url(path, query)
        if body is None and method != "GET":
            body = {}  # the SDK always sends a JSON body, even with DELETE
        where = f"{method} {path}"
        last_problem = ""
        for attempt in range(1, self.max_attempts + 1):
            started = time.monotonic()
            try:
                async with self._pacer.turn(endpoint):
                    started = time.monotonic()
                    async with self._get_session().request(
                        method, url, json=body, headers=self._headers, allow_redirects=False
                    ) as resp:
                        status = resp.status
                        location = resp.headers.get("Location", "?")
                        text = await resp.text()
            except (TimeoutError, aiohttp.ClientError) as e:
                sent = not isinstance(e, aiohttp.ClientConnectorError)
                problem = "timed out" if isinstance(e, TimeoutError) else f"failed: {type(e).__name__}"
                logger.debug("%s %s (attempt %d, %.0f ms)", where, problem, attempt, 1000 * (time.monotonic() - started))
                if create and sent:
                    raise _AmbiguousCreate(
                        f"{where} {problem} after the request was sent", settled=not isinstance(e, TimeoutError)
                    ) from e
                last_problem = f"{problem} ({e})" if str(e) else problem
                hopeless = isinstance(e, aiohttp.ClientConnectorCertificateError | aiohttp.InvalidURL)
                if attempt < self.max_attempts and not hopeless:
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                raise VastUnreachable(
                    f"Could not reach Vast at {self.api_url} ({where} {last_problem}, {attempt} attempts). "
                    "Check the network and api_url; Vast's status is at https://status.vast.ai"
                ) from e
            elapsed_ms = 1000 * (time.monotonic() - started)
            logger.debug("%s -> %d (%.0f ms)", where, status, elapsed_ms)
            try:
                parsed: Any = json.loads(text) if text else None
            except ValueError:
                parsed = text
            if status == 429:
                error, msg = _body_fields(parsed)
                threshold = self._pacer.interval(endpoint)
                m = re.search(r"threshold=([\d.]+)", msg or "")
                if m:
                    threshold = max(threshold, float(m.group(1)))
                if error == "search_quota_exceeded" or attempt >= self.max_attempts:
                    raise RateLimited(
                        f"Vast refused {where} as too frequent ({msg or error}) after {attempt} attempts. "
                        + ("The daily search quota resets at midnight UTC." if error == "search_quota_exceeded"
                           else "Another client on this account may be calling too; wait a minute and retry."),
                        status=429, error=error, msg=msg,
                    )
                wait = max(threshold, 0.5) * (1 + 0.25 * (attempt - 1)) * random.uniform(1.0, 1.25)
                logger.debug("%s rate limited; retrying in %.1f s", where, wait)
                self._pacer.hold(endpoint, wait)
                continue
            if status in _RETRY_STATUS:
                error, msg = _body_fields(parsed)
                if create and status in _AMBIGUOUS_CREATE_STATUS:
                    raise _AmbiguousCreate(f"{where} answered {status} ({msg or error or 'no message'})", settled=False)
                if attempt < self.max_attempts:
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                raise VastServerError(
                    f"Vast answered {status} to {where} {attempt} times ({msg or error or 'no message'}). "
                    "Vast may be having trouble (https://status.vast.ai); retry later.",
                    status=status, error=error, msg=msg,
                )
            if 300 <= status < 400:
                # Not followed: the Bearer key must only ever go to the configured origin.
                raise VastRequestError(
                    f"{self.api_url} redirected {where} to {location}; set api_url "
                    "to the server's real address (the default is https://console.vast.ai)",
                    status=status,
                )
            if status < 300 and isinstance(parsed, str):
                raise VastRequestError(
                    f"{self.api_url} answered {where} with something that is not JSON "
                    f"({parsed[:80]!r}); is api_url the address of the Vast API?",
                    status=status,
                )
            if status == 401 or (isinstance(parsed, Mapping) and parsed.get("error") == "auth_error"):
                error, msg = _body_fields(parsed)
                raise InvalidAPIKey(
                    f"Vast rejected the API key {mask_key(self._api_key)} (from {self._key_source}) at "
                    f"{self.api_url}: {msg or 'unauthorized'}. Check the key at {KEY_HELP_URL} (a key made "
                    "for the emulator only works there, and the reverse), then set VAST_API_KEY.",
                    status=status, error=error, msg=msg,
                )
            return status, parsed
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _fail(self, status: int, parsed: Any, what: str, *, instance_id: int | None = None) -> VastError:
        """The error for an answer that is not a success (non-2xx, or ``success: false``)."""
        error, msg = _body_fields(parsed)
        detail = msg or error or f"HTTP {status}"
        if instance_id is not None and (status == 404 or error in ("not_found", "invalid_id", "no_such_instance")):
            return InstanceNotFound(
                f"Instance {instance_id} does not exist on this account ({detail}); it may have been destroyed. "
                "`dask-vastai ls` lists the live ones.",
                status=status, error=error, msg=msg,
            )
        return VastRequestError(f"Vast refused to {what}: {detail} (HTTP {status})", status=status, error=error, msg=msg)

    async def _ok(self, method: str, path: str, endpoint: str, what: str, *, body: Any = None,
                  query: Mapping[str, Any] | None = None, instance_id: int | None = None) -> Any:
        """The parsed body of a successful call; the right :class:`VastError` otherwise."""
        status, parsed = await self._call(method, path, endpoint, body=body, query=query)
        if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
            raise self._fail(status, parsed, what, instance_id=instance_id)
        return parsed

    # ------------------------------------------------------------------ account
    async def current_user(self) -> dict[str, Any]:
        """The account (``id``, ``email``, ``balance``, ...); InvalidAPIKey when the key is refused."""
        parsed = await self._ok("GET", "/users/current", "user", "show the current user")
        return dict(parsed) if isinstance(parsed, Mapping) else {}

    # ------------------------------------------------------------------ offers
    async def search_offers(
        self,
        query: str | Mapping[str, Any],
        *,
        order: str = "dph_total",
        limit: int | None = None,
        type: str = "on-demand",
        storage_gb: float = 5.0,
    ) -> list[Offer]:
        """Offers matching ``query`` (``vastai search offers`` text, or a filter dict), in ``order``."""
        body = search_body(query, order=order, type=type, limit=limit, storage_gb=storage_gb)
        parsed = await self._ok("POST", "/bundles/", "search", "search offers", body=body)
        rows = parsed.get("offers") if isinstance(parsed, Mapping) else None
        return [Offer.from_json(r) for r in rows or [] if isinstance(r, Mapping) and "id" in r]

    # ------------------------------------------------------------------ renting
    async def create_instance(self, offer_id: int, request: CreateRequest) -> Rental:
        """Rent ``offer_id``; OfferUnavailable when it is gone (take the next offer)."""
        resent = False
        while True:
            try:
                status, parsed = await self._call(
                    "PUT", f"/asks/{int(offer_id)}/", "create", body=request.body(int(offer_id)), create=True
                )
                break
            except _AmbiguousCreate as e:
                found = await self._recover_single_create(offer_id, request, e)
                if found is not None:
                    return found
                if resent:
                    raise VastUnreachable(
                        f"Renting offer {offer_id}: {e.why} twice; nothing was rented (none labelled "
                        f"{request.label!r}). Check the network and retry."
                    ) from None
                logger.warning("renting offer %s: %s; nothing was rented, sending it again", offer_id, e.why)
                resent = True
        error, msg = _body_fields(parsed)
        if status in (404, 410) or error == "no_such_ask":
            raise OfferUnavailable(
                f"Offer {offer_id} is no longer available ({msg or error}); offers are single-use, search again.",
                offer_id=int(offer_id), status=status, error=error, msg=msg,
            )
        if status >= 400 or not isinstance(parsed, Mapping) or not parsed.get("success") or not parsed.get("new_contract"):
            raise self._fail(status, parsed, f"rent offer {offer_id}")
        rental = Rental(int(parsed["new_contract"]), int(offer_id), parsed.get("instance_api_key"))
        self._known_ids.add(rental.instance_id)
        return rental

    async def create_instances(self, offer_ids: Sequence[int], request: CreateRequest) -> list[Rental | VastError]:
        """Rent several offers with the bulk endpoint: one result per offer, in order.

        A result is an :class:`OfferUnavailable` (or another :class:`VastError`) for an offer
        that could not be rented; errors of the whole call (bad key, bad image) raise.
        """
        ids = [int(i) for i in offer_ids]
        results: list[Rental | VastError] = []
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            try:
                status, parsed = await self._call("POST", "/asks/bulk/", "create", body=request.body(chunk), create=True)
            except _AmbiguousCreate as e:  # never resent: its rentals cannot be matched to offers
                await self._undo_ambiguous_bulk(request, e.why, rented=results)
                raise AssertionError("unreachable") from None  # pragma: no cover - the undo raises
            if status >= 400 or not isinstance(parsed, Mapping) or parsed.get("success") is False:
                raise self._fail(status, parsed, f"rent offers {chunk}")
            results.extend(self._bulk_results(chunk, parsed))
        for r in results:
            if isinstance(r, Rental):
                self._known_ids.add(r.instance_id)
        return results

    @staticmethod
    def _bulk_results(chunk: list[int], parsed: Mapping[str, Any]) -> list[Rental | VastError]:
        """Per-offer results of a bulk create, matched by ``ask_id`` where given, else by position."""
        items = parsed.get("results")
        if not isinstance(items, list):
            contracts = parsed.get("new_contracts") or ([parsed["new_contract"]] if parsed.get("new_contract") else [])
            items = [{"ask_id": a, "success": True, "new_contract": c} for a, c in zip(chunk, contracts, strict=False)]
        by_ask = {int(i["ask_id"]): i for i in items if isinstance(i, Mapping) and i.get("ask_id") is not None}
        out: list[Rental | VastError] = []
        for pos, offer_id in enumerate(chunk):
            item = by_ask.get(offer_id) or (items[pos] if pos < len(items) and not by_ask else None)
            if isinstance(item, Mapping) and item.get("success") is not False and item.get("new_contract"):
                out.append(Rental(int(item["new_contract"]), offer_id, item.get("instance_api_key")))
                continue
            error, msg = _body_fields(item) if item is not None else (None, "no result for this offer")
            out.append(OfferUnavailable(
                f"Offer {offer_id} could not be rented ({msg or error}); search again.",
                offer_id=offer_id, status=None, error=error, msg=msg,
            ))
        return out

    async def _label_rows(self, label: str, grace_s: float = 0.0) -> list[Instance]:
        """Rentals labelled exactly ``label`` that no answer of this client has reported.

        With ``grace_s``, keeps looking (every 2 s) that long for a create still in progress.
        """
        deadline = time.monotonic() + grace_s
        while True:
            rows = await self.list_instances(label_prefix=label)
            found = [r for r in rows if r.label == label and r.id not in self._known_ids]
            if found or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    async def _recover_single_create(self, offer_id: int, request: CreateRequest, e: _AmbiguousCreate) -> Rental | None:
        """The rental an unanswered create made, or None when it surely made none (safe to resend)."""
        if not request.label:
            raise VastUnreachable(
                f"Renting offer {offer_id}: {e.why}; it may have rented an instance. Without a label it "
                "cannot be found automatically: check `vastai show instances` and destroy strays."
            )
        logger.warning("renting offer %s: %s; looking for the rental under its label", offer_id, e.why)
        found = await self._label_rows(request.label, 0.0 if e.settled else self.ambiguous_create_grace_s)
        if not found:
            if e.settled:
                return None
            raise VastUnreachable(
                f"Renting offer {offer_id}: {e.why}; no rental labelled {request.label!r} appeared within "
                f"{self.ambiguous_create_grace_s:.0f} s, so nothing was rented. Retry; if one appears "
                "later, `dask-vastai cleanup` finds it by its label."
            )
        row = max(found, key=lambda r: r.id)
        self._known_ids.add(row.id)
        logger.warning("renting offer %s: found instance %s under label %r", offer_id, row.id, request.label)
        return Rental(row.id, int(offer_id), None)

    async def _undo_ambiguous_bulk(self, request: CreateRequest, why: str, rented: list[Rental | VastError]) -> None:
        """Destroy what an unanswered bulk create may have rented, then raise."""
        done = [r.instance_id for r in rented if isinstance(r, Rental)]
        if not request.label:
            raise VastUnreachable(
                f"Bulk create: {why}; it may have rented instances ({len(done)} earlier ones: {done}). "
                "Without a label they cannot be found automatically: check `vastai show instances`."
            )
        strays = [r.id for r in await self._label_rows(request.label, self.ambiguous_create_grace_s) if r.id not in done]
        if strays:
            await self.destroy_instances(strays)
        raise VastUnreachable(
            f"Bulk create: {why}. Destroyed {len(strays)} rental(s) it had made ({strays}) because they "
            f"cannot be matched to offers; {len(done)} earlier rental(s) of this call stand: {done}. Retry."
        )

    # ------------------------------------------------------------------ watching
    async def show_instance(self, instance_id: int) -> Instance | None:
        """One rental, or None when it does not exist (destroyed). Prefer :meth:`list_instances` to poll."""
        status, parsed = await self._call("GET", f"/instances/{int(instance_id)}/", "show", query={"owner": "me"})
        if status == 404:
            return None
        if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
            raise self._fail(status, parsed, f"show instance {instance_id}", instance_id=instance_id)
        row = parsed.get("instances") if isinstance(parsed, Mapping) else None
        if isinstance(row, list):  # some servers answer a one-row list
            row = next((r for r in row if isinstance(r, Mapping) and r.get("id") == int(instance_id)), None)
        return Instance.from_json(row) if isinstance(row, Mapping) else None

    async def list_instances(self, *, label_prefix: str | None = None, max_pages: int = 400) -> list[Instance]:
        """Every rental of the account (all pages), or those whose label starts with ``label_prefix``.

        Vast's filters have no prefix operator, so the prefix is applied here.
        """
        query: dict[str, Any] = {"select_filters": {}, "order_by": [{"col": "id", "dir": "asc"}], "limit": 25}
        rows: list[Instance] = []
        for _page in range(max_pages):
            parsed = await self._ok("GET", "/api/v1/instances/", "list", "list instances", query=query)
            page = parsed.get("instances") if isinstance(parsed, Mapping) else None
            rows.extend(Instance.from_json(r) for r in page or [] if isinstance(r, Mapping) and "id" in r)
            token = parsed.get("next_token") if isinstance(parsed, Mapping) else None
            if not token:
                break
            query = {**query, "after_token": token}
        else:
            raise VastRequestError(f"listing instances did not end after {max_pages} pages of 25; Vast kept sending next_token")
        if label_prefix is not None:
            rows = [r for r in rows if (r.label or "").startswith(label_prefix)]
        return rows

    # ------------------------------------------------------------------ destroying
    async def destroy_instance(self, instance_id: int) -> bool:
        """Destroy one rental (stops its meter); False when it was already gone."""
        status, parsed = await self._call("DELETE", f"/instances/{int(instance_id)}/", "destroy")
        error, _ = _body_fields(parsed)
        if status == 404 or error in ("not_found", "no_such_instance", "invalid_id"):
            return False
        if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
            raise self._fail(status, parsed, f"destroy instance {instance_id}", instance_id=instance_id)
        self._known_ids.discard(int(instance_id))
        return True

    async def destroy_instances(self, instance_ids: Sequence[int]) -> None:
        """Destroy several rentals with the bulk endpoint (ids already gone are fine)."""
        ids = sorted({int(i) for i in instance_ids})
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            status, parsed = await self._call("DELETE", "/instances/", "destroy", body={"instance_ids": chunk})
            if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
                raise self._fail(status, parsed, f"destroy instances {chunk}")
            items = parsed.get("results") if isinstance(parsed, Mapping) else None
            refused = [
                i for i in items or []
                if isinstance(i, Mapping) and i.get("success") is False
                and i.get("error") not in ("not_found", "no_such_instance", "invalid_id")  # already gone
            ]
            if refused:
                error, msg = _body_fields(refused[0])
                raise VastRequestError(
                    f"Vast refused to destroy {len(refused)} of instances {chunk}: {msg or error} "
                    f"(ids {[i.get('id') for i in refused]}); they may still bill: retry `dask-vastai cleanup`",
                    status=status, error=error, msg=msg,
                )
            self._known_ids.difference_update(chunk)

    # ------------------------------------------------------------------ changing
    async def label_instance(self, instance_id: int, label: str) -> None:
        """Set a rental's label (at most 1024 characters)."""
        if len(label) > 1024:
            raise ValueError(f"label of {len(label)} characters: Vast takes at most 1024")
        await self._ok("PUT", f"/instances/{int(instance_id)}/", "update", f"label instance {instance_id}",
                       body={"label": label}, instance_id=instance_id)

    async def set_state(self, instance_id: int, state: Literal["running", "stopped"]) -> None:
        """Start or stop a rental. A stopped rental still bills its disk: destroy to stop paying."""
        if state not in ("running", "stopped"):
            raise ValueError(f"state={state!r}: use 'running' or 'stopped'")
        await self._ok("PUT", f"/instances/{int(instance_id)}/", "update", f"set instance {instance_id} {state}",
                       body={"state": state}, instance_id=instance_id)

    async def reboot_instance(self, instance_id: int) -> None:
        """Restart the rental's container (keeps the machine and its disk)."""
        await self._ok("PUT", f"/instances/reboot/{int(instance_id)}/", "reboot", f"reboot instance {instance_id}",
                       instance_id=instance_id)

    async def logs(self, instance_id: int, *, tail: int | None = None, filter: str | None = None) -> str:
        """The container's log text (Vast uploads it to a URL that is then polled, without the key)."""
        body: dict[str, Any] = {}
        if filter:
            body["filter"] = filter
        if tail:
            body["tail"] = str(int(tail))
        parsed = await self._ok("PUT", f"/instances/request_logs/{int(instance_id)}/", "logs",
                                f"fetch the logs of instance {instance_id}", body=body, instance_id=instance_id)
        url = parsed.get("result_url") if isinstance(parsed, Mapping) else None
        if not url:
            return str(parsed.get("msg") or "") if isinstance(parsed, Mapping) else str(parsed or "")
        deadline = time.monotonic() + self.logs_timeout_s
        session = self._get_session()
        last = "no answer yet"
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            try:
                async with session.get(yarl.URL(url, encoded=True), allow_redirects=True) as resp:
                    if resp.status == 200:
                        return await resp.text()
                    last = f"HTTP {resp.status}"
            except (TimeoutError, aiohttp.ClientError) as e:
                last = type(e).__name__
        raise LogsNotReady(
            f"The logs of instance {instance_id} were not ready after {self.logs_timeout_s:.0f} s "
            f"(last: {last}); try again later."
        )

    # ------------------------------------------------------------------ SSH keys
    async def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """Add ``public_key`` to one rental's authorized keys (not the account's)."""
        await self._ok("POST", f"/instances/{int(instance_id)}/ssh/", "ssh", f"attach an SSH key to instance {instance_id}",
                       body={"ssh_key": public_key.strip()}, instance_id=instance_id)

    async def ssh_keys(self) -> list[dict[str, Any]]:
        """The account's SSH keys (each reaches every *future* rental)."""
        parsed = await self._ok("GET", "/ssh/", "ssh", "list SSH keys")
        if isinstance(parsed, Mapping):
            parsed = parsed.get("ssh_keys", parsed.get("keys", []))
        if isinstance(parsed, str):
            parsed = json.loads(parsed)
        return [dict(k) for k in parsed or [] if isinstance(k, Mapping)]

    async def add_ssh_key(self, public_key: str) -> dict[str, Any]:
        """Register an account-level key; returns Vast's record of it (with ``id``)."""
        parsed = await self._ok("POST", "/ssh/", "ssh", "add an SSH key", body={"ssh_key": public_key.strip()})
        key = parsed.get("key", parsed) if isinstance(parsed, Mapping) else {}
        return dict(key) if isinstance(key, Mapping) else {}

    async def delete_ssh_key(self, key_id: int) -> None:
        """Remove an account-level key."""
        await self._ok("DELETE", f"/ssh/{int(key_id)}/", "ssh", f"delete SSH key {key_id}")
