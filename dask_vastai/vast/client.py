"""``VastAPI``: Vast's endpoints, typed, on the paced transport.

Account, search, create (single and bulk), list, show, destroy (single and bulk), label,
state, reboot, logs and SSH keys, each returning the records of :mod:`.records` or raising a
:class:`~dask_vastai.exceptions.VastError` whose message says what to do.

**Creates are never sent twice when the first may have worked.** A create that timed out,
lost its connection after sending, or got a 500/504 may have rented. Instead of retrying (a
double rental bills twice), the client lists rentals under the request's label (for up to
``ambiguous_create_grace_s`` after a timeout or 5xx, when Vast may still be working on it):
a single create that shows up is returned as if it had answered; when the connection merely
dropped and nothing shows up, the create is sent once more. Without a label the error says
to check the account.

**Bulk answers are read for what they say** (:mod:`.bulk`). When a bulk create's answer does
not say which offer became which rental (no answer, a bare success, a list of ids, a shape
never seen), its rentals are found under the request's label and *adopted*: placed on their
offers by machine where that is unambiguous, else on the call's offers still without one (all
offers of one call share one request, so any of its rentals fits any of them; only the
machine differs, and the rental's own row tells it). None is ever rented twice. A bulk route
that is missing or refused as such makes this client rent one offer per call from then on.
A bulk destroy is checked by listing the rentals afterwards (:meth:`VastAPI.destroy_instances`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import aiohttp
import yarl

from ..config import option
from ..exceptions import (
    LogsNotReady,
    OfferUnavailable,
    VastError,
    VastRequestError,
    VastUnreachable,
)
from .bulk import BulkAnswer, DestroyReport, looks_torn_down, place_rows, read_bulk_create
from .query import search_body
from .records import CreatedInstance, CreateRequest, Instance, Offer
from .transport import AmbiguousCreate, VastTransport, body_fields

logger = logging.getLogger(__name__)

#: Vast's bulk endpoints take at most this many ids per call (as the CLI splits them).
BULK_CHUNK = 64
#: offers of recent searches kept to place a bulk create's rentals on (by machine)
_OFFERS_REMEMBERED = 2000


class VastAPI(VastTransport):
    """An async client for the Vast REST API: one session, paced per endpoint, typed results.

    Use as ``async with VastAPI() as api:`` or call :meth:`close`. ``api_key`` and
    ``api_url`` default to the dask config (``vastai.api-key``/``vastai.api-url``) and the
    vastai CLI's key lookup (see :mod:`dask_vastai.credentials`); the other settings are
    the transport's (:class:`~dask_vastai.vast.transport.VastTransport`), plus how long
    :meth:`logs` waits for the upload and how long an ambiguous create is looked for.
    """

    # The transport's keywords are written out again so that help(VastAPI), completion and
    # type checkers show every option of the one class users construct.
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
        logs_timeout_s: float | None = None,
        ambiguous_create_grace_s: float | None = None,
        destroy_linger_grace_s: float | None = None,
    ) -> None:
        super().__init__(
            api_key, api_url, pace=pace, request_timeout_s=request_timeout_s, max_attempts=max_attempts,
            min_intervals_s=min_intervals_s, backoff_s=backoff_s, backoff_max_s=backoff_max_s,
            outage_timeout_s=outage_timeout_s,
        )
        self.logs_timeout_s = float(option("api.logs-timeout", logs_timeout_s))
        self.ambiguous_create_grace_s = float(option("api.ambiguous-create-grace", ambiguous_create_grace_s))
        self.destroy_linger_grace_s = float(option("api.destroy-linger-grace", destroy_linger_grace_s))
        self._known_ids: set[int] = set()
        self._offers_seen: dict[int, dict[str, Any]] = {}
        #: False once a bulk route proved missing or refused here: one call per offer/rental then
        self.bulk_create_usable = True
        self.bulk_destroy_usable = True

    # ------------------------------------------------------------------ account
    async def current_user(self) -> dict[str, Any]:
        """The account (``id``, ``email``, ``balance``, ...); InvalidAPIKey when the key is refused."""
        parsed = await self._ok("GET", "/users/current/", "user", "show the current user")
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
        offers = [Offer.from_json(r) for r in rows or [] if isinstance(r, Mapping) and "id" in r]
        for offer in offers:  # what a bulk create's rentals are placed by (their machine)
            self._offers_seen.pop(offer.id, None)
            self._offers_seen[offer.id] = offer.raw
        while len(self._offers_seen) > _OFFERS_REMEMBERED:
            del self._offers_seen[next(iter(self._offers_seen))]
        return offers

    # ------------------------------------------------------------------ renting
    async def create_instance(self, offer_id: int, request: CreateRequest) -> CreatedInstance:
        """Rent ``offer_id``; OfferUnavailable when it is gone (take the next offer)."""
        resent = False
        while True:
            try:
                status, parsed = await self._call(
                    "PUT", f"/asks/{int(offer_id)}/", "create", body=request.body(int(offer_id)), create=True
                )
                break
            except AmbiguousCreate as e:
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
        error, msg = body_fields(parsed)
        if status in (404, 410) or error == "no_such_ask":
            raise OfferUnavailable(
                f"Offer {offer_id} is no longer available ({msg or error}); offers are single-use, search again.",
                offer_id=int(offer_id), status=status, error=error, msg=msg,
            )
        refused = status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False)
        contract = _int_or_none(parsed.get("new_contract")) if isinstance(parsed, Mapping) else None
        if not refused and contract is None:
            # A 2xx that does not name the rental may still have made one: look under the label.
            e = AmbiguousCreate(f"PUT /asks/{offer_id}/ answered {status} without new_contract "
                                f"({str(parsed)[:80]!r})", settled=False)
            found = await self._recover_single_create(offer_id, request, e)
            if found is not None:
                return found
        if refused or contract is None:
            raise self._fail(status, parsed, f"rent offer {offer_id}")
        created = CreatedInstance(contract, int(offer_id), parsed.get("instance_api_key"))
        self._known_ids.add(created.instance_id)
        return created

    async def create_instances(self, offer_ids: Sequence[int], request: CreateRequest) -> list[CreatedInstance | VastError]:
        """Rent several offers with the bulk endpoint: one result per offer, in order.

        A result is a :class:`CreatedInstance`, or an :class:`OfferUnavailable` (or another
        :class:`VastError`) for an offer that was not rented. A rental found under the
        request's label after an answer that did not place it comes back as a
        ``CreatedInstance`` with ``placed=False``: it stands on one of the call's offers
        (possibly another machine than that offer's). Where the bulk route is not usable, the
        offers are rented one per call (same label). Errors of the whole call (bad key) raise.
        """
        ids = [int(i) for i in offer_ids]
        results: list[CreatedInstance | VastError] = []
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            if not self.bulk_create_usable:
                results.extend(await self._create_singly(chunk, request))
                continue
            results.extend(await self._create_chunk(chunk, request))
        for r in results:
            if isinstance(r, CreatedInstance):
                self._known_ids.add(r.instance_id)
        return results

    async def _create_chunk(self, chunk: list[int], request: CreateRequest) -> list[CreatedInstance | VastError]:
        grace = self.ambiguous_create_grace_s
        try:
            status, parsed = await self._call("POST", "/asks/bulk/", "create", body=request.body(chunk), create=True)
        except AmbiguousCreate as e:  # never resent: look for what it made instead
            answer = BulkAnswer(note=e.why)
        else:
            answer = read_bulk_create(chunk, status, parsed)
            if answer.unusable:
                self.bulk_create_usable = False
                logger.warning("bulk create refused (%s): renting one offer per call from now on", answer.unusable)
                grace = 0.0  # a refusal made nothing: one look at the label to be sure
            elif answer.refused and not answer.created:
                grace = 0.0
        if answer.complete:
            return [answer.created.get(o) or answer.refused[o] for o in chunk]
        placed = await self._adopt(chunk, request, answer, grace)
        if answer.unusable:
            rest = [o for o in chunk if o not in placed]
            singles = dict(zip(rest, await self._create_singly(rest, request), strict=True))
            return [placed.get(o) or singles[o] for o in chunk]
        return [placed.get(o) or answer.refused.get(o) or OfferUnavailable(
            f"Offer {o} was not rented: the bulk answer ({answer.note}) did not say, and no rental of it "
            f"appeared under {request.label!r} within {grace:.0f} s; search again.", offer_id=o,
        ) for o in chunk]

    async def _adopt(self, chunk: list[int], request: CreateRequest, answer: BulkAnswer,
                     grace_s: float) -> dict[int, CreatedInstance]:
        """The rentals of a bulk call whose answer did not place them, found by label, per offer."""
        placed: dict[int, CreatedInstance] = dict(answer.created)
        open_offers = answer.open_offers(chunk)
        if not open_offers:
            return placed
        if not request.label:
            raise VastUnreachable(
                f"Bulk create of offers {chunk}: {answer.note}; it may have rented instances that, without "
                "a label, cannot be found automatically: check `vastai show instances` and destroy strays."
            )
        want = len(answer.unplaced_ids) if answer.unplaced_ids else len(open_offers)
        logger.info("bulk create answered %s; looking for its rentals under %r", answer.note, request.label)
        rows = await self._label_rows(request.label, grace_s, want=want)
        rows = [r for r in rows if r.id not in {c.instance_id for c in placed.values()}]
        offers = {o: (self._offers_seen.get(o) or {}) for o in open_offers}
        on_offer, elsewhere = place_rows(rows, offers)
        for offer_id, row in on_offer.items():
            placed[offer_id] = CreatedInstance(row.id, offer_id, None)
        # Offers the answer refused come last: their workers still need a rental, and one that
        # exists beats one rented again.
        free = [o for o in open_offers if o not in placed] + [o for o in chunk if o in answer.refused]
        for offer_id, row in zip(free, elsewhere, strict=False):
            placed[offer_id] = CreatedInstance(row.id, offer_id, None, placed=False)
        extra = [row.id for row in elsewhere[len(free):]]
        if extra:  # more rentals than offers asked for: never kept
            logger.warning("bulk create made %d rental(s) beyond its %d offers: destroying %s",
                           len(extra), len(chunk), extra)
            await self.destroy_instances(extra)
        for created in placed.values():
            self._known_ids.add(created.instance_id)
        if rows:
            logger.warning("bulk create (%s): adopted %d rental(s) found under %r", answer.note,
                           len(rows) - len(extra), request.label)
        return placed

    async def _create_singly(self, chunk: list[int], request: CreateRequest) -> list[CreatedInstance | VastError]:
        """One create call per offer; after a refusal that is not a taken offer, the rest share it."""
        out: list[CreatedInstance | VastError] = []
        for offer_id in chunk:
            try:
                out.append(await self.create_instance(offer_id, request))
            except OfferUnavailable as e:
                out.append(e)
            except VastError as e:
                out.extend([e] * (len(chunk) - len(out)))
                break
        return out

    async def _label_rows(self, label: str, grace_s: float = 0.0, *, want: int = 1) -> list[Instance]:
        """Rentals labelled exactly ``label`` that no answer of this client has reported.

        With ``grace_s``, keeps looking (every 2 s) that long until ``want`` of them show up.
        """
        deadline = time.monotonic() + grace_s
        while True:
            rows = await self.list_instances(label_prefix=label)
            found = [r for r in rows if r.label == label and r.id not in self._known_ids]
            if len(found) >= want or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    async def _recover_single_create(self, offer_id: int, request: CreateRequest, e: AmbiguousCreate) -> CreatedInstance | None:
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
        return CreatedInstance(row.id, int(offer_id), None)

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
        error, _ = body_fields(parsed)
        if status == 404 or error in ("not_found", "no_such_instance", "invalid_id"):
            return False
        if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
            raise self._fail(status, parsed, f"destroy instance {instance_id}", instance_id=instance_id)
        self._known_ids.discard(int(instance_id))
        return True

    async def destroy_instances(self, instance_ids: Sequence[int]) -> DestroyReport:
        """Destroy several rentals (ids already gone are fine), and check that they went.

        One bulk call per 64 ids where the bulk route is usable (else one call each). A bulk
        answer, whatever its shape, is not taken at its word: the rentals are listed again;
        one still running is destroyed again at once, one listed as torn down (``exited``,
        ``destroying``: its meter has stopped while the row lingers) is waited for up to
        ``destroy_linger_grace_s`` and destroyed again if it is still there (a destroy is
        idempotent). The report says when each one's meter stopped. Raises when a rental could
        not be destroyed.
        """
        ids = sorted({int(i) for i in instance_ids})
        stopped: dict[int, float] = {}
        if not ids:
            return DestroyReport(())
        if len(ids) == 1 or not self.bulk_destroy_usable:
            await self._destroy_singly(ids, stopped)
            return DestroyReport(tuple(ids), singly=True, stopped_at=stopped)
        refused: list[int] = []
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            if not self.bulk_destroy_usable:
                refused.extend(chunk)
                continue
            status, parsed = await self._call("DELETE", "/instances/", "destroy", body={"instance_ids": chunk})
            if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
                self.bulk_destroy_usable = False
                logger.warning("bulk destroy refused (HTTP %s: %s): destroying one rental per call from now on",
                               status, str(parsed)[:120])
                refused.extend(chunk)
                continue
            answered = time.time()
            items = parsed.get("results") if isinstance(parsed, Mapping) else None
            refused.extend(
                int(i["id"]) for i in items or []
                if isinstance(i, Mapping) and i.get("success") is False and _int_or_none(i.get("id")) is not None
                and i.get("error") not in ("not_found", "no_such_instance", "invalid_id")  # already gone
            )
            stopped.update((i, answered) for i in chunk if i not in refused)
        if refused:
            await self._destroy_singly(refused, stopped)
        survivors, lingering = await self._verify_destroyed([i for i in ids if i not in refused], stopped)
        self._known_ids.difference_update(ids)
        return DestroyReport(tuple(ids), survivors=tuple(survivors), lingering=tuple(lingering),
                             singly=not self.bulk_destroy_usable, stopped_at=stopped)

    async def _destroy_singly(self, ids: Sequence[int], stopped: dict[int, float]) -> None:
        """One destroy call each; ``stopped`` gets when each answered."""

        async def one(i: int) -> None:
            await self.destroy_instance(i)
            stopped[i] = time.time()

        await asyncio.gather(*(one(i) for i in ids))

    async def _verify_destroyed(self, ids: Sequence[int], stopped: dict[int, float]) -> tuple[list[int], list[int]]:
        """``(survivors, lingering)``: what a bulk destroy left listed, each destroyed again."""
        wanted = set(ids)
        if not wanted:
            return [], []
        deadline = time.monotonic() + self.destroy_linger_grace_s
        rows = [r for r in await self.list_instances() if r.id in wanted]
        survivors = [r.id for r in rows if not looks_torn_down(r)]
        if survivors:
            logger.warning("after a bulk destroy, rentals %s were still running: destroying them again", survivors)
            await self._destroy_singly(survivors, stopped)
        pending = {r.id for r in rows if looks_torn_down(r)}
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            listed = {r.id: r for r in await self.list_instances() if r.id in pending}
            back = [i for i, r in listed.items() if not looks_torn_down(r)]
            if back:
                await self._destroy_singly(back, stopped)
                survivors.extend(back)
            pending = {i for i in listed if i not in back}
        lingering = sorted(pending)
        if lingering:  # their meter stopped with the bulk call (the row said so): the time stands
            logger.info("rentals %s were still listed %.0f s after their destroy: destroying them again",
                        lingering, self.destroy_linger_grace_s)
            await self._destroy_singly(lingering, {})
        return survivors, lingering

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


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
