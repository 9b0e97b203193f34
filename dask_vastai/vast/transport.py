"""The paced HTTP transport to Vast's REST API (or to anything serving it): one aiohttp
session, one queue per endpoint, retries, and errors that say what to do.

Why aiohttp rather than tornado's HTTP client (which distributed already has): one pooled
session for all calls, a timeout per request, and async context managers that always
release the connection.

What a caller can rely on:

* **Pacing, not retrying.** Vast refuses (429) a call that comes sooner than an endpoint's
  threshold after the previous call of that endpoint (create 4.5 s, destroy 3 s, ...), per
  account. All calls queue per endpoint and go out no sooner than the interval after the
  previous call's *answer* (the server stamps a call somewhere between our send and its
  answer, so counting from the answer can never be too early), and the schedule is shared
  by every process of this user on the same account (:mod:`.pacing`): two clusters and a
  ``dask-vastai ls`` loop wait their turns instead of tripping 429s. ``pace=False`` turns
  the queue off.
* **Retries** with exponential backoff and jitter, up to ``max_attempts`` in all: a 429
  (after its ``Retry-After`` when it sends one, which also holds back this user's other
  processes; else at least the endpoint's threshold, which the plain-text body names),
  502/503/504 and 500, timeouts and connection errors. Other 4xx are never retried.
* **Outages are waited out, a wrong address is not.** Once Vast has answered this client,
  5xx answers and failed connections are retried for up to ``outage_timeout_s`` (a cluster
  scaling up or closing rides out an outage of minutes), with a "waiting for Vast" notice
  every ``outage-notice-every`` seconds (to :attr:`VastTransport.on_outage`). Before its
  first answer, a refused connection or an unknown host fails within ``first-contact-timeout``
  (a few quick tries), naming the URL: that is a wrong ``api_url`` or no network, not an outage.
  A caller with one deadline for many calls (a cluster's close) sets it with
  :meth:`VastTransport.until`: retries and requests then stop there, however many calls.
* **Redirects** to the same origin (scheme, host and port of ``api_url``) are followed with
  the key, as the SDK does (Vast's route table has trailing slashes: ``/users/current/``); a
  redirect to any other origin is refused *before* the key could go there.
* **A create is never retried blindly.** A create that timed out, lost its connection after
  sending, or got a 500/504 may have rented, and a double rental bills twice. The transport
  raises :class:`AmbiguousCreate` for it instead of retrying; the client then looks for the
  rental under its label (:mod:`dask_vastai.vast.client`).
* **Typed errors** (all :class:`~dask_vastai.exceptions.VastError`), with Vast's ``error``
  code and ``msg``, and messages that say what to do. The key is sent only as a Bearer
  header, never in a URL, and appears in no log line, repr or message (``***abcd`` at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote_plus

import aiohttp
import aiohttp.abc
import yarl

from .._testing import hosts as testing_hosts
from ..config import option
from ..credentials import (
    KEY_HELP_URL,
    APIKey,
    emulator_key_message,
    find_api_key,
    is_emulator_key,
    is_vast_origin,
)
from ..exceptions import (
    InstanceNotFound,
    InvalidAPIKey,
    RateLimited,
    VastError,
    VastRequestError,
    VastServerError,
    VastUnreachable,
)
from .pacing import Pacer, SharedSchedule
from .recording import ResponseRecorder

logger = logging.getLogger(__name__)

#: Vast's per-endpoint thresholds: it refuses (429) a call of an endpoint sooner than this
#: after the previous one of the same endpoint (``vastai.api.min-intervals`` in vastai.yaml).
DEFAULT_MIN_INTERVALS_S: Mapping[str, float] = dict(option("api.min-intervals"))
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_AMBIGUOUS_CREATE_STATUS = frozenset({500, 504})
#: same-origin redirects followed for one call, at most
MAX_REDIRECTS = 5
#: a 429 asking to wait longer than this fails at once instead of stalling the caller
MAX_RETRY_AFTER_S = 300.0
#: the ``time.monotonic()`` by which the calls of this task (and the tasks it starts) end, retries
#: included (None: each call's own limits); set by :meth:`VastTransport.until`
_DEADLINE: ContextVar[float | None] = ContextVar("dask_vastai_vast_call_deadline", default=None)


def _left_s(default: float) -> float:
    """Seconds left before the deadline of :meth:`VastTransport.until`; ``default`` without one."""
    deadline = _DEADLINE.get()
    return default if deadline is None else deadline - time.monotonic()


def _retry_after_s(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None without one."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class AmbiguousCreate(Exception):
    """A create that may have been carried out although no answer says so.

    ``settled`` is True when the server cannot still be working on it (the connection
    dropped: nothing under the label means nothing was rented, and it is safe to send it
    again); False after a timeout or a 500/504, when it may still be in progress.
    """

    def __init__(self, why: str, *, settled: bool) -> None:
        super().__init__(why)
        self.why = why
        self.settled = settled


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (a loopback address or ``localhost``)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def body_fields(body: Any) -> tuple[str | None, str | None]:
    """Vast's ``(error, msg)`` from a JSON error body, or ``(None, text)`` for plain text."""
    if isinstance(body, Mapping):
        error = body.get("error")
        msg = body.get("msg") or body.get("message") or body.get("detail")
        return (str(error) if error else None), (str(msg) if msg else None)
    text = str(body or "").strip()
    return None, (text[:500] or None)


def _over(since: float | None) -> str:
    return "" if since is None else f" over {time.monotonic() - since:.0f}s"


def _connect_problem(e: aiohttp.ClientConnectorError) -> str:
    """What a failed connection means, in words: an unknown host or a refused connection."""
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return f"its host {e.host!r} is unknown (DNS: {e.os_error})"
    if isinstance(e.os_error, ConnectionRefusedError):
        return f"connection refused at {e.host}:{e.port} (nothing listens there)"
    return f"cannot connect to {e.host}:{e.port} ({e.os_error})"


class _HostsResolver(aiohttp.abc.AbstractResolver):
    """Names resolved from a table, as a hosts file does (``vastai.testing.hosts``): a name
    mapped to None, or absent, is unknown. Lets a test meet an unknown host without DNS."""

    def __init__(self, hosts: Mapping[str, str | None]) -> None:
        self.hosts = dict(hosts)

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        address = self.hosts.get(host)
        if address is None:
            raise OSError(socket.EAI_NONAME, f"{host!r} is not in the hosts table (vastai.testing.hosts)")
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET6 if ":" in address
                 else socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


def _hosts_resolver() -> aiohttp.abc.AbstractResolver | None:
    """The resolver of the ``vastai.testing.hosts`` hook, or None (the system's)."""
    hosts = testing_hosts()
    return _HostsResolver(hosts) if hosts is not None else None


class VastTransport:
    """One account's connection to a Vast API: key, session, pacing, retries, typed errors.

    The endpoints are :class:`~dask_vastai.vast.VastAPI`, a subclass: a caller holds one
    object that is both, so a setting such as ``max_attempts`` is read where a user set it.
    """

    def __init__(
        self,
        api_key: str | None = None,
        api_url: str | None = None,
        *,
        pace: bool = True,
        request_timeout_s: float | None = None,
        max_attempts: int | None = None,
        min_intervals_s: Mapping[str, float] | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        outage_timeout_s: float | None = None,
    ) -> None:
        # None: the default in vastai.yaml (section vastai.api).
        max_attempts = int(option("api.max-attempts", max_attempts))
        key, source = find_api_key(api_key if api_key is not None else option("api-key"))
        url = str(api_url or option("api-url") or "https://console.vast.ai").strip().rstrip("/")
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"api_url={url!r} is not an http(s) URL; the default is https://console.vast.ai")
        if parsed.scheme == "http" and not _is_loopback(parsed.host):
            raise ValueError(
                f"api_url={url!r} would send the API key in clear text over the network: use https:// "
                "(the default is https://console.vast.ai); http:// is only for this machine "
                "(127.0.0.1, ::1, localhost), where the emulator runs"
            )
        if parsed.query_string:
            raise ValueError(f"api_url={parsed.with_query(None)!s}... must not carry a query; the key goes in api_key")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be at least 1")
        if is_emulator_key(key) and is_vast_origin(parsed.host):
            # Vast would only answer 401, after a round trip (minutes when it is unreachable).
            raise InvalidAPIKey(emulator_key_message(url))
        self._api_key = APIKey(key)
        self._key_source = source
        self.api_url: str = url
        self.request_timeout_s = float(option("api.request-timeout", request_timeout_s))
        self.max_attempts = max_attempts
        self.backoff_s = float(option("api.backoff", backoff_s))
        self.backoff_max_s = float(option("api.backoff-max", backoff_max_s))
        self.outage_timeout_s = float(option("api.outage-timeout", outage_timeout_s))
        self.outage_notice_every_s = float(option("api.outage-notice-every"))
        self.first_contact_s = float(option("api.first-contact-timeout"))
        #: told "waiting for Vast ..." during an outage (None: a WARNING log line)
        self.on_outage: Callable[[str], None] | None = None
        #: whether the server at api_url has answered this client (then failures are an outage)
        self.answered = False
        self._last_notice = 0.0
        intervals = {**dict(option("api.min-intervals")), **dict(min_intervals_s or {})}
        record_to = option("api.record-responses")
        self._recorder = ResponseRecorder(record_to) if record_to else None
        shared = SharedSchedule.for_account(url, key) if pace and option("api.shared-pacing") else None
        self._pacer = Pacer(intervals, enabled=pace, shared=shared, busy_s=self.request_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        from .. import __version__

        # without the key: it is added to each request, so no long-lived object holds it in clear
        self._headers = {
            "Accept": "application/json",
            "User-Agent": f"dask-vastai/{__version__}",
        }

    # ------------------------------------------------------------------ lifecycle
    def __repr__(self) -> str:
        return f"{type(self).__name__}(api_url={self.api_url!r}, api_key={self._api_key!r})"

    def credentials(self) -> tuple[str, str]:
        """``(api_url, api_key)``: what a fresh client needs to act for this account (exit handlers)."""
        return self.api_url, self._api_key.reveal()

    async def __aenter__(self) -> Self:
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
                connector=aiohttp.TCPConnector(limit=32, resolver=_hosts_resolver()),
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
        """Seconds before retry ``attempt + 1``: doubling with jitter, never past :meth:`until`'s deadline."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return min(base * random.uniform(0.5, 1.0), _left_s(math.inf))

    @staticmethod
    @contextlib.contextmanager
    def until(deadline: float | None) -> Iterator[None]:
        """Calls made inside (and in tasks started inside) retry no later than ``deadline``
        (``time.monotonic()``), and no request outlives it: they then raise their usual error,
        naming what Vast last answered. For a caller with one deadline for many calls (a
        cluster's close), where each call's own ``outage_timeout_s`` would add up."""
        token = _DEADLINE.set(deadline)
        try:
            yield
        finally:
            _DEADLINE.reset(token)

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

        ``create=True`` raises :class:`AmbiguousCreate` instead of retrying when the request
        may have been carried out.
        """
        url = self._url(path, query)
        if body is None and method != "GET":
            body = {}  # the SDK always sends a JSON body, even with DELETE
        where = f"{method} {path}"
        last_problem = ""
        outage_since: float | None = None  # when this call first failed as in an outage
        #: what this call raises if it stops before its next try (the caller's deadline came)
        pending: VastError | None = None
        first_try = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            if pending is not None and self._pacer.wait_s(endpoint) >= _left_s(math.inf):
                raise pending  # this endpoint's next turn comes after until()'s deadline
            try:
                async with self._pacer.turn(endpoint):
                    if pending is not None and _left_s(1.0) <= 0:
                        raise pending  # the wait for this endpoint's turn ran past until()'s deadline
                    started = time.monotonic()
                    status, text, retry_after = await self._send(method, url, body, where)
            except (TimeoutError, aiohttp.ClientError) as e:
                sent = not isinstance(e, aiohttp.ClientConnectorError)
                problem = "timed out" if isinstance(e, TimeoutError) else f"failed: {type(e).__name__}"
                logger.debug("%s %s (attempt %d, %.0f ms)", where, problem, attempt, 1000 * (time.monotonic() - started))
                if create and sent:
                    raise AmbiguousCreate(
                        f"{where} {problem} after the request was sent", settled=not isinstance(e, TimeoutError)
                    ) from e
                last_problem = f"{problem} ({e})" if str(e) else problem
                hopeless = isinstance(e, aiohttp.ClientConnectorCertificateError | aiohttp.InvalidURL)
                if not self.answered and isinstance(e, aiohttp.ClientConnectorError) and not hopeless:
                    # Never answered: a wrong api_url or no network, not an outage. A few quick
                    # tries (a blip), then the URL and what went wrong, within seconds.
                    spent = time.monotonic() - first_try
                    if attempt < self.max_attempts and spent < self.first_contact_s:
                        await asyncio.sleep(min(self._backoff(attempt), self.first_contact_s - spent))
                        continue
                    raise VastUnreachable(
                        f"Could not reach Vast at {self.api_url}: {_connect_problem(e)} ({where}, {attempt} "
                        f"attempts in {spent:.1f}s). Check api_url (the default is https://console.vast.ai) "
                        "and the network; Vast's status is at https://status.vast.ai"
                    ) from e
                outage_since = started if outage_since is None else outage_since
                unreachable = VastUnreachable(
                    f"Could not reach Vast at {self.api_url} ({where} {last_problem}, {attempt} attempts"
                    f"{_over(outage_since)}). Check the network and api_url; Vast's status is at "
                    "https://status.vast.ai"
                )
                if not hopeless and self._keep_trying(attempt, outage_since, where, last_problem):
                    pending = unreachable
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                raise unreachable from e
            if status < 500:
                self.answered = True  # a 5xx may come from a proxy in front of a Vast never reached
            elapsed_ms = 1000 * (time.monotonic() - started)
            logger.debug("%s -> %d (%.0f ms)", where, status, elapsed_ms)
            try:
                parsed: Any = json.loads(text) if text else None
            except ValueError:
                parsed = text
            self._observe(method, path, status, parsed)
            if status == 429:
                error, msg = body_fields(parsed)
                if error == "search_quota_exceeded" or attempt >= self.max_attempts or (
                        retry_after is not None and retry_after > MAX_RETRY_AFTER_S):
                    raise RateLimited(
                        f"Vast refused {where} as too frequent ({msg or error}) after {attempt} attempts"
                        + (f", asking to wait {retry_after:.0f} s" if retry_after is not None else "") + ". "
                        + ("The daily search quota resets at midnight UTC." if error == "search_quota_exceeded"
                           else "Another client on this account may be calling too; wait a minute and retry."),
                        status=429, error=error, msg=msg,
                    )
                if retry_after is not None:
                    wait = retry_after * random.uniform(1.0, 1.1)  # the server said when: not sooner
                else:
                    threshold = self._pacer.interval(endpoint)
                    m = re.search(r"threshold=([\d.]+)", msg or "")
                    if m:
                        threshold = max(threshold, float(m.group(1)))
                    wait = max(threshold, 0.5) * (1 + 0.25 * (attempt - 1)) * random.uniform(1.0, 1.25)
                logger.debug("%s rate limited; retrying in %.1f s", where, wait)
                await self._pacer.hold(endpoint, wait)
                continue
            if status in _RETRY_STATUS:
                error, msg = body_fields(parsed)
                if create and status in _AMBIGUOUS_CREATE_STATUS:
                    raise AmbiguousCreate(f"{where} answered {status} ({msg or error or 'no message'})", settled=False)
                outage_since = started if outage_since is None else outage_since
                server_error = VastServerError(
                    f"Vast answered {status} to {where} {attempt} times{_over(outage_since)} "
                    f"({msg or error or 'no message'}). Vast may be having trouble (https://status.vast.ai); "
                    "retry later.",
                    status=status, error=error, msg=msg,
                )
                if self._keep_trying(attempt, outage_since, where, f"answered {status}"):
                    pending = server_error
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                raise server_error
            if status < 300 and isinstance(parsed, str) and not create:  # a create's caller reads it
                raise VastRequestError(
                    f"{self.api_url} answered {where} with something that is not JSON "
                    f"({parsed[:80]!r}); is api_url the address of the Vast API?",
                    status=status,
                )
            if status == 401 or (isinstance(parsed, Mapping) and parsed.get("error") == "auth_error"):
                error, msg = body_fields(parsed)
                raise InvalidAPIKey(
                    f"Vast rejected the API key {self._api_key!r} (from {self._key_source}) at "
                    f"{self.api_url}: {msg or 'unauthorized'}. Check the key at {KEY_HELP_URL} (a key made "
                    "for the emulator only works there, and the reverse), then set VAST_API_KEY.",
                    status=status, error=error, msg=msg,
                )
            return status, parsed

    def _keep_trying(self, attempt: int, since: float, where: str, problem: str) -> bool:
        """Whether a call failing since ``since`` (5xx or no connection) is tried again.

        Up to ``max_attempts``; beyond, through an outage of a Vast that answered before, for up
        to ``outage_timeout_s``, saying every ``outage-notice-every`` seconds that it waits.
        """
        if _left_s(1.0) <= 0:
            return False  # the caller's deadline (until()) has come
        elapsed = time.monotonic() - since
        outage = self.answered and elapsed < self.outage_timeout_s
        if attempt >= self.max_attempts and not outage:
            return False
        if self.answered and elapsed >= self.outage_notice_every_s and \
                time.monotonic() - self._last_notice >= self.outage_notice_every_s:
            self._last_notice = time.monotonic()
            left = max(0.0, min(self.outage_timeout_s - elapsed, _left_s(math.inf)))
            notice = (f"waiting for Vast: {where} {problem} for {elapsed:.0f}s ({self.api_url}; status at "
                      f"https://status.vast.ai); retrying for up to {left:.0f}s more (vastai.api.outage-timeout)")
            if self.on_outage is not None:
                self.on_outage(notice)
            else:
                logger.warning("%s", notice)
        return True

    async def _send(self, method: str, url: yarl.URL, body: Any, where: str) -> tuple[int, str, float | None]:
        """One request, following same-origin redirects: ``(status, text, Retry-After seconds)``.

        The key goes with a redirect only to the origin of ``api_url``: the SDK follows
        redirects (Vast's routes end in a slash), but a Bearer key sent to another origin is
        a leaked key. A 303 becomes a GET, as HTTP says; other redirects keep the method and
        body (a server redirects before it acts, so nothing was done twice).
        """
        origin = yarl.URL(self.api_url).origin()
        for _hop in range(MAX_REDIRECTS + 1):
            left = _left_s(self.request_timeout_s)  # a request ends by the caller's deadline too
            async with self._get_session().request(
                method, url, json=body, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=max(0.1, min(self.request_timeout_s, left))),
                headers={**self._headers, "Authorization": f"Bearer {self._api_key.reveal()}"},
            ) as resp:
                status = resp.status
                location = resp.headers.get("Location")
                retry_after = _retry_after_s(resp.headers.get("Retry-After"))
                text = await resp.text()
            if not (300 <= status < 400 and status != 304):
                return status, text, retry_after
            if not location:
                raise VastRequestError(f"{self.api_url} answered {where} with a {status} redirect without "
                                       "a Location", status=status)
            target = url.join(yarl.URL(location))
            if target.origin() != origin:
                raise VastRequestError(
                    f"{self.api_url} redirected {where} to {target.origin()}, another origin: the API key "
                    "was not sent there. Set api_url to the server's real address (the default is "
                    "https://console.vast.ai)",
                    status=status,
                )
            logger.debug("%s redirected (%d) to %s", where, status, target.path)
            if status == 303:
                method, body = "GET", None
            url = target
        raise VastRequestError(f"{self.api_url} redirected {where} more than {MAX_REDIRECTS} times; "
                               "check api_url", status=status)

    def _observe(self, method: str, path: str, status: int, parsed: Any) -> None:
        """Every answer, as it came: recorded (redacted) where ``vastai.api.record-responses`` says."""
        if self._recorder is not None:
            self._recorder.record(method, path, status, parsed)

    def _fail(self, status: int, parsed: Any, what: str, *, instance_id: int | None = None) -> VastError:
        """The error for an answer that is not a success (non-2xx, or ``success: false``)."""
        error, msg = body_fields(parsed)
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
