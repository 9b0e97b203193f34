"""The typed records of Vast's wire: what a create sends and answers, and the rows of search
and of ``show instances``.

Vast's rows are loosely typed JSON: a field may be missing or ``null``, a number may come
as a string, and some fields have two spellings (``reliability``/``reliability2``,
``verified``/``verification``). So every row is read leniently (a missing or unreadable
field becomes 0 or None, never a ``KeyError``) and kept whole in ``raw`` for what the
record does not name. Units stay Vast's (MB, GB, $/h) and the field names say which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


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
            # Vast maps a container port above 70000 to an identical random external port.
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
class CreatedInstance:
    """What a successful create returns: the new instance's id (Vast's ``new_contract``).

    Only the answer of one call; the life of the instance it starts (boot, billing, destroy)
    is what the rest of the product calls a rental.
    """

    instance_id: int
    offer_id: int
    instance_api_key: str | None = field(default=None, repr=False)
    #: False for a rental a bulk create made without saying for which offer: it was found under
    #: the call's label and stands on ``offer_id`` only as one of the call's offers (its machine
    #: may be another offer's; its instance row says which)
    placed: bool = True


# ----------------------------------------------------------------------------- lenient fields


def _float(value: Any, default: float = 0.0) -> float:
    """``value`` as a float, or ``default`` when it is missing or not a number."""
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


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


# ----------------------------------------------------------------------------- rows


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


@dataclass(frozen=True)
class Offer:
    """One rentable machine (a Vast "ask") in the units Vast reports: MB, GB, $/h."""

    id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: float
    gpu_total_ram_mb: float
    cpu_cores_effective: float
    cpu_ram_mb: float
    disk_space_gb: float
    dph_total: float
    min_bid: float
    reliability: float
    geolocation: str | None
    datacenter: bool
    verified: bool
    direct_port_count: int
    cuda_max_good: float
    inet_down: float
    #: what Vast bills per GB the instance sends (up) and receives (down), $/GB
    inet_up_cost: float = 0.0
    inet_down_cost: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> Offer:
        """An offer from a search result row (missing fields become 0/None, never KeyError)."""
        num_gpus = int(_float(row.get("num_gpus"), 0))
        gpu_ram = _float(row.get("gpu_ram"))
        reliability = row.get("reliability", row.get("reliability2"))
        verified = row.get("verified")
        if verified is None:
            verified = row.get("verification") == "verified"
        return cls(
            id=int(row["id"]),
            gpu_name=str(row.get("gpu_name") or ""),
            num_gpus=num_gpus,
            gpu_ram_mb=gpu_ram,
            gpu_total_ram_mb=_float(row.get("gpu_total_ram"), gpu_ram * num_gpus),
            cpu_cores_effective=_float(row.get("cpu_cores_effective"), _float(row.get("cpu_cores"))),
            cpu_ram_mb=_float(row.get("cpu_ram")),
            disk_space_gb=_float(row.get("disk_space")),
            dph_total=_float(row.get("dph_total")),
            min_bid=_float(row.get("min_bid")),
            reliability=_float(reliability),
            geolocation=(str(row["geolocation"]).strip() if row.get("geolocation") else None),
            datacenter=row.get("hosting_type") == 1 or row.get("datacenter") is True,
            verified=bool(verified),
            direct_port_count=int(_float(row.get("direct_port_count"))),
            cuda_max_good=_float(row.get("cuda_max_good")),
            inet_down=_float(row.get("inet_down")),
            inet_up_cost=_float(row.get("inet_up_cost")),
            inet_down_cost=_float(row.get("inet_down_cost")),
            raw=dict(row),
        )

    @property
    def country(self) -> str | None:
        """The ISO-2 code that ends Vast's geolocation string (``"Warsaw, PL"`` -> ``"PL"``)."""
        if not self.geolocation:
            return None
        code = self.geolocation.strip()[-2:].upper()
        return code if code.isalpha() else None
