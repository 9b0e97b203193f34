"""Faults the emulated marketplace injects on demand, as the real one produces them.

Two kinds:

- *armed* faults wait for the next matching event and are consumed by it: the next N
  calls of an endpoint fail (429 plain text or a 5xx), the next N boots fail with a fatal
  ``status_msg`` or stay in ``loading`` forever, the next N creates find their offer
  taken by someone else between search and create (404 ``no_such_ask``, or 410 as Vast
  answers a ``cancel_unavail`` create whose machine cannot start now), the next N boots
  (first boots or reboots) have a man in the middle on their SSH endpoints, presenting
  another host key than the one the instance has and prints (``impostor_ssh``);
- *immediate* faults change a rental now: an interruptible rental is outbid (-> ``stopped``),
  a host goes ``offline`` (its sandbox is stopped: nothing on it answers any more), a
  container dies (-> ``exited`` with an exit code); its SSH link freezes (``freeze_ssh``: the
  sandbox's SSH servers and relays are stopped with SIGSTOP, so open connections and new ones
  hang, as on a host whose network froze, while the rental stays ``running`` and its
  watchdog keeps counting; ``thaw_ssh`` continues them) or drops (``drop_ssh``: the SSH
  connections are cut, as a laptop's sleep cuts TCP; new ones are accepted);
- an *outage*: for the next N seconds every API call answers a 5xx (``outage``), as when
  Vast is down behind its proxy; the emulator's own ``/_emulator/`` routes still answer.

Python: ``emu.faults.fail_next("create", count=2, status=503)``. HTTP (account key):
``POST /_emulator/faults`` with ``{"fault": "fail_next", "endpoint": "create", "count": 2,
"status": 503}``; ``GET`` lists what is armed; ``DELETE`` disarms everything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

#: boot failures Vast users meet; the first two stay "loading", OCI errors end "exited"
BOOT_FAILURES = {
    "pull rate limit": ("loading", "Error response from daemon: toomanyrequests: You have reached your "
                                   "pull rate limit. You may increase the limit by authenticating and upgrading"),
    "manifest unknown": ("loading", "Error response from daemon: manifest for {image} not found: manifest unknown"),
    "oci runtime": ("exited", "Error response from daemon: failed to create task for container: OCI runtime "
                              "create failed: runc create failed: unable to start container process"),
    "no space left on device": ("exited", "Error: write /var/lib/docker/tmp: no space left on device"),
}


class _Market(Protocol):
    def preempt(self, instance_id: int) -> None: ...
    def set_offline(self, instance_id: int) -> None: ...
    def force_exit(self, instance_id: int, code: int) -> None: ...
    def signal_ssh(self, instance_id: int, action: str) -> None: ...


@dataclass
class BootFault:
    """How one boot goes wrong: the status it stays in and the message it shows."""

    kind: str  # a key of BOOT_FAILURES, or "stuck" (loading forever, no error)
    actual_status: str
    status_msg: str


class Faults:
    """Armed and immediate faults of one emulator (thread-safe: tests call from their thread)."""

    def __init__(self, market: _Market, run_on_loop: Callable[[Callable[[], Any]], Any]) -> None:
        self._market = market
        self._run_on_loop = run_on_loop
        self._lock = threading.Lock()
        self._http: dict[str, list[int]] = {}  # endpoint -> statuses, one per coming call
        self._boots: list[BootFault] = []
        self._races: list[int] = []  # statuses (404/410) of the coming raced creates
        self._impostors = 0  # coming boots whose SSH endpoints present a foreign host key
        self._outage: tuple[float, int] | None = None  # (until, monotonic; status) of an outage

    # ----------------------------------------------------------------- arm
    def fail_next(self, endpoint: str, count: int = 1, status: int = 429) -> None:
        """The next ``count`` calls of ``endpoint`` (a rate-limit endpoint name) get ``status``."""
        if status != 429 and not 500 <= status <= 599:
            raise ValueError(f"fail_next status must be 429 or a 5xx, not {status}")
        with self._lock:
            self._http.setdefault(endpoint, []).extend([int(status)] * int(count))

    def fail_boot(self, kind: str = "pull rate limit", count: int = 1) -> None:
        """The next ``count`` rentals to boot fail with ``kind`` (see BOOT_FAILURES)."""
        if kind not in BOOT_FAILURES:
            raise ValueError(f"unknown boot failure {kind!r}; use one of {', '.join(BOOT_FAILURES)}")
        status, msg = BOOT_FAILURES[kind]
        with self._lock:
            self._boots.extend(BootFault(kind, status, msg) for _ in range(int(count)))

    def stick_loading(self, count: int = 1) -> None:
        """The next ``count`` rentals to boot stay in ``loading`` forever, with no error."""
        with self._lock:
            self._boots.extend(BootFault("stuck", "loading", "Pulling image: waiting for layers")
                               for _ in range(int(count)))

    def race_next_create(self, count: int = 1, status: int = 404) -> None:
        """The next ``count`` creates find their offer just taken by another user (404 or 410)."""
        if status not in (404, 410):
            raise ValueError(f"a raced create answers 404 or 410, not {status}")
        with self._lock:
            self._races.extend([int(status)] * int(count))

    def impostor_ssh(self, count: int = 1) -> None:
        """The next ``count`` boots (or reboots) answer SSH with a host key not the instance's own."""
        with self._lock:
            self._impostors += int(count)

    # ----------------------------------------------------------------- now
    def preempt(self, instance_id: int) -> None:
        """Outbid the interruptible rental ``instance_id``: it goes to ``stopped`` now."""
        self._run_on_loop(lambda: self._market.preempt(int(instance_id)))

    def host_offline(self, instance_id: int) -> None:
        """The host of ``instance_id`` disconnects: ``offline``, its sandbox stopped."""
        self._run_on_loop(lambda: self._market.set_offline(int(instance_id)))

    def container_exit(self, instance_id: int, code: int = 137) -> None:
        """The container of ``instance_id`` dies now with ``code`` (-> ``exited``)."""
        self._run_on_loop(lambda: self._market.force_exit(int(instance_id), int(code)))

    def freeze_ssh(self, instance_id: int) -> None:
        """Freeze the SSH link of ``instance_id`` (SIGSTOP its SSH servers and relays) until :meth:`thaw_ssh`."""
        self._run_on_loop(lambda: self._market.signal_ssh(int(instance_id), "freeze"))

    def thaw_ssh(self, instance_id: int) -> None:
        """Continue what :meth:`freeze_ssh` stopped: connections made meanwhile are then served."""
        self._run_on_loop(lambda: self._market.signal_ssh(int(instance_id), "thaw"))

    def drop_ssh(self, instance_id: int) -> None:
        """Cut every SSH connection to ``instance_id`` now (its workers keep running)."""
        self._run_on_loop(lambda: self._market.signal_ssh(int(instance_id), "drop"))

    def outage(self, seconds: float, status: int = 503) -> None:
        """Every API call answers ``status`` (a 5xx) for the next ``seconds``; 0 ends an outage."""
        if not 500 <= status <= 599:
            raise ValueError(f"an outage answers a 5xx, not {status}")
        with self._lock:
            self._outage = (time.monotonic() + float(seconds), int(status)) if seconds > 0 else None

    def clear(self) -> None:
        """Disarm every armed fault (and end an outage)."""
        with self._lock:
            self._http.clear()
            self._boots.clear()
            self._races.clear()
            self._impostors = 0
            self._outage = None

    def armed(self) -> dict[str, Any]:
        """What is armed, for ``GET /_emulator/faults`` and for test messages."""
        with self._lock:
            return {"http": {k: list(v) for k, v in self._http.items() if v},
                    "boots": [asdict(b) for b in self._boots], "create_races": list(self._races),
                    "impostor_ssh": self._impostors,
                    "outage_s": max(0.0, self._outage[0] - time.monotonic()) if self._outage else 0.0}

    # ----------------------------------------------------------------- consume (event loop)
    def take_http(self, endpoint: str) -> int | None:
        with self._lock:
            pending = self._http.get(endpoint)
            return pending.pop(0) if pending else None

    def outage_status(self) -> int | None:
        """The status every API call answers now (an outage), or None."""
        with self._lock:
            if self._outage is None:
                return None
            until, status = self._outage
            if time.monotonic() >= until:
                self._outage = None
                return None
            return status

    def take_boot(self) -> BootFault | None:
        with self._lock:
            return self._boots.pop(0) if self._boots else None

    def take_impostor(self) -> bool:
        """Whether the boot starting now gets a man in the middle on its SSH endpoints."""
        with self._lock:
            if self._impostors <= 0:
                return False
            self._impostors -= 1
            return True

    def take_race(self) -> int | None:
        """The status (404/410) the next create answers if it is raced, else None."""
        with self._lock:
            return self._races.pop(0) if self._races else None

    # ----------------------------------------------------------------- HTTP
    def apply(self, spec: dict[str, Any]) -> None:
        """Arm or trigger one fault from its JSON form (``{"fault": name, **arguments}``)."""
        actions: dict[str, Callable[..., None]] = {
            "fail_next": self.fail_next, "fail_boot": self.fail_boot, "stick_loading": self.stick_loading,
            "race_next_create": self.race_next_create, "impostor_ssh": self.impostor_ssh, "preempt": self.preempt,
            "host_offline": self.host_offline, "container_exit": self.container_exit, "clear": self.clear,
            "freeze_ssh": self.freeze_ssh, "thaw_ssh": self.thaw_ssh, "drop_ssh": self.drop_ssh,
            "outage": self.outage,
        }
        args = dict(spec)
        name = args.pop("fault", None)
        if name not in actions:
            raise ValueError(f"unknown fault {name!r}; use one of {', '.join(actions)}")
        try:
            actions[name](**args)
        except TypeError as e:
            raise ValueError(f"bad arguments for fault {name!r}: {e}") from e
