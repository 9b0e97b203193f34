"""The ``vastai search offers`` query syntax, turned into the JSON Vast's search takes.

Users already know the syntax (``gpu_name=RTX_4090 num_gpus>=2 dph_total<0.5 geolocation
in [DE,PL]``), and the search endpoint takes only JSON, so a query is parsed exactly as the
official SDK parses it (``parse_query``, a faithful copy of the semantics of
``vastai.api.query.parse_query`` 1.9.1: field aliases, GB->MB multipliers, ``_`` -> space,
booleans, ``any`` wildcards, lists, numbers kept as strings). A test compares our output with
the SDK's on a table of queries, so the server sees the same JSON whichever client sent it.

Not supported from the SDK: the ``georegion=true``/``chunked=true`` directives (use
``geolocation in [..]``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: Filter fields the SDK knows (``vastai.api.query.offers_fields``); others draw a warning.
OFFER_FIELDS = frozenset(
    """bw_nvlink compute_cap cpu_arch cpu_cores cpu_cores_effective cpu_ghz cpu_ram cuda_max_good
    datacenter direct_port_count driver_version disk_bw disk_space dlperf dlperf_per_dphtotal
    dph_total duration external flops_per_dphtotal gpu_arch gpu_display_active gpu_frac gpu_mem_bw
    gpu_name gpu_ram gpu_total_ram gpu_max_power gpu_max_temp has_avx host_id id inet_down
    inet_down_cost inet_up inet_up_cost machine_id min_bid mobo_name num_gpus pci_gen pcie_bw
    reliability rentable rented storage_cost static_ip total_flops ubuntu_version verification
    verified vms_enabled geolocation cluster_id""".split()
)
OFFER_ALIASES: Mapping[str, str] = {
    "cuda_vers": "cuda_max_good",
    "display_active": "gpu_display_active",
    "dlperf_usd": "dlperf_per_dphtotal",
    "dph": "dph_total",
    "flops_usd": "flops_per_dphtotal",
}
#: The user writes GB and days; the server compares MB and seconds.
OFFER_MULTIPLIERS: Mapping[str, float] = {
    "cpu_ram": 1000,
    "gpu_ram": 1000,
    "gpu_total_ram": 1000,
    "duration": 24.0 * 60.0 * 60.0,
}
#: The filters the SDK adds to a string query unless the query overrides them.
STRING_QUERY_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
}
#: The filters the SDK adds to a dict query (``rented`` too).
DICT_QUERY_DEFAULTS: Mapping[str, Mapping[str, Any]] = {**STRING_QUERY_DEFAULTS, "rented": {"eq": False}}

_TERM = re.compile(
    r"([a-zA-Z0-9_]+)( *[=><!]+| +(?:[lg]te?|nin|neq|eq|not ?eq|not ?in|in) )?( *)"
    r"(\[[^\]]+\]|\"[^\"]+\"|[^ ]+)?( *)"
)
_OPS = {
    ">=": "gte", ">": "gt", "gt": "gt", "gte": "gte",
    "<=": "lte", "<": "lt", "lt": "lt", "lte": "lte",
    "!=": "neq", "==": "eq", "=": "eq", "eq": "eq", "neq": "neq", "noteq": "neq", "not eq": "neq",
    "notin": "notin", "not in": "notin", "nin": "notin", "in": "in",
}
_SYNTAX_HINT = (
    "Filters look like `gpu_name=RTX_4090 num_gpus>=2 dph_total<0.5 geolocation in [DE,PL]`; "
    "write spaces inside values as _ or quote the value"
)


def _driver_version_number(text: str) -> int:
    """``535.86.05`` -> ``535086005``, the integer the server compares driver versions as."""
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"driver_version {text!r} is not of the form X.Y.Z (e.g. driver_version>=535.86.05)"
        )
    return int("".join(p.zfill(3) for p in parts))


def parse_query(text: str, base: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The filter dict the official SDK sends for the ``vastai search offers`` query ``text``.

    ``base`` is copied and updated (the SDK passes its defaults there, which is how
    ``verified=any`` removes the default ``verified`` filter). Raises ``ValueError`` naming
    the query and what is wrong with it.
    """
    res: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items()}
    text = text.strip()
    terms = _TERM.findall(text)
    consumed = "".join("".join(t) for t in terms)
    if consumed != text:
        same = next((i for i, (a, b) in enumerate(zip(consumed, text, strict=False)) if a != b), len(consumed))
        rest = text[same:]
        raise ValueError(f"could not read the offer query {text!r} from {rest!r} on. {_SYNTAX_HINT}.")
    for name, raw_op, _, raw_value, _ in terms:
        value: Any = raw_value.strip(",[]")
        op = raw_op.strip()
        op_name = _OPS.get(op)
        if name in OFFER_ALIASES:
            alias, name = name, OFFER_ALIASES[name]
            if alias in res:
                res[name] = res.pop(alias)
        filters = res.setdefault(name, {})
        if name == "driver_version" and "." in value and op_name not in ("in", "notin"):
            value = _driver_version_number(value)
        if name not in OFFER_FIELDS:
            logger.warning("offer query: unrecognised field %r (sent to Vast as is)", name)
        if not op_name:
            raise ValueError(
                f"offer query {text!r}: {name!r} has no operator (=, !=, <, <=, >, >=, in, notin). "
                f"{_SYNTAX_HINT}."
            )
        if op_name in ("in", "notin"):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if value == "" or value == []:
            raise ValueError(f"offer query {text!r}: {name}{op} has no value. {_SYNTAX_HINT}.")
        if isinstance(value, str) and value in ("?", "*", "any"):
            if op_name != "eq":
                raise ValueError(
                    f"offer query {text!r}: the wildcard {name}{op}{value} only works with = "
                    f"(write {name}=any to drop the filter)"
                )
            res.pop(name, None)
            continue
        if isinstance(value, str):
            value = value.replace("_", " ").strip('"')
        elif isinstance(value, list):
            value = [x.replace("_", " ").strip('"') for x in value]
        if name in OFFER_MULTIPLIERS:
            try:
                filters[op_name] = float(value) * OFFER_MULTIPLIERS[name]
            except (TypeError, ValueError):
                raise ValueError(
                    f"offer query {text!r}: {name} takes one number (in "
                    f"{'days' if name == 'duration' else 'GB'}), not {raw_value!r}"
                ) from None
        elif value in ("true", "True"):
            filters[op_name] = True
        elif value in ("false", "False"):
            filters[op_name] = False
        elif value in ("None", "null"):
            filters[op_name] = None
        else:
            filters[op_name] = value
        res[name] = filters
    return res


def parse_order(text: str | Sequence[Sequence[str]] | None) -> list[list[str]] | None:
    """``"dph+,dlperf-"`` -> ``[["dph_total", "asc"], ["dlperf", "desc"]]``, as the SDK does.

    A leading or trailing ``-`` sorts descending, ``+`` ascending; a list passes through.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        return [list(x) for x in text]
    parsed: list[list[str]] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        direction, column = "asc", name
        if name.strip("-") != name:
            direction, column = "desc", name.strip("-")
        if name.strip("+") != name:
            direction, column = "asc", name.strip("+")
        parsed.append([OFFER_ALIASES.get(column, column), direction])
    return parsed


def search_body(
    query: str | Mapping[str, Any] | None,
    *,
    order: str | Sequence[Sequence[str]] | None = "score-",
    type: str = "on-demand",
    limit: int | None = None,
    storage_gb: float = 5.0,
) -> dict[str, Any]:
    """The exact ``POST /api/v0/bundles/`` body of ``VastAI().search_offers(query, ...)``.

    A string query gets the SDK's string defaults (verified, external, rentable); a dict gets
    its dict defaults (also ``rented=false``), which the dict's own keys override.
    """
    if isinstance(query, str):
        body = parse_query(query, STRING_QUERY_DEFAULTS)
    else:
        body = {k: dict(v) for k, v in DICT_QUERY_DEFAULTS.items()}
        body.update({k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (query or {}).items()})
    body["order"] = parse_order(order) if order is not None else [["score", "desc"]]
    body["type"] = "bid" if type == "interruptible" else type
    if limit:
        body["limit"] = int(limit)
    body["allocated_storage"] = storage_gb
    return body
