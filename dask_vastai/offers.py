"""What to rent: instance requirements, GPU names and regions, and the no-match message.

Users already know the ``vastai search offers`` syntax (``gpu_name=RTX_4090 num_gpus>=2
dph_total<0.5 geolocation in [DE,PL]``), so requirements are turned into that text first
(``OfferRequirements.query_text()``, which a user can paste into the CLI) and then parsed
exactly as the official SDK parses it (:mod:`dask_vastai.vast.query`), so the server sees the
same JSON whichever client sent it. For the SDK's ``georegion=true`` directive, which is not
supported, use ``region=`` here (or ``geolocation in [..]``).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .display import TextTable, usd_per_hour
from .vast import Offer
from .vast.query import STRING_QUERY_DEFAULTS, parse_order, parse_query

if TYPE_CHECKING:
    from .vast import VastAPI

# ----------------------------------------------------------------------------- GPU names and regions

#: Vast's own ``gpu_name`` spellings (what search results carry).
KNOWN_GPU_NAMES: tuple[str, ...] = (
    "GTX 1070", "GTX 1080", "GTX 1080 Ti", "GTX 1660 Ti",
    "RTX 2060", "RTX 2070", "RTX 2080", "RTX 2080 Ti",
    "RTX 3060", "RTX 3060 Ti", "RTX 3070", "RTX 3070 Ti", "RTX 3080", "RTX 3080 Ti",
    "RTX 3090", "RTX 3090 Ti",
    "RTX 4060", "RTX 4060 Ti", "RTX 4070", "RTX 4070S", "RTX 4070 Ti", "RTX 4070S Ti",
    "RTX 4080", "RTX 4080S", "RTX 4090", "RTX 4090D",
    "RTX 5060 Ti", "RTX 5070", "RTX 5070 Ti", "RTX 5080", "RTX 5090",
    "RTX A2000", "RTX A4000", "RTX A4500", "RTX A5000", "RTX A6000",
    "RTX 4000Ada", "RTX 5000Ada", "RTX 6000Ada", "RTX PRO 6000 WS", "RTX PRO 6000 S",
    "Q RTX 4000", "Q RTX 5000", "Q RTX 6000", "Q RTX 8000", "Titan RTX", "Titan V", "Titan Xp",
    "Tesla T4", "Tesla V100", "Tesla P100", "Tesla P40", "Tesla P4", "Tesla K80",
    "A2", "A10", "A10g", "A16", "A30", "A40",
    "A100 PCIE", "A100 SXM4", "A100X", "A800 PCIE",
    "H100 PCIE", "H100 SXM", "H100 NVL", "H200", "H200 NVL", "GH200 SXM", "B200",
    "L4", "L40", "L40S",
)


def _gpu_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).upper()


_GPU_BY_KEY = {_gpu_key(n): n for n in KNOWN_GPU_NAMES}


def canonical_gpu_name(name: str) -> str | None:
    """Vast's spelling of ``name`` (``RTX_3090``, ``rtx 3090``, ``RTX3090`` -> ``RTX 3090``), or None."""
    return _GPU_BY_KEY.get(_gpu_key(name))


def close_gpu_names(name: str, n: int = 4) -> list[str]:
    """Known GPU names that look like ``name`` (for an error message)."""
    key = _gpu_key(name)
    containing = [v for k, v in _GPU_BY_KEY.items() if key and key in k]
    close = [_GPU_BY_KEY[k] for k in difflib.get_close_matches(key, list(_GPU_BY_KEY), n=n, cutoff=0.6)]
    return list(dict.fromkeys(containing + close))[:n]


def unknown_gpu_message(name: str) -> str:
    """The answer to a GPU name Vast does not list: the close names, and where to look."""
    close = [c.replace(" ", "_") for c in close_gpu_names(name)]
    near = f"close names: {', '.join(close)}" if close else "no known name is close"
    example = close[0] if close else "RTX_4090"
    return (
        f"gpu={name!r} is not a GPU model Vast lists ({near}); `dask-vastai offers --gpu {example}` shows "
        "what is offered and `dask-vastai gpus` every known name. For a model not listed there, give "
        "no gpu and query='gpu_name=<name>'."
    )


def _codes(text: str) -> tuple[str, ...]:
    return tuple(text.split())


#: Continents to ISO-2 country codes, as the existing Vast tools group them (Vast's
#: ``geolocation`` strings end in the country code, which is what ``geolocation in [..]`` matches).
REGIONS: Mapping[str, tuple[str, ...]] = {
    "EU": _codes(
        "AL AD AT BY BE BA BG HR CY CZ DK EE FI FR DE GR HU IS IE IT XK LV LI LT LU MT MD MC ME "
        "NL MK NO PL PT RO RU SM RS SK SI ES SE CH UA GB VA"
    ),
    "NA": _codes("US CA"),
    "LC": _codes(
        "AG AR BS BB BZ BO BR CL CO CR CU DM DO EC SV GD GT GY HT HN JM MX NI PA PY PE PR KN LC "
        "VC SR TT UY VE"
    ),
    "AS": _codes(
        "AE AF AM AZ BD BH BN BT CN GE HK ID IL IN IQ IR JO JP KG KH KP KR KW KZ LA LB LK MM MN "
        "MO MV MY NP OM PH PK PS QA SA SG SY TH TJ TL TM TR TW UZ VN YE"
    ),
    "OC": _codes("AU FJ FM GU KI MH NC NR NZ PF PG PW SB TO TV VU WS"),
    "AF": _codes(
        "DZ AO BJ BW BF BI CM CV CF TD KM CD CG CI DJ EG GQ ER ET GA GM GH GN GW KE LS LR LY MG "
        "MW ML MR MU MA MZ NA NE NG RW ST SN SC SL SO ZA SS SD SZ TZ TG TN UG ZM ZW"
    ),
}
_COUNTRIES = frozenset(c for codes in REGIONS.values() for c in codes)


def region_codes(region: str | Sequence[str]) -> list[str]:
    """Country codes for ``"EU"``, ``"DE,PL"``, ``["EU", "US"]``; ValueError for an unknown code.

    A region name wins over the country with the same code (``NA`` is North America).
    """
    items = region.split(",") if isinstance(region, str) else list(region)
    codes: list[str] = []
    for item in items:
        code = str(item).strip().upper()
        if not code:
            continue
        if code in REGIONS:
            new = list(REGIONS[code])
        elif code in _COUNTRIES:
            new = [code]
        else:
            close = difflib.get_close_matches(code, sorted(_COUNTRIES | set(REGIONS)), n=3)
            raise ValueError(
                f"region={region!r}: {item!r} is neither a region ({', '.join(REGIONS)}) nor an "
                f"ISO-2 country code{' (did you mean ' + ', '.join(close) + '?)' if close else ''}. "
                "Write e.g. region='EU' or region='DE,PL'."
            )
        codes.extend(c for c in new if c not in codes)
    if not codes:
        raise ValueError(f"region={region!r} names no region; write e.g. region='EU' or region='DE,PL'")
    return codes


# ----------------------------------------------------------------------------- requirements


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class OfferRequirements:
    """What one instance must have; turned into a ``vastai search offers`` query.

    ``num_gpus`` is exact (an 8-GPU machine is not a 1-GPU machine at 8x the price);
    sizes are per instance in GB (``gpu_ram_gb`` per GPU), prices in $/h including storage.
    """

    gpu: str | Sequence[str] | None = None
    num_gpus: int = 1
    gpu_ram_gb: float | None = None
    cpu_ram_gb: float | None = None
    cpu_cores: float | None = None
    disk_gb: float = 40.0
    max_price: float | None = None
    region: str | Sequence[str] | None = None
    datacenter: bool = True
    reliability: float = 0.98
    query: str = ""
    order: str = "dph_total"
    interruptible: bool = False
    #: interruptible: a bid in $/h (offers whose ``min_bid`` is higher are not searched), or
    #: None to bid ``bid_factor`` times the offers' ``min_bid``
    bid_usd: float | None = None
    bid_factor: float = 1.0
    #: the CUDA the driver must support (``cuda_max_good>=``), e.g. "12.1" for torch+cu121
    min_cuda: str | None = None
    #: mapped ports an instance needs (``direct_port_count>=``): direct mode's workers and SSH
    min_direct_ports: int | None = None

    def gpu_names(self) -> list[str]:
        """The GPU models asked for, in Vast's spelling (unknown names kept as written)."""
        if self.gpu is None:
            return []
        names = [self.gpu] if isinstance(self.gpu, str) else list(self.gpu)
        return [canonical_gpu_name(n) or str(n).replace("_", " ") for n in names if str(n).strip()]

    def validate(self) -> None:
        """Raise ``ValueError`` (the bad value and the fix) for anything Vast would not match."""
        raw_gpus = [] if self.gpu is None else ([self.gpu] if isinstance(self.gpu, str) else list(self.gpu))
        for name in raw_gpus:
            if canonical_gpu_name(str(name)) is None:
                raise ValueError(unknown_gpu_message(str(name)))
        if not isinstance(self.num_gpus, int) or isinstance(self.num_gpus, bool) or self.num_gpus < 1:
            raise ValueError(f"num_gpus={self.num_gpus!r}: an instance needs at least 1 GPU (an integer)")
        for label, value in (
            ("gpu_ram", self.gpu_ram_gb), ("cpu_ram", self.cpu_ram_gb), ("cpu_cores", self.cpu_cores),
            ("disk", self.disk_gb), ("max_price", self.max_price),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"{label}={value!r} must be a positive number (or None for no limit)")
        if self.bid_usd is not None and (isinstance(self.bid_usd, bool) or not self.bid_usd > 0):
            raise ValueError(f"bid={self.bid_usd!r}: a bid is a positive number of $/h (or '1.2x': times min_bid)")
        if not self.bid_factor >= 1.0:
            raise ValueError(
                f"bid='{self.bid_factor:g}x': Vast refuses a bid below an offer's min_bid; give 1x or more"
            )
        if not 0.0 <= float(self.reliability) <= 1.0:
            raise ValueError(
                f"reliability={self.reliability!r} must be between 0 and 1 (0.98 = the host was up 98% of the time)"
            )
        if self.region is not None:
            region_codes(self.region)
        if self.query:
            try:
                parse_query(self.query)
            except ValueError as e:
                raise ValueError(f"query={self.query!r} is not a valid `vastai search offers` query: {e}") from None
        if not parse_order(self.order):
            raise ValueError(f"order={self.order!r} names no field; write e.g. order='dph_total'")

    def query_text(self) -> str:
        """The ``vastai search offers`` query, readable and ready to paste into the CLI."""
        terms: list[str] = []
        gpus = [n.replace(" ", "_") for n in self.gpu_names()]
        if len(gpus) == 1:
            terms.append(f"gpu_name={gpus[0]}")
        elif gpus:
            terms.append(f"gpu_name in [{','.join(gpus)}]")
        terms.append(f"num_gpus={self.num_gpus}")
        if self.gpu_ram_gb is not None:
            terms.append(f"gpu_ram>={_fmt(self.gpu_ram_gb)}")
        if self.cpu_ram_gb is not None:
            terms.append(f"cpu_ram>={_fmt(self.cpu_ram_gb)}")
        if self.cpu_cores is not None:
            terms.append(f"cpu_cores_effective>={_fmt(self.cpu_cores)}")
        if self.disk_gb:
            terms.append(f"disk_space>={_fmt(self.disk_gb)}")
        if self.max_price is not None:
            terms.append(f"dph_total<={_fmt(self.max_price)}")
        if self.interruptible and self.bid_usd is not None:
            terms.append(f"min_bid<={_fmt(self.bid_usd)}")  # Vast refuses a bid below min_bid
        if self.reliability:
            terms.append(f"reliability>={_fmt(self.reliability)}")
        if self.datacenter:
            terms.append("datacenter=true")
        if self.region is not None:
            terms.append(f"geolocation in [{','.join(region_codes(self.region))}]")
        if self.query.strip():
            terms.append(self.query.strip())
        if self.min_cuda is not None:
            # after the user's query, unless it already asks for as much or more
            asked = parse_query(self.query).get("cuda_max_good", {}).get("gte") if self.query.strip() else None
            if asked is None or float(asked) < float(self.min_cuda):
                terms.append(f"cuda_max_good>={self.min_cuda}")
        if self.min_direct_ports:
            asked = parse_query(self.query).get("direct_port_count", {}).get("gte") if self.query.strip() else None
            if asked is None or float(asked) < self.min_direct_ports:
                terms.append(f"direct_port_count>={self.min_direct_ports}")
        return " ".join(terms)

    def bid_price(self, min_bids: Sequence[float]) -> float | None:
        """The bid ($/h) of one create call for offers with these ``min_bid`` s; None on demand.

        A call carries one price for all its offers, so a multiple of ``min_bid`` is taken of
        the highest: every offer of the call accepts it.
        """
        if not self.interruptible:
            return None
        if self.bid_usd is not None:
            return float(self.bid_usd)
        return round(max(min_bids) * self.bid_factor, 6)

    def filters(self) -> dict[str, Any]:
        """The filter dict sent to Vast: :meth:`query_text` parsed with the SDK's defaults.

        Also ``rented=false``. A default the user's ``query`` drops with a wildcard
        (``verified=any``) is sent as an empty filter, so that the dict defaults that
        :func:`~dask_vastai.vast.query.search_body` adds cannot bring it back.
        """
        defaults = {**STRING_QUERY_DEFAULTS, "rented": {"eq": False}}
        parsed = parse_query(self.query_text(), defaults)
        for key in defaults:
            parsed.setdefault(key, {})
        return parsed


@dataclass(frozen=True)
class OfferPreview:
    """What ``cluster.offers()`` shows: the query as sent and what it matched."""

    query_text: str
    query: dict[str, Any]
    offers: list[Offer]

    def __repr__(self) -> str:
        lines = [f"query: {self.query_text}", f"{len(self.offers)} offers:"]
        for o in self.offers:
            lines.append(
                f"  {o.id}: {o.num_gpus}x {o.gpu_name} {o.gpu_ram_mb / 1024:.0f} GB, "
                f"{o.cpu_cores_effective:g} CPUs, ${o.dph_total:.3f}/h, {o.geolocation}, "
                f"reliability {o.reliability:.3f}"
            )
        return "\n".join(lines)

    def text_table(self) -> TextTable:
        """The offers as a table (HTML in a notebook, ``rich`` in a terminal)."""
        rows = [
            [str(o.id), o.gpu_name, str(o.num_gpus), f"{o.gpu_ram_mb / 1024:.0f} GB",
             f"{o.cpu_cores_effective:g}", f"{o.cpu_ram_mb / 1024:.0f} GB", usd_per_hour(o.dph_total),
             f"{o.reliability:.3f}", o.geolocation or "", "datacenter" if o.datacenter else "hobbyist"]
            for o in self.offers
        ]
        return TextTable(
            ("offer", "GPU", "#", "GPU RAM", "CPUs", "RAM", "$/h", "reliability", "where", "host"),
            rows, title=f"query: {self.query_text}", notes=(f"{len(self.offers)} offer(s)",),
            empty="no offer matches",
        )

    def _repr_html_(self) -> str:
        return self.text_table().html()

    def __rich__(self) -> Any:
        return self.text_table().rich()


async def preview_offers(api: VastAPI, req: OfferRequirements, *, limit: int = 10) -> OfferPreview:
    """What ``req`` matches now, searched exactly as a rental searches (order, bid or on-demand, disk).

    The one search behind ``cluster.offers()`` and ``dask-vastai offers``, so that "what would be
    rented" is what is rented.
    """
    offers = await api.search_offers(
        req.filters(), order=req.order, limit=limit,
        type="bid" if req.interruptible else "on-demand", storage_gb=req.disk_gb,
    )
    return OfferPreview(query_text=req.query_text(), query=req.filters(), offers=offers)


# ----------------------------------------------------------------------------- no match


def _offer_line(o: Offer) -> str:
    kind = "datacenter" if o.datacenter else "hobbyist host"
    return (
        f"  offer {o.id}: {o.num_gpus}x {o.gpu_name}, ${o.dph_total:.3f}/h, "
        f"{o.geolocation or 'unknown location'}, reliability {o.reliability:.3f}, {kind}"
    )


def _blocking_filters(req: OfferRequirements, o: Offer) -> list[str]:
    """The requirements ``o`` fails, written as the option to change."""
    out = []
    if req.max_price is not None and o.dph_total > req.max_price:
        out.append(f"max_price={_fmt(req.max_price)} (this one costs ${o.dph_total:.3f}/h)")
    if req.region is not None and o.country not in region_codes(req.region):
        out.append(f"region={req.region!r} (this one is in {o.country or 'an unknown country'})")
    if req.reliability and o.reliability < req.reliability:
        out.append(f"reliability={_fmt(req.reliability)} (this host has {o.reliability:.3f})")
    if req.datacenter and not o.datacenter:
        out.append("datacenter=True (this is a hobbyist host)")
    if req.gpu_ram_gb is not None and o.gpu_ram_mb < req.gpu_ram_gb * 1000:
        out.append(f"gpu_ram={_fmt(req.gpu_ram_gb)} (this one has {o.gpu_ram_mb / 1000:.0f} GB)")
    if req.cpu_ram_gb is not None and o.cpu_ram_mb < req.cpu_ram_gb * 1000:
        out.append(f"cpu_ram={_fmt(req.cpu_ram_gb)} (this one has {o.cpu_ram_mb / 1000:.0f} GB)")
    if req.cpu_cores is not None and o.cpu_cores_effective < req.cpu_cores:
        out.append(f"cpu_cores={_fmt(req.cpu_cores)} (this one has {o.cpu_cores_effective:g})")
    if req.disk_gb and o.disk_space_gb < req.disk_gb:
        out.append(f"disk={_fmt(req.disk_gb)} (this one has {o.disk_space_gb:.0f} GB free)")
    return out


def no_match_message(req: OfferRequirements, query_sent: Mapping[str, Any], nearest: Sequence[Offer]) -> str:
    """The error a user sees when no offer matches: the query, the nearest offers, what to relax."""
    lines = [
        "No Vast offer matches the requirements.",
        f"  query: {req.query_text()}",
        f"  sent:  {json.dumps(dict(query_sent), sort_keys=True)}",
    ]
    gpus = ", ".join(req.gpu_names()) or "any GPU"
    if not nearest:
        lines.append(
            f"Nothing is offered for {req.num_gpus}x {gpus} even without the price, region and "
            "reliability limits: try another GPU model (gpu=[...] accepts several) or num_gpus, "
            "or check the model's spelling with `dask-vastai offers`."
        )
        return "\n".join(lines)
    lines.append(f"Nearest offers for {req.num_gpus}x {gpus} without the price/region/reliability limits:")
    counts: dict[str, int] = {}
    for o in nearest:
        lines.append(_offer_line(o))
        for blocker in _blocking_filters(req, o):
            name = blocker.split("=", 1)[0]
            counts[name] = counts.get(name, 0) + 1
            lines.append(f"      excluded by {blocker}")
    if counts:
        worst = max(counts, key=lambda k: counts[k])
        cheapest = min(nearest, key=lambda o: o.dph_total)
        advice = f"Relax {worst} first"
        if worst == "max_price":
            advice += f" (the cheapest of these is ${cheapest.dph_total:.3f}/h)"
        lines.append(advice + ", or add query filters only where you need them.")
    return "\n".join(lines)
