"""Reading Vast's bulk answers, which no public source shows.

The official CLI sends ``POST /api/v0/asks/bulk/`` (rent several offers) and ``DELETE
/api/v0/instances/`` (destroy several rentals), but what they answer is undocumented. So an
answer is read for what it *says*, never for what it might mean:

* per-offer results (``{"results": [{"ask_id", "success", "new_contract"}]}``) say which
  offer became which rental: complete;
* a list of rental ids (``{"new_contracts": [...]}`` or a bare JSON list) says how many, not
  which offer each is;
* a bare ``{"success": true}``, or a shape never seen, says nothing: something may have been
  rented, so the rentals are found by the request's label (:func:`place_rows`);
* a 404/410 naming ``no_such_ask`` refuses the offers (take fresh ones);
* any other refusal (a plain 404 page, 405, 400) says the route is not usable here: the
  client rents one offer per call from then on.

After a bulk destroy, a rental may still be listed for two reasons: it is being torn down
(billing stopped, the row lingers in ``exited``/``destroying``), or the bulk call left it
running. :func:`looks_torn_down` tells the first kind; the client destroys the second at once
and the first again if it is still listed after a grace (a destroy is idempotent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import OfferUnavailable, VastError
from .records import CreatedInstance, Instance
from .transport import body_fields

#: ``actual_status`` values of a row whose destroy is under way (Vast's own and the ones seen in
#: other clients: the container is gone or going, the meter has stopped)
TORN_DOWN_STATUSES = frozenset({"destroying", "destroyed", "exited", "unloaded"})


@dataclass
class BulkAnswer:
    """How one bulk create answer reads, per offer of the call."""

    #: offer id -> rental, where the answer says which offer became which rental
    created: dict[int, CreatedInstance] = field(default_factory=dict)
    #: offer id -> why it was not rented (take another offer)
    refused: dict[int, VastError] = field(default_factory=dict)
    #: rental ids the answer names without saying which offer each is
    unplaced_ids: list[int] = field(default_factory=list)
    #: the answer says what happened to every offer of the call
    complete: bool = False
    #: the bulk route is missing or refused the call as such (rent one by one): why
    unusable: str | None = None
    #: how the answer was read, for the log
    note: str = ""

    def open_offers(self, chunk: Sequence[int]) -> list[int]:
        """The offers of the call whose fate the answer does not tell."""
        return [o for o in chunk if o not in self.created and o not in self.refused]


def _names_no_such_ask(parsed: Any) -> bool:
    error, msg = body_fields(parsed)
    return error == "no_such_ask" or "no_such_ask" in (msg or "")


def _refusal(offer_id: int, parsed: Any, status: int | None) -> OfferUnavailable:
    error, msg = body_fields(parsed) if parsed is not None else (None, "no result for this offer")
    return OfferUnavailable(
        f"Offer {offer_id} could not be rented ({msg or error}); search again.",
        offer_id=offer_id, status=status, error=error, msg=msg,
    )


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def read_bulk_create(chunk: Sequence[int], status: int, parsed: Any) -> BulkAnswer:
    """What a bulk create's answer says about each offer of ``chunk``."""
    text = str(parsed)[:120]
    if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
        if status in (404, 410, 200) and _names_no_such_ask(parsed):
            named = _int(parsed.get("ask_id")) if isinstance(parsed, Mapping) else None
            refused = {o: _refusal(o, parsed, status) for o in chunk}
            return BulkAnswer(refused=refused, note=f"HTTP {status} no_such_ask (offer {named or '?'}): "
                              "the call's offers are gone")
        return BulkAnswer(unusable=f"HTTP {status}: {text}", note=f"refused as a whole (HTTP {status})")
    if isinstance(parsed, list):
        ids = [i for i in map(_int, parsed) if i is not None]
        if len(ids) == len(parsed):
            return BulkAnswer(unplaced_ids=ids, note=f"a bare list of {len(ids)} rental ids")
        return BulkAnswer(note=f"a list that is not rental ids: {text}")
    if not isinstance(parsed, Mapping):
        return BulkAnswer(note=f"an answer in no known shape: {text}")
    items = parsed.get("results")
    if isinstance(items, list):
        return _read_results(chunk, items, status)
    contracts = parsed.get("new_contracts")
    if isinstance(contracts, list):
        ids = [i for i in map(_int, contracts) if i is not None]
        return BulkAnswer(unplaced_ids=ids, note=f"{len(ids)} rental ids without their offers")
    single = _int(parsed.get("new_contract"))
    if single is not None and len(chunk) == 1:
        created = CreatedInstance(single, chunk[0], parsed.get("instance_api_key"))
        return BulkAnswer(created={chunk[0]: created}, complete=True, note="one rental for one offer")
    if single is not None:
        return BulkAnswer(unplaced_ids=[single], note="one rental id for several offers")
    return BulkAnswer(note=f"no per-offer results ({text})")


def _read_results(chunk: Sequence[int], items: list[Any], status: int) -> BulkAnswer:
    """Per-offer results, matched by ``ask_id`` where given, else by position."""
    by_ask = {a: i for i in items if isinstance(i, Mapping) and (a := _int(i.get("ask_id"))) is not None}
    answer = BulkAnswer(note="per-offer results")
    for pos, offer_id in enumerate(chunk):
        item = by_ask.get(offer_id) if by_ask else (items[pos] if pos < len(items) else None)
        if not isinstance(item, Mapping):
            continue  # this offer's fate is not told
        contract = _int(item.get("new_contract"))
        if item.get("success") is not False and contract is not None:
            answer.created[offer_id] = CreatedInstance(contract, offer_id, item.get("instance_api_key"))
        elif item.get("success") is False or item.get("error"):
            answer.refused[offer_id] = _refusal(offer_id, item, status)
    answer.complete = not answer.open_offers(chunk)
    if not answer.complete:
        answer.note += f" that leave {len(answer.open_offers(chunk))} offer(s) untold"
    return answer


def place_rows(rows: Sequence[Instance], offers: Mapping[int, Mapping[str, Any]]) -> tuple[dict[int, Instance], list[Instance]]:
    """Rentals found under a call's label, placed on its offers where that is unambiguous.

    A row is placed on an offer when it is the only row on that offer's machine and the offer
    the only open one there (``machine_id`` is in both records). Returns ``(offer id -> row,
    rows placed nowhere)``.
    """
    by_machine: dict[Any, list[int]] = {}
    for offer_id, raw in offers.items():
        by_machine.setdefault(raw.get("machine_id"), []).append(offer_id)
    rows_by_machine: dict[Any, list[Instance]] = {}
    for row in rows:
        rows_by_machine.setdefault(row.raw.get("machine_id"), []).append(row)
    placed: dict[int, Instance] = {}
    unplaced: list[Instance] = []
    for machine, found in rows_by_machine.items():
        candidates = by_machine.get(machine, []) if machine is not None else []
        if len(found) == 1 and len(candidates) == 1:
            placed[candidates[0]] = found[0]
        else:
            unplaced.extend(found)
    return placed, unplaced


def looks_torn_down(row: Instance) -> bool:
    """Whether a row still listed after its destroy looks like a teardown under way."""
    return row.actual_status in TORN_DOWN_STATUSES or row.raw.get("cur_state") == "unloaded"


@dataclass(frozen=True)
class DestroyReport:
    """What a bulk destroy did, checked against the list of rentals afterwards."""

    #: the rentals asked to be destroyed
    ids: tuple[int, ...]
    #: listed as running after the bulk call said they were destroyed: destroyed again, one by one
    survivors: tuple[int, ...] = ()
    #: still listed as torn down after the grace: destroyed again, one by one
    lingering: tuple[int, ...] = ()
    #: the bulk route was not usable, so each was destroyed by its own call
    singly: bool = False
    #: when (wall clock) the call that stopped each one's meter answered
    stopped_at: dict[int, float] = field(default_factory=dict, compare=False)
