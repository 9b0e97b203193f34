"""Where Vast's behaviour is unknown, every plausible answer, switchable: the variants.

The emulator is never kinder than Vast. Where no public source says what Vast does (the
bulk endpoints' answers, remote forwards through the SSH proxy, blocked direct ports,
templates without ``CONTAINER_API_KEY``, soft CPU/memory limits, stalled states, rows
that linger after a destroy, redirects), each plausible behaviour is a *variant* the
emulator can play, so a client can be tested against every one. The table of variants
is :data:`VARIANTS` (``docs/emulator-variants.md`` says the same for users); each has a
default (the emulator's behaviour before variants existed) and a value under the
*strict* profile.

Switch them three ways, before or while the emulator runs::

    Emulator(variants={"bulk_create": "success_only"}, profile="strict")   # Python
    emu.variants.set(ssh_env="none", direct_blocked="0.5")
    dask-vastai emulator --profile strict --variant trailing_slash=redirect_308
    POST /_emulator/variants {"profile": "strict", "values": {"ssh_env": "image"}}

``GET /_emulator/variants`` shows the values and the table; ``DELETE`` restores the
defaults. A value is checked when it is set: a bad name or value raises ``ValueError``
(HTTP 400) with the choices.

The strict profile turns on every variant that (a) Vast plausibly plays for all users
and (b) a client must survive anyway, and leaves off the ones that model a user's own
choice (a template without the key) or a rare fault better armed by a test (stalled
boots, refused bulk offers). See ``STRICT`` for the values and the reasons.

Which hosts a fault picks (a :class:`Selection`): ``none``, ``all``, a fraction such as
``0.25`` (decided per machine by a hash of the seed, the variant's name and the machine
id, so the same offer always gets the same host, run after run), or explicit ids:
``machines:20001,20002``, ``instances:7000001``, ``offers:1000001``. The ``seed``
variant changes which hosts a fraction picks.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .runtime import SandboxQuirks

__all__ = ["VARIANTS", "PROFILES", "STRICT", "Selection", "Variant", "Variants", "CpuView"]


# --------------------------------------------------------------------------- value types
@dataclass(frozen=True)
class Selection:
    """Which hosts (or instances, or offers) a variant applies to."""

    fraction: float = 0.0
    machines: frozenset[int] = frozenset()
    instances: frozenset[int] = frozenset()
    offers: frozenset[int] = frozenset()

    _KINDS = ("machines", "instances", "offers")

    @classmethod
    def parse(cls, value: Any) -> Selection:
        if isinstance(value, Selection):
            return value
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(fraction=1.0)
        if isinstance(value, int | float):
            fraction = float(value)
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"a fraction of hosts is between 0 and 1, not {value}")
            return cls(fraction=fraction)
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls._KINDS)
            if unknown:
                raise ValueError(f"a selection names {', '.join(cls._KINDS)}, not {', '.join(sorted(unknown))}")
            return cls(**{k: frozenset(int(i) for i in v) for k, v in value.items()})
        text = str(value).strip().lower()
        if text in ("", "none", "off", "0"):
            return cls()
        if text in ("all", "on", "1"):
            return cls(fraction=1.0)
        kind, sep, ids = text.partition(":")
        if sep:
            if kind not in cls._KINDS:
                raise ValueError(f"{value!r}: ids are given as machines:ID,..., instances:ID,... or offers:ID,...")
            try:
                return cls(**{kind: frozenset(int(i) for i in ids.split(",") if i.strip())})
            except ValueError as e:
                raise ValueError(f"{value!r}: the ids must be integers") from e
        try:
            return cls.parse(float(text))
        except ValueError as e:
            raise ValueError(f"{value!r} is not a selection: use none, all, a fraction such as 0.25, "
                             "machines:ID,..., instances:ID,... or offers:ID,...") from e

    def picks(self, seed: int, salt: str, key: int | None, *, machine_id: int | None = None,
              instance_id: int | None = None, offer_id: int | None = None) -> bool:
        """Whether this selection takes the thing with these ids; a fraction hashes ``key``."""
        if machine_id in self.machines or instance_id in self.instances or offer_id in self.offers:
            return True
        if self.fraction <= 0.0 or key is None:
            return False
        if self.fraction >= 1.0:
            return True
        digest = hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.fraction

    def __str__(self) -> str:
        parts = [f"{kind}:{','.join(str(i) for i in sorted(getattr(self, kind)))}"
                 for kind in self._KINDS if getattr(self, kind)]
        if self.fraction >= 1.0:
            parts.insert(0, "all")
        elif self.fraction > 0.0:
            parts.insert(0, f"{self.fraction:g}")
        return " ".join(parts) or "none"


@dataclass(frozen=True)
class CpuView:
    """What the instance's ``/proc/cpuinfo``, ``/proc/meminfo``, ``os.cpu_count()`` and ``nproc`` say."""

    kind: str  # "host" (the emulator machine's own), "honest" (the offer's), "soft" (a big host)
    cores: int = 0  # for soft: the host's cores; honest takes the offer's
    ram_gb: int = 0

    SOFT_CORES = 384
    SOFT_RAM_GB = 1024

    @classmethod
    def parse(cls, value: Any) -> CpuView:
        if isinstance(value, CpuView):
            return value
        text = str(value).strip().lower()
        if text in ("host", "honest"):
            return cls(text)
        if text == "soft":
            return cls("soft", cls.SOFT_CORES, cls.SOFT_RAM_GB)
        kind, _, rest = text.partition(":")
        cores, _, ram = rest.partition(":")
        if kind == "soft" and cores.isdigit() and ram.isdigit() and int(cores) > 0 and int(ram) > 0:
            return cls("soft", int(cores), int(ram))
        raise ValueError(f"{value!r} is not a CPU view: use host, honest, soft or soft:CORES:RAM_GB")

    def for_offer(self, offer: Mapping[str, Any]) -> tuple[int, int] | None:
        """(cores, RAM in MB) the instance sees on this offer; None for the machine's own view."""
        cores_offered = max(1, math.floor(float(offer.get("cpu_cores_effective") or 1)))
        ram_offered_mb = int(offer.get("cpu_ram") or 1024)
        if self.kind == "honest":
            return cores_offered, ram_offered_mb
        if self.kind == "soft":  # a share of a bigger machine: always more than the offer says
            return max(self.cores, 2 * cores_offered), max(self.ram_gb * 1024, 2 * ram_offered_mb)
        return None

    def __str__(self) -> str:
        if self.kind == "soft" and (self.cores, self.ram_gb) != (self.SOFT_CORES, self.SOFT_RAM_GB):
            return f"soft:{self.cores}:{self.ram_gb}"
        return self.kind


def _choice(*values: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in values:
            raise ValueError(f"{value!r} is not one of {', '.join(values)}")
        return text
    return parse


def _number(convert: Callable[[Any], Any], what: str, low: float | None = None) -> Callable[[Any], Any]:
    """A parser of numbers of at least ``low`` (NaN refused)."""
    def parse(value: Any) -> Any:
        try:
            number = convert(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{value!r} is not {what}") from e
        if number != number or (low is not None and number < low):
            raise ValueError(f"{value!r} must be >= {low}")
        return number
    return parse


_seconds = _number(float, "a number of seconds (inf for forever)", 0)
_positive_int = _number(int, "an integer", 1)
_integer = _number(int, "an integer")


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or str(value).strip().lower() in ("none", "off", ""):
            return None
        return parse(value)
    return parse_optional


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Variant:
    """One switchable behaviour: its values, what the emulator did before, why it is plausible."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    values: str  # the choices, for humans
    doc: str
    #: what ``--variant NAME`` without ``=VALUE`` means; None: a value is required
    flag: Any = None


#: status_msg of a boot stalled in each state (variant boot_stall)
STALL_MESSAGES = {
    "created": "Error response from daemon: failed to create task for container: OCI runtime create failed: "
               "runc create failed: unable to start container process: error during container init: "
               "nvidia-container-cli: initialization error: nvml error: driver not loaded: unknown",
    "scheduling": "Scheduling: waiting for the machine's GPUs to be released",
    "frozen": "Instance frozen by the host",
}

OUTBID_MSG = "Instance outbid: an interruptible rental was preempted by a higher bid"

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("missing_route", "json", _choice("json", "html", "text"), "json | html | text",
            "What an unknown route (and an absent bulk route, and a slashless path under "
            "trailing_slash=strict) answers with its 404: Vast's JSON error, the HTML page of a web "
            "server, or plain text. Vast's own 404 body is not documented.", flag="html"),
    Variant("trailing_slash", "lenient",
            _choice("lenient", "strict", "redirect_301", "redirect_308", "off_origin", "off_origin_all"),
            "lenient | strict | redirect_301 | redirect_308 | off_origin | off_origin_all",
            "Vast's route table has the slash (/api/v0/users/current/); the SDK calls it without and "
            "follows redirects. lenient: both work; strict: the slashless path is a missing route; "
            "redirect_*: a same-origin redirect to the slashed path; off_origin: a 301 to another origin "
            "(a port of this emulator that records who follows), off_origin_all: every API call is.",
            flag="redirect_301"),
    Variant("retry_after_s", None, _optional(_seconds), "none | SECONDS",
            "A Retry-After header (seconds) on every 429. Vast's docs say none is sent; the SDK 1.9.1 "
            "honours one when present."),
    Variant("bulk_create", "results", _choice("results", "success_only", "ids", "id_list", "absent"),
            "results | success_only | ids | id_list | absent",
            "The answer of POST /api/v0/asks/bulk/ (no public source shows it): per-offer results, a bare "
            "{\"success\": true}, {\"success\": true, \"new_contracts\": [ids]}, a bare JSON list of ids, "
            "or no such route (a 404 shaped by missing_route).", flag="success_only"),
    Variant("bulk_create_refused", Selection(), Selection.parse, "SELECTION (offers)",
            "Offers of a bulk create that are refused as taken by another user while the others are "
            "rented; only bulk_create=results says which.", flag=Selection(fraction=0.5)),
    Variant("bulk_destroy", "results", _choice("results", "success_only", "absent"),
            "results | success_only | absent",
            "The answer of DELETE /api/v0/instances/ {\"instance_ids\": [...]}: per-id results, a bare "
            "{\"success\": true}, or no such route.", flag="success_only"),
    Variant("bulk_destroy_survivors", Selection(), Selection.parse, "SELECTION (instances)",
            "Instances a bulk destroy reports destroyed but leaves running and billing (once each: the "
            "next destroy takes them). A client must list again after destroying.",
            flag=Selection(fraction=0.5)),
    Variant("direct_blocked", Selection(), Selection.parse, "SELECTION (hosts)",
            "Hosts whose direct (mapped) ports do not answer: SkyPilot reports direct SSH timing out on "
            "some Vast hosts. The row still lists the ports.", flag=Selection(fraction=1.0)),
    Variant("direct_blocked_mode", "hang", _choice("hang", "refuse"), "hang | refuse",
            "How a blocked direct port fails: hang (SYNs dropped, connect times out) or refuse (RST)."),
    Variant("direct_blocked_ports", "ssh", _choice("ssh", "all"), "ssh | all",
            "Which direct ports a blocked host blocks: only the SSH port (22) or every mapped port."),
    Variant("proxy_broken", Selection(), Selection.parse, "SELECTION (hosts)",
            "Hosts whose Vast SSH proxy is broken until the instance is rebooted once (the snakemake "
            "plugin reboots once on 'port forwarding failed'; -R through the proxy is undocumented).",
            flag=Selection(fraction=1.0)),
    Variant("proxy_broken_mode", "no_remote_forward", _choice("no_remote_forward", "dead"),
            "no_remote_forward | dead",
            "no_remote_forward: the proxy endpoint logs in but refuses ssh -R ('remote port forwarding "
            "failed'); dead: it refuses connections and the container log says 'remote port forwarding "
            "failed'."),
    Variant("ssh_env", "container", _choice("container", "image", "none"), "container | image | none",
            "What an SSH session's environment holds. Vast's docs: SSH sessions do not see the container's "
            "env (CONTAINER_API_KEY, -e variables, VAST_TCP_PORT_*). container: they do (the emulator "
            "before variants); image: only the image's PATH and LANG; none: sshd's defaults (its PATH "
            "plus the driver's tools). /proc/1/environ keeps the container's env in every case.",
            flag="none"),
    Variant("container_api_key", "injected", _choice("injected", "absent"), "injected | absent",
            "Whether CONTAINER_API_KEY is injected (Vast's standard templates do; Vast's base-image tests "
            "say a template without it is supported): absent from onstart's env, SSH and /proc/1/environ.",
            flag="absent"),
    Variant("cpu_view", CpuView("host"), CpuView.parse, "host | honest | soft | soft:CORES:RAM_GB",
            "What the instance sees of CPUs and memory (/proc/cpuinfo, /proc/meminfo, "
            "/sys/devices/system/cpu/online, so os.cpu_count(), psutil, nproc): host: the emulator "
            "machine's; honest: the offer's cpu_cores_effective and cpu_ram (affinity narrowed to as "
            "many real CPUs as exist); soft: a share of a big host, 384 cores and 1 TB by default "
            "(Vast's CPU and memory are soft shares).", flag=CpuView("soft", 384, 1024)),
    Variant("boot_stall", "none", _choice("none", "created", "scheduling", "frozen"),
            "none | created | scheduling | frozen",
            "The state a boot stalls in before loading, on the hosts of boot_stall_hosts for "
            "boot_stall_s: created (an OCI failure before loading, in status_msg), scheduling (a restart "
            "whose GPU went elsewhere), frozen. Billed at the full rate meanwhile."),
    Variant("boot_stall_hosts", Selection(fraction=1.0), Selection.parse, "SELECTION (hosts)",
            "The hosts boot_stall applies to (all by default)."),
    Variant("boot_stall_s", math.inf, _seconds, "SECONDS | inf",
            "How long a stalled boot stays stalled before it loads (inf: forever)."),
    Variant("outbid_intended", "running", _choice("running", "stopped"), "running | stopped",
            "An outbid interruptible rental's intended_status: stays running (it resumes when it wins "
            "again) or becomes stopped. actual_status is stopped either way."),
    Variant("outbid_msg", OUTBID_MSG, _text, "TEXT",
            "An outbid rental's status_msg; empty: no message (status_msg is free text on Vast)."),
    Variant("destroy_linger_s", 0.0, _seconds, "SECONDS",
            "Seconds a destroyed instance stays listed (show and lists) while its teardown runs; "
            "billing has stopped and its key is dead; destroying it again succeeds."),
    Variant("destroy_linger_status", "exited", _choice("exited", "destroying"), "exited | destroying",
            "The actual_status of a lingering destroyed row (cur_state is 'unloaded')."),
    Variant("onstart_max_chars", None, _optional(_positive_int), "none | CHARS",
            "The longest onstart a create accepts (400 invalid_args beyond): Vast documents 4048 "
            "characters (OpenAPI) and 16 KB (CLI hello-world).", flag=4048),
    Variant("seed", 0, _integer, "INTEGER", "Which hosts a fraction picks (the same seed, the same hosts)."),
]}


#: The strict profile: the defensible variants at once, meant to be the tests' default.
#: Each value: why it is defensible (the evidence) and why a client must survive it.
STRICT: dict[str, Any] = {
    # Vast's 404 body is unknown; an HTML page is what web servers send, and breaks JSON-only parsers.
    "missing_route": "html",
    # The SDK calls /users/current without the slash and follows redirects: Vast redirects.
    "trailing_slash": "redirect_301",
    # No public source shows a bulk answer: the least informative 2xx.
    "bulk_create": "success_only",
    "bulk_destroy": "success_only",
    # A destroy is answered before teardown; a client re-lists after destroying.
    "bulk_destroy_survivors": Selection(fraction=0.25),
    "destroy_linger_s": 5.0,
    # SkyPilot: direct SSH times out on some hosts; -R through the proxy is undocumented and the
    # snakemake plugin reboots once when the proxy's forwarding failed.
    "direct_blocked": Selection(fraction=0.25),
    "proxy_broken": Selection(fraction=0.25),
    # Vast's docs: SSH sessions do not see the container's environment.
    "ssh_env": "none",
    # Vast's CPU and memory are soft shares: the box looks bigger than the offer.
    "cpu_view": CpuView("soft", CpuView.SOFT_CORES, CpuView.SOFT_RAM_GB),
    # status_msg is free text: no hint that a stop was an outbid.
    "outbid_msg": "",
    # The smaller of the two documented limits.
    "onstart_max_chars": 4048,
}

#: named sets of values applied over the defaults
PROFILES: dict[str, dict[str, Any]] = {"default": {}, "strict": STRICT}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Selection | CpuView):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


class Variants:
    """The variants one emulator plays now (thread-safe: tests set them from their thread)."""

    def __init__(self, values: Mapping[str, Any] | None = None, profile: str | None = None) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self.profile = "default"
        self.reset(profile)
        if values:
            self.set(values)

    # ----------------------------------------------------------------- set
    @staticmethod
    def parse(name: str, value: Any) -> Any:
        """``value`` for variant ``name`` in its canonical form; ValueError names the choices."""
        variant = VARIANTS.get(name)
        if variant is None:
            raise ValueError(f"unknown variant {name!r}; the variants are: {', '.join(VARIANTS)}")
        try:
            return variant.parse(value)
        except ValueError as e:
            raise ValueError(f"variant {name}: {e} (values: {variant.values})") from None

    @staticmethod
    def parse_option(text: str) -> tuple[str, Any]:
        """``NAME=VALUE`` or ``NAME`` (the variant's flag value) from the command line."""
        name, sep, value = text.partition("=")
        name = name.strip().replace("-", "_")
        variant = VARIANTS.get(name)
        if variant is None:
            raise ValueError(f"unknown variant {name!r}; the variants are: {', '.join(VARIANTS)}")
        if not sep:
            if variant.flag is None:
                raise ValueError(f"--variant {name} needs a value: {name}=VALUE ({variant.values})")
            return name, variant.flag
        return name, Variants.parse(name, value)

    def set(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set variants by name: ``set(ssh_env="none")`` or ``set({"ssh_env": "none"})``; all or none."""
        merged = {**(values or {}), **more}
        parsed = {name: self.parse(name, value) for name, value in merged.items()}
        with self._lock:
            self._values.update(parsed)

    def reset(self, profile: str | None = None) -> None:
        """Back to the defaults, then ``profile``'s values ("default" or "strict")."""
        name = profile or "default"
        if name not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
        values = {v.name: v.default for v in VARIANTS.values()}
        values.update(PROFILES[name])
        with self._lock:
            self._values = values
            self.profile = name

    # ----------------------------------------------------------------- read
    def __getitem__(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def as_dict(self) -> dict[str, Any]:
        """Every variant's value, in JSON-friendly form."""
        with self._lock:
            return {name: _jsonable(value) for name, value in self._values.items()}

    def changed(self) -> dict[str, Any]:
        """The variants whose value differs from the default."""
        with self._lock:
            return {name: _jsonable(value) for name, value in self._values.items()
                    if value != VARIANTS[name].default}

    def describe(self) -> dict[str, Any]:
        """For ``GET /_emulator/variants``: the profile, the values, and the table."""
        return {"profile": self.profile, "values": self.as_dict(), "changed": self.changed(),
                "variants": [{"name": v.name, "values": v.values, "default": _jsonable(v.default),
                              "strict": _jsonable(STRICT.get(v.name, v.default)), "doc": v.doc}
                             for v in VARIANTS.values()]}

    def picks(self, name: str, key: int | None, **ids: int | None) -> bool:
        """Whether the selection variant ``name`` takes the thing (``key`` is what a fraction hashes)."""
        with self._lock:
            selection: Selection = self._values[name]
            seed = self._values["seed"]
        return selection.picks(seed, name, key, **ids)

    def picks_host(self, name: str, offer: Mapping[str, Any], instance_id: int | None = None) -> bool:
        """Whether the host selection ``name`` takes the machine of ``offer`` (or this instance)."""
        machine_id = offer.get("machine_id")
        return self.picks(name, machine_id, machine_id=machine_id, instance_id=instance_id,
                          offer_id=offer.get("id"))


def describe_table(variants: Iterable[Variant] = VARIANTS.values()) -> str:
    """The variants as plain text lines (``dask-vastai emulator --list-variants``)."""
    def text(value: Any) -> str:
        return "none" if value is None else str(_jsonable(value))

    lines = []
    for v in variants:
        lines.append(f"{v.name} = {v.values}")
        lines.append(f"    default: {text(v.default)}"
                     + (f"; strict: {text(STRICT[v.name])}" if v.name in STRICT else "")
                     + (f"; --variant {v.name} alone: {text(v.flag)}" if v.flag is not None else ""))
        lines.append(f"    {v.doc}")
    return "\n".join(lines)


def sandbox_quirks(variants: Variants, offer: Mapping[str, Any], instance_id: int,
                   container_ports: Iterable[int], reboots: int) -> SandboxQuirks:
    """How the host of one boot differs from a plain one, as the variants say."""
    blocked: tuple[int, ...] = ()
    if variants.picks_host("direct_blocked", offer, instance_id):
        ports = tuple(container_ports)
        blocked = ports if variants["direct_blocked_ports"] == "all" else tuple(p for p in ports if p == 22)
    proxy = "ok"
    if reboots == 0 and variants.picks_host("proxy_broken", offer, instance_id):
        proxy = variants["proxy_broken_mode"]  # a reboot mends it, as the snakemake plugin's does
    return SandboxQuirks(ssh_env=variants["ssh_env"], blocked_ports=blocked,
                         blocked_mode=variants["direct_blocked_mode"], proxy=proxy,
                         cpu_view=variants["cpu_view"].for_offer(offer))
