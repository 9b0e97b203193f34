"""Server-side evaluation of Vast's filter dictionaries, for offers and for instances.

A query is ``{field: {op: value}}`` with ops eq/neq/gt/gte/lt/lte/in/notin, as the SDK's
``parse_query`` builds it. Values arrive as the client typed them: numbers stay strings
(``{"num_gpus": {"gte": "2"}}``) and the server coerces them to the record's type, so do
we. Multipliers (``cpu_ram>=64`` -> 64000.0 MB) are applied by the client, not here.

Rules the real server is observed or documented to follow, kept here:

- ``gpu_name`` compares with ``_`` read as a space (``RTX_3090`` = ``RTX 3090``);
- ``datacenter`` is ``hosting_type == 1``; ``verified`` is ``verification == "verified"``;
- ``geolocation`` matches the whole string or its trailing ISO-2 country code
  (``"Hesse, DE"`` matches ``DE``), case-insensitively;
- a field the record does not have is ignored (the server does not refuse unknown
  fields; the SDK already warns about them on the client side).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")
#: keys of a search body that are not filters
SEARCH_CONTROL_KEYS = frozenset({"order", "type", "limit", "allocated_storage", "select_cols", "q",
                                 "disable_bundling", "extra_ids", "show_incompatible"})


class QueryError(ValueError):
    """A filter the server would refuse (an unknown operator)."""


def _country(geolocation: str | None) -> str:
    return (geolocation or "").strip()[-2:].upper()


def _coerce(value: Any, like: Any) -> Any:
    """``value`` converted to the type of the record's ``like`` where it reads as one."""
    if isinstance(like, bool):
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "1"):
                return True
            if low in ("false", "0"):
                return False
        return value
    if isinstance(like, int | float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(like, str) and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _compare(op: str, have: Any, want: Any) -> bool:
    if op in ("in", "notin"):
        items = want if isinstance(want, list | tuple) else [want]
        found = any(_compare("eq", have, item) for item in items)
        return found if op == "in" else not found
    if op == "eq":
        return have == _coerce(want, have)
    if op == "neq":
        return have != _coerce(want, have)
    want = _coerce(want, have)
    if have is None or want is None:
        return False
    try:
        if op == "gt":
            return have > want
        if op == "gte":
            return have >= want
        if op == "lt":
            return have < want
        if op == "lte":
            return have <= want
    except TypeError:  # "abc" > 3: the server answers "no match", not an error
        return False
    raise QueryError(f"unknown operator {op!r}; use one of {', '.join(OPS)}")


def _gpu_norm(value: Any) -> Any:
    return value.replace("_", " ").strip().lower() if isinstance(value, str) else value


def _field_matches(record: Mapping[str, Any], field: str, op: str, want: Any) -> bool:
    if op not in OPS:
        raise QueryError(f"unknown operator {op!r} for field {field!r}; use one of {', '.join(OPS)}")
    if field == "datacenter":
        return _compare(op, record.get("hosting_type") == 1, want)
    if field == "gpu_name" and "gpu_name" in record:
        want_n = [_gpu_norm(w) for w in want] if isinstance(want, list) else _gpu_norm(want)
        return _compare(op, _gpu_norm(record["gpu_name"]), want_n)
    if field == "geolocation" and "geolocation" in record:
        geo = str(record.get("geolocation") or "")
        wants = want if isinstance(want, list) else [want]
        hit = any(isinstance(w, str) and w.strip().upper() in (geo.upper(), _country(geo)) for w in wants)
        if op in ("eq", "in"):
            return hit
        if op in ("neq", "notin"):
            return not hit
        return _compare(op, geo, want)
    if field not in record:
        return True
    return _compare(op, record[field], want)


def matches(record: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    """Whether ``record`` passes every filter of ``filters`` (control keys skipped)."""
    for field, cond in filters.items():
        if field in SEARCH_CONTROL_KEYS:
            continue
        if not isinstance(cond, Mapping):  # a bare value means eq, as old clients sent
            cond = {"eq": cond}
        for op, want in cond.items():
            if not _field_matches(record, field, op, want):
                return False
    return True


def ordered(records: Iterable[dict[str, Any]], order: Iterable[Any]) -> list[dict[str, Any]]:
    """``records`` sorted by ``order``: ``[[field, "asc"|"desc"], ...]`` or ``[{"col", "dir"}]``.

    Records without the field (or with None) sort last in either direction.
    """
    rows = list(records)
    for item in reversed(list(order or [])):
        if isinstance(item, Mapping):
            field, direction = item.get("col"), item.get("dir", "asc")
        elif isinstance(item, list | tuple) and item:
            field, direction = item[0], (item[1] if len(item) > 1 else "asc")
        else:
            field, direction = str(item), "asc"
        desc = str(direction).lower().startswith("desc")
        present = [r for r in rows if r.get(field) is not None]
        missing = [r for r in rows if r.get(field) is None]
        try:
            present.sort(key=lambda r: r[field], reverse=desc)
        except TypeError:
            present.sort(key=lambda r: str(r[field]), reverse=desc)
        rows = present + missing
    return rows
