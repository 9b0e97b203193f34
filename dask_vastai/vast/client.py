"""``VastAPI``: Vast's endpoints, typed, on the paced transport.

Account, search, create (single and bulk), list, show, destroy (single and bulk), label,
state, reboot, logs and SSH keys, each returning the records of :mod:`.records` or raising a
:class:`~dask_vastai.exceptions.VastError` whose message says what to do.

**Creates are never sent twice when the first may have worked.** A create that timed out,
lost its connection after sending, or got a 500/504 may have rented. Instead of retrying (a
double rental bills twice), the client lists rentals under the request's label (for up to
``ambiguous_create_grace_s`` after a timeout or 5xx, when Vast may still be working on it):
a single create that shows up is returned as if it had answered; when the connection merely
dropped and nothing shows up, the create is sent once more. Rentals of an ambiguous *bulk*
create cannot be matched to offers, so they are destroyed before the error is raised.
Without a label the error says to check the account.
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
from .query import search_body
from .records import CreatedInstance, CreateRequest, Instance, Offer
from .transport import AmbiguousCreate, VastTransport, body_fields

logger = logging.getLogger(__name__)

#: Vast's bulk endpoints take at most this many ids per call (as the CLI splits them).
BULK_CHUNK = 64


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
        logs_timeout_s: float | None = None,
        ambiguous_create_grace_s: float | None = None,
    ) -> None:
        super().__init__(
            api_key, api_url, pace=pace, request_timeout_s=request_timeout_s, max_attempts=max_attempts,
            min_intervals_s=min_intervals_s, backoff_s=backoff_s, backoff_max_s=backoff_max_s,
        )
        self.logs_timeout_s = float(option("api.logs-timeout", logs_timeout_s))
        self.ambiguous_create_grace_s = float(option("api.ambiguous-create-grace", ambiguous_create_grace_s))
        self._known_ids: set[int] = set()

    # ------------------------------------------------------------------ account
    async def current_user(self) -> dict[str, Any]:
        """The account (``id``, ``email``, ``balance``, ...); InvalidAPIKey when the key is refused."""
        parsed = await self._ok("GET", "/users/current", "user", "show the current user")
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
        return [Offer.from_json(r) for r in rows or [] if isinstance(r, Mapping) and "id" in r]

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
        if status >= 400 or not isinstance(parsed, Mapping) or not parsed.get("success") or not parsed.get("new_contract"):
            raise self._fail(status, parsed, f"rent offer {offer_id}")
        created = CreatedInstance(int(parsed["new_contract"]), int(offer_id), parsed.get("instance_api_key"))
        self._known_ids.add(created.instance_id)
        return created

    async def create_instances(self, offer_ids: Sequence[int], request: CreateRequest) -> list[CreatedInstance | VastError]:
        """Rent several offers with the bulk endpoint: one result per offer, in order.

        A result is an :class:`OfferUnavailable` (or another :class:`VastError`) for an offer
        that could not be rented; errors of the whole call (bad key, bad image) raise.
        """
        ids = [int(i) for i in offer_ids]
        results: list[CreatedInstance | VastError] = []
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            try:
                status, parsed = await self._call("POST", "/asks/bulk/", "create", body=request.body(chunk), create=True)
            except AmbiguousCreate as e:  # never resent: its rentals cannot be matched to offers
                await self._undo_ambiguous_bulk(request, e.why, rented=results)
                raise AssertionError("unreachable") from None  # pragma: no cover - the undo raises
            if status >= 400 or not isinstance(parsed, Mapping) or parsed.get("success") is False:
                raise self._fail(status, parsed, f"rent offers {chunk}")
            results.extend(self._bulk_results(chunk, parsed))
        for r in results:
            if isinstance(r, CreatedInstance):
                self._known_ids.add(r.instance_id)
        return results

    @staticmethod
    def _bulk_results(chunk: list[int], parsed: Mapping[str, Any]) -> list[CreatedInstance | VastError]:
        """Per-offer results of a bulk create, matched by ``ask_id`` where given, else by position."""
        items = parsed.get("results")
        if not isinstance(items, list):
            contracts = parsed.get("new_contracts") or ([parsed["new_contract"]] if parsed.get("new_contract") else [])
            items = [{"ask_id": a, "success": True, "new_contract": c} for a, c in zip(chunk, contracts, strict=False)]
        by_ask = {int(i["ask_id"]): i for i in items if isinstance(i, Mapping) and i.get("ask_id") is not None}
        out: list[CreatedInstance | VastError] = []
        for pos, offer_id in enumerate(chunk):
            item = by_ask.get(offer_id) or (items[pos] if pos < len(items) and not by_ask else None)
            if isinstance(item, Mapping) and item.get("success") is not False and item.get("new_contract"):
                out.append(CreatedInstance(int(item["new_contract"]), offer_id, item.get("instance_api_key")))
                continue
            error, msg = body_fields(item) if item is not None else (None, "no result for this offer")
            out.append(OfferUnavailable(
                f"Offer {offer_id} could not be rented ({msg or error}); search again.",
                offer_id=offer_id, status=None, error=error, msg=msg,
            ))
        return out

    async def _label_rows(self, label: str, grace_s: float = 0.0) -> list[Instance]:
        """Rentals labelled exactly ``label`` that no answer of this client has reported.

        With ``grace_s``, keeps looking (every 2 s) that long for a create still in progress.
        """
        deadline = time.monotonic() + grace_s
        while True:
            rows = await self.list_instances(label_prefix=label)
            found = [r for r in rows if r.label == label and r.id not in self._known_ids]
            if found or time.monotonic() >= deadline:
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

    async def _undo_ambiguous_bulk(self, request: CreateRequest, why: str, rented: list[CreatedInstance | VastError]) -> None:
        """Destroy what an unanswered bulk create may have rented, then raise."""
        done = [r.instance_id for r in rented if isinstance(r, CreatedInstance)]
        if not request.label:
            raise VastUnreachable(
                f"Bulk create: {why}; it may have rented instances ({len(done)} earlier ones: {done}). "
                "Without a label they cannot be found automatically: check `vastai show instances`."
            )
        strays = [r.id for r in await self._label_rows(request.label, self.ambiguous_create_grace_s) if r.id not in done]
        if strays:
            await self.destroy_instances(strays)
        raise VastUnreachable(
            f"Bulk create: {why}. Destroyed {len(strays)} rental(s) it had made ({strays}) because they "
            f"cannot be matched to offers; {len(done)} earlier rental(s) of this call stand: {done}. Retry."
        )

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

    async def destroy_instances(self, instance_ids: Sequence[int]) -> None:
        """Destroy several rentals with the bulk endpoint (ids already gone are fine)."""
        ids = sorted({int(i) for i in instance_ids})
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            status, parsed = await self._call("DELETE", "/instances/", "destroy", body={"instance_ids": chunk})
            if status >= 400 or (isinstance(parsed, Mapping) and parsed.get("success") is False):
                raise self._fail(status, parsed, f"destroy instances {chunk}")
            items = parsed.get("results") if isinstance(parsed, Mapping) else None
            refused = [
                i for i in items or []
                if isinstance(i, Mapping) and i.get("success") is False
                and i.get("error") not in ("not_found", "no_such_instance", "invalid_id")  # already gone
            ]
            if refused:
                error, msg = body_fields(refused[0])
                raise VastRequestError(
                    f"Vast refused to destroy {len(refused)} of instances {chunk}: {msg or error} "
                    f"(ids {[i.get('id') for i in refused]}); they may still bill: retry `dask-vastai cleanup`",
                    status=status, error=error, msg=msg,
                )
            self._known_ids.difference_update(chunk)

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
