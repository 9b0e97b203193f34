"""A local Vast.ai marketplace: the REST API the ``vastai`` CLI and SDK speak, on 127.0.0.1.

Use it from synchronous code (it runs its own event loop in a daemon thread)::

    with Emulator() as emu:
        url, key = emu            # the same as emu.url, emu.api_key
        ...                       # vastai --url {url} --api-key {key} search offers

or inside an event loop (it then serves from the caller's loop)::

    async with Emulator(boot_delay_s=0) as emu:
        ...

Leaving either block (or ``emu.stop()``) destroys nothing on the meter but stops every
sandbox the emulator started and freezes the meter. The modules: ``catalog`` (offers),
``api_query`` (filters), ``api_market`` (rentals, life cycle, billing), ``api_server``
(HTTP), ``api_ratelimit``, ``faults``, ``variants`` (every plausible answer where Vast's
behaviour is unknown), ``runtime`` (what a rental runs).

Where Vast's behaviour is unknown the emulator plays any plausible variant, and is never
kinder than Vast: ``Emulator(profile="strict")`` turns on the defensible ones at once,
``Emulator(variants={...})`` and ``emu.variants.set(...)`` pick single ones (see
``variants`` and ``docs/emulator-variants.md``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from ..credentials import EMULATOR_KEY_PREFIX
from .api_market import ManualClock, Market
from .api_ratelimit import DEFAULT_INTERVALS_S, RateLimiter
from .api_server import ApiServer
from .catalog import load_catalog
from .faults import Faults
from .runtime import InstanceRuntime, RecordOnlyRuntime
from .variants import Variants

__all__ = ["Emulator", "ManualClock", "DEFAULT_INTERVALS_S", "Variants", "make_runtime"]

T = TypeVar("T")
#: seconds the synchronous API waits for the emulator's loop before giving up
_LOOP_TIMEOUT_S = 60.0


def make_runtime(choice: str | InstanceRuntime, state_dir: Path) -> tuple[InstanceRuntime, str]:
    """The runtime for ``choice`` ("auto", "sandbox", "record" or an object) and its name.

    "auto" takes the namespace sandbox where it can run here and otherwise records only,
    saying why in a warning; "sandbox" raises with the reason where it cannot run.
    """
    if not isinstance(choice, str):
        return choice, type(choice).__name__
    if choice == "record":
        return RecordOnlyRuntime(), "record"
    if choice not in ("auto", "sandbox"):
        raise ValueError(f"runtime must be 'auto', 'sandbox', 'record' or an InstanceRuntime, not {choice!r}")
    try:
        from .sandbox import SandboxRuntime
    except ImportError as e:
        reason = f"the sandbox runtime cannot be imported ({e})"
    else:
        ok, reason = SandboxRuntime.available()
        if ok:
            return SandboxRuntime(state_dir), "sandbox"
    if choice == "sandbox":
        raise RuntimeError(f"runtime='sandbox' cannot run here: {reason}. "
                           "Use runtime='record' (rentals are records, nothing runs) or runtime='auto'.")
    warnings.warn(f"dask-vastai emulator: rentals are records only, nothing runs on them: {reason}",
                  stacklevel=3)
    return RecordOnlyRuntime(), "record"


class Emulator:
    """A local Vast marketplace on ``127.0.0.1:port`` (see the module docstring).

    Parameters
    ----------
    port: TCP port on 127.0.0.1; 0 picks a free one (read it from ``url``).
    api_key: the account key it accepts; random when None.
    boot_delay_s: seconds a rental spends in ``loading`` before its sandbox starts.
    catalog: offers: None (the shipped catalog), a JSON file, or a list of (partial) offer dicts.
    rate_limits: True (Vast's intervals), False (none, for unit tests), or
        ``{endpoint: seconds}`` (see ``api_ratelimit.DEFAULT_INTERVALS_S`` for the names).
    runtime: "auto", "sandbox", "record" or an :class:`InstanceRuntime`.
    state_dir: where sandboxes keep their logs; a temporary directory (removed at stop) if None.
    clock: wall clock for billing and dates (``ManualClock`` lets tests move time).
    balance_usd: the account's starting credit, shown by ``/users/current`` minus the meter.
    variants: ``{name: value}`` of the variants to play (see ``variants.VARIANTS``), over the profile.
    profile: "default" (None) or "strict" (the defensible variants at once, ``variants.STRICT``).
    """

    def __init__(self, *, port: int = 0, api_key: str | None = None, boot_delay_s: float = 2.0,
                 catalog: str | Path | Iterable[Mapping[str, Any]] | None = None,
                 rate_limits: bool | Mapping[str, float] = True,
                 runtime: str | InstanceRuntime = "auto", state_dir: str | Path | None = None,
                 clock: Callable[[], float] | None = None, balance_usd: float = 100.0,
                 variants: Mapping[str, Any] | None = None, profile: str | None = None) -> None:
        if boot_delay_s < 0:
            raise ValueError(f"boot_delay_s must be >= 0 seconds, not {boot_delay_s}")
        self.port = int(port)
        self.api_key = api_key or f"{EMULATOR_KEY_PREFIX}{secrets.token_hex(16)}"
        self.boot_delay_s = float(boot_delay_s)
        self.offers = load_catalog(catalog)  # fail here, with the file's name, not in the thread
        if rate_limits is True:
            self.rate_limits: dict[str, float] = dict(DEFAULT_INTERVALS_S)
        elif rate_limits is False or rate_limits is None:
            self.rate_limits = {}
        else:
            self.rate_limits = {**DEFAULT_INTERVALS_S, **dict(rate_limits)}
        self._runtime_choice = runtime
        self._state_dir_arg = Path(state_dir) if state_dir is not None else None
        self.clock = clock or time.time
        self.balance_usd = balance_usd
        #: what the emulator plays where Vast's behaviour is unknown; change it any time
        self.variants = Variants(variants, profile)  # a bad name or value fails here
        self.url = ""
        #: the other origin that the off_origin redirect variants point at
        self.off_origin_url = ""
        self.runtime_name = ""
        self.market: Market | None = None
        self._server: ApiServer | None = None
        self._faults: Faults | None = None
        self._site_runner: web.AppRunner | None = None
        self._off_origin_runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tmp_state: Path | None = None
        self._closed = False

    # ------------------------------------------------------------------ start/stop on a loop
    async def start(self) -> Emulator:
        """Start serving from the running event loop."""
        self._loop = asyncio.get_running_loop()
        if self._state_dir_arg is None:
            self._tmp_state = Path(tempfile.mkdtemp(prefix="dask-vastai-emulator-"))
        state_dir = self._state_dir_arg or self._tmp_state
        assert state_dir is not None
        state_dir.mkdir(parents=True, exist_ok=True)
        runtime, self.runtime_name = make_runtime(self._runtime_choice, state_dir)
        self.market = Market(self.offers, runtime, api_url="", clock=self.clock,
                             boot_delay_s=self.boot_delay_s, balance_usd=self.balance_usd, variants=self.variants)
        self._faults = Faults(self.market, self._run_on_loop)
        self.market.faults = self._faults
        self._server = ApiServer(self.market, api_key=self.api_key, limiter=RateLimiter(self.rate_limits),
                                 faults=self._faults, variants=self.variants)
        self._site_runner = web.AppRunner(self._server.app(), access_log=None)
        await self._site_runner.setup()
        site = web.TCPSite(self._site_runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._site_runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.market.api_url = self.url
        # another port is another origin: where the off_origin redirects send a client
        self._off_origin_runner = web.AppRunner(self._server.off_origin_app(), access_log=None)
        await self._off_origin_runner.setup()
        await web.TCPSite(self._off_origin_runner, "127.0.0.1", 0).start()
        self.off_origin_url = f"http://127.0.0.1:{self._off_origin_runner.addresses[0][1]}"
        self._server.off_origin_url = self.off_origin_url
        return self

    async def aclose(self) -> None:
        """Stop serving, stop every sandbox, freeze the meter (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.market is not None:
            await self.market.close()
        for runner in (self._site_runner, self._off_origin_runner):
            if runner is not None:
                await runner.cleanup()
        if self._tmp_state is not None:
            shutil.rmtree(self._tmp_state, ignore_errors=True)

    async def __aenter__(self) -> Emulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ own thread
    def __enter__(self) -> Emulator:
        started = concurrent.futures.Future[None]()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # hand the failure to __enter__'s thread
                started.set_exception(e)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name=f"vast-emulator-{id(self):x}", daemon=True)
        self._thread.start()
        started.result(timeout=_LOOP_TIMEOUT_S)
        atexit.register(self.stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the emulator started with ``with`` (from any thread but its own)."""
        loop, thread = self._loop, self._thread
        if thread is None or loop is None or not thread.is_alive():
            return
        if threading.current_thread() is thread:
            raise RuntimeError("Emulator.stop() was called from the emulator's own loop; use `await emu.aclose()`")
        try:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=_LOOP_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_LOOP_TIMEOUT_S)
            atexit.unregister(self.stop)

    def _run_on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the emulator's loop (directly when already there) and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the emulator is not started: use `with Emulator() as emu:` or `async with`")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or loop.is_closed() or not loop.is_running():
            return fn()  # on the loop already, or nothing runs there any more (after stop)
        done = concurrent.futures.Future[T]()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

        loop.call_soon_threadsafe(call)
        return done.result(timeout=_LOOP_TIMEOUT_S)

    # ------------------------------------------------------------------ Python API
    def __iter__(self) -> Iterator[str]:
        """``url, key = emu``."""
        return iter((self.url, self.api_key))

    def __repr__(self) -> str:
        changed = " ".join(f"{k}={v}" for k, v in self.variants.changed().items())
        return (f"<Emulator {self.url or '(not started)'} runtime={self.runtime_name or self._runtime_choice}"
                f" profile={self.variants.profile}{' ' + changed if changed else ''}>")

    @property
    def faults(self) -> Faults:
        if self._faults is None:
            raise RuntimeError("the emulator is not started")
        return self._faults

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every API request so far: time, method, path, endpoint, status, key ("account"/"instance:N"),
        and for searches and creates the JSON ``body`` sent (the query; the rental's disk, image, label).

        Requests that followed an off_origin redirect are there too, with endpoint "off_origin"
        and the key they carried: a client that leaks the key shows as key "account".
        """
        return list(self._server.records) if self._server else []

    def meter(self) -> dict[str, Any]:
        """``{"total_usd", "time_usd", "bandwidth_usd", "instances": [{id, label, dph, seconds, time_usd,
        bytes_up, bytes_down, bandwidth_usd, cost_usd, destroyed, ...}]}``: time and bandwidth billed."""
        market = self._market()
        return self._run_on_loop(market.meter)

    def instances(self) -> list[dict[str, Any]]:
        """The live rentals as Vast's API shows them."""
        market = self._market()
        return self._run_on_loop(market.rows)

    def _market(self) -> Market:
        if self.market is None:
            raise RuntimeError("the emulator is not started")
        return self.market
