"""The HTTP face of the emulated marketplace: Vast's routes, auth, rate limits, errors.

One catch-all aiohttp handler matches the path (trailing slash or not) against the route
table below, so ``/api/v0/instances/5`` and ``/api/v0/instances/5/`` are the same call
(unless variant ``trailing_slash`` says otherwise). Per request, in order: a redirect the
``trailing_slash`` variant asks for (before auth, as a web framework's middleware
redirects) -> auth (Bearer header or ``?api_key=``; 401 otherwise) -> route (404 for an
unknown one, its body shaped by variant ``missing_route``) -> the scope of an instance's
own key -> an armed fault for the endpoint -> the endpoint's minimum interval (429 plain
text, ``Retry-After`` where variant ``retry_after_s`` gives one) -> the handler. Every
request is recorded (time, method, path, endpoint, status, key id; never the key itself)
for tests, including those that followed an off-origin redirect to the other origin
(endpoint ``off_origin``).

Shapes not documented anywhere, played as the variants say (``variants.py``):

- bulk create ``POST /api/v0/asks/bulk/`` takes the single create's fields plus
  ``"ids": [offer ids]``. Variant ``bulk_create``: ``results`` (the default) answers
  ``{"success": true, "results": [{"ask_id": id, "success": true, "new_contract": n,
  "instance_api_key": k} | {"ask_id": id, "success": false, "error": "no_such_ask", "msg":
  ...}]}`` in the order of ``ids``; ``success_only`` ``{"success": true}``; ``ids``
  ``{"success": true, "new_contracts": [n, ...]}``; ``id_list`` ``[n, ...]``; ``absent`` no
  such route. Where nothing was rented, the non-``results`` shapes answer the first
  refusal as a single create would. Variant ``bulk_create_refused`` refuses some offers;
- bulk destroy ``DELETE /api/v0/instances/`` ``{"instance_ids": [...]}``: variant
  ``bulk_destroy`` ``results`` answers ``{"success": true, "results": [{"id": i,
  "success": true} | {"id": i, "success": false, "error": "not_found", "msg": "Instance
  not found"}]}``, ``success_only`` ``{"success": true}``, ``absent`` no such route; variant
  ``bulk_destroy_survivors`` leaves some running while reporting them destroyed;
- bulk state ``PUT /api/v0/instances/`` ``{"state": ..., "ids": [...]}`` answers like
  bulk destroy's ``results``.

``/_emulator/{meter,requests,faults,variants}`` are the emulator's own (account key).
Every JSON answer carries ``Content-Type: application/json`` exactly (the CLI's search
refuses ``application/json; charset=utf-8``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .api_market import ApiError, Market
from .api_ratelimit import RateLimiter, too_frequent_body
from .faults import Faults
from .variants import Variants

Handler = Callable[["Call"], Awaitable[web.Response]]


@dataclass
class Call:
    """One request, parsed: what the handlers need."""

    request: web.Request
    groups: tuple[str, ...]
    body: dict[str, Any]
    identity: str  # "account" or "instance:<id>"

    def id(self, n: int = 0) -> int:
        return int(self.groups[n])


#: endpoints whose JSON body ``emu.requests`` keeps (what was searched for and what was rented:
#: tests check that options reach the query); no secret travels in either
_BODY_LOGGED = frozenset({"search", "create"})


def json_response(obj: Any, status: int = 200) -> web.Response:
    """A JSON answer with the exact Content-Type Vast sends."""
    return web.Response(body=json.dumps(obj).encode(), status=status,
                        headers={"Content-Type": "application/json"})


def _error(status: int, error: str, msg: str) -> web.Response:
    return json_response({"success": False, "error": error, "msg": msg}, status)


#: the 404 page of a web server in front of an application (variant missing_route=html)
NOT_FOUND_HTML = ("<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
                  "<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


class ApiServer:
    """Routes requests to a :class:`Market`; owns auth, limits, faults and the request log."""

    def __init__(self, market: Market, *, api_key: str, limiter: RateLimiter, faults: Faults,
                 variants: Variants | None = None) -> None:
        self.market = market
        self.api_key = api_key
        self.limiter = limiter
        self.faults = faults
        self.variants = variants or market.variants
        #: the other origin the off_origin redirects point at (set by the Emulator)
        self.off_origin_url = ""
        self.records: list[dict[str, Any]] = []
        self._survived: set[int] = set()  # instances that already outlived one bulk destroy
        v0, v1 = r"/api/v0", r"/api/v1"
        n = r"(\d+)"
        # (method, path regex without trailing slash, endpoint name, handler, instance key may call)
        self.routes: list[tuple[str, re.Pattern[str], str, Handler, bool]] = [
            (m, re.compile(p), e, h, k) for m, p, e, h, k in [
                ("POST", f"{v0}/bundles", "search", self.search, False),
                ("GET", f"{v0}/bundles", "search", self.search_legacy, False),
                ("PUT", f"{v0}/search/asks", "search", self.search_new, False),
                ("PUT", f"{v0}/asks/{n}", "create", self.create, False),
                ("POST", f"{v0}/asks/bulk", "create", self.create_bulk, False),
                ("PUT", f"{v0}/launch_instance", "create", self.launch, False),
                ("GET", f"{v0}/instances/filters", "list", self.filters, False),
                ("GET", f"{v0}/instances/{n}/ssh", "ssh", self.instance_keys, False),
                ("POST", f"{v0}/instances/{n}/ssh", "ssh", self.attach_key, False),
                ("DELETE", f"{v0}/instances/{n}/ssh/{n}", "ssh", self.detach_key, False),
                ("GET", f"{v0}/instances/{n}", "show", self.show, True),
                ("GET", f"{v0}/instances", "list", self.list_legacy, False),
                ("GET", f"{v1}/instances", "list", self.list_v1, False),
                ("DELETE", f"{v0}/instances/{n}", "destroy", self.destroy, True),
                ("DELETE", f"{v0}/instances", "destroy", self.destroy_bulk, False),
                ("PUT", f"{v0}/instances/reboot/{n}", "reboot", self.reboot, False),
                ("PUT", f"{v0}/instances/request_logs/{n}", "logs", self.request_logs, False),
                ("PUT", f"{v0}/instances/command/{n}", "command", self.command, False),
                ("PUT", f"{v0}/instances/{n}", "update", self.update, True),
                ("PUT", f"{v0}/instances", "update", self.update_bulk, False),
                ("GET", f"{v0}/ssh", "ssh", self.account_keys, False),
                ("POST", f"{v0}/ssh", "ssh", self.add_account_key, False),
                ("PUT", f"{v0}/ssh/{n}", "ssh", self.update_account_key, False),
                ("DELETE", f"{v0}/ssh/{n}", "ssh", self.delete_account_key, False),
                ("GET", f"{v0}/users/current", "user", self.user, False),
                ("GET", "/_emulator/meter", "_meter", self.emu_meter, False),
                ("GET", "/_emulator/requests", "_requests", self.emu_requests, False),
                ("GET", "/_emulator/faults", "_faults", self.emu_faults, False),
                ("POST", "/_emulator/faults", "_faults", self.emu_faults, False),
                ("DELETE", "/_emulator/faults", "_faults", self.emu_faults, False),
                ("GET", "/_emulator/variants", "_variants", self.emu_variants, False),
                ("POST", "/_emulator/variants", "_variants", self.emu_variants, False),
                ("DELETE", "/_emulator/variants", "_variants", self.emu_variants, False),
            ]
        ]
        #: routes that the variant of the same name can make absent
        self._optional: dict[Handler, str] = {self.create_bulk: "bulk_create", self.destroy_bulk: "bulk_destroy"}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/logs/{token}", self.log_file)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def off_origin_app(self) -> web.Application:
        """The other origin of the off_origin redirects: it records who came, and with which key."""
        async def trap(request: web.Request) -> web.Response:
            started = time.time()
            response = web.Response(text=NOT_FOUND_HTML, status=404, content_type="text/html")
            self._record(request, {"endpoint": "off_origin"}, response.status, self._identity(request), started)
            return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", trap)
        return app

    # ------------------------------------------------------------------ plumbing
    def _identity(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        key = key or request.query.get("api_key")
        if not key:
            return None
        if key == self.api_key:
            return "account"
        instance_id = self.market.instance_keys.get(key)
        return None if instance_id is None else f"instance:{instance_id}"

    def _record(self, request: web.Request, seen: dict[str, Any], status: int, identity: str | None,
                started: float) -> None:
        endpoint = seen.get("endpoint")
        if endpoint and endpoint.startswith("_"):
            return
        record = {
            "time": started, "method": request.method, "path": request.path, "endpoint": endpoint,
            "status": status, "key": identity, "duration_s": time.time() - started,
        }
        if "body" in seen:
            record["body"] = seen["body"]
        self.records.append(record)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.time()
        identity = self._identity(request)
        seen: dict[str, Any] = {}  # _handle names the endpoint (and keeps a logged body) here
        try:
            response = await self._handle(request, identity, seen)
        except ApiError as e:
            response = json_response(e.body, e.status)
        self._record(request, seen, response.status, identity, started)
        return response

    async def _handle(self, request: web.Request, identity: str | None, seen: dict[str, Any]) -> web.Response:
        found = self._route(request)
        if found is not None:
            seen["endpoint"] = found[0]
        outage = None if request.path.startswith("/_emulator/") else self.faults.outage_status()
        if outage is not None:  # Vast down behind its proxy: every call, before auth or routing
            return web.Response(status=outage, text=f"<html><body>{outage}: the API is unavailable "
                                "(emulated outage)</body></html>", content_type="text/html")
        moved = self._redirect(request, found)
        if moved is not None:
            return moved
        if identity is None:
            return _error(401, "auth_error", "Invalid user key")
        slashless = not request.path.endswith("/") and not request.path.startswith("/_emulator/")
        if found is None or (slashless and self.variants["trailing_slash"] == "strict"):
            return self._missing(request)
        endpoint, handler, instance_ok, groups = found
        body = await self._body(request)
        if endpoint in _BODY_LOGGED:
            seen["body"] = body
        call = Call(request, groups, body, identity)
        if identity != "account":
            denied = self._scope(call, endpoint, instance_ok)
            if denied is not None:
                return denied
        forced = self.faults.take_http(endpoint)
        if forced == 429:
            return self._too_frequent("API requests too frequent")
        if forced is not None:
            return _error(forced, "server_error", f"emulated server error {forced} (injected fault)")
        threshold = self.limiter.check(identity, endpoint)
        if threshold is not None:
            return self._too_frequent(too_frequent_body(threshold))
        return await handler(call)

    def _route(self, request: web.Request) -> tuple[str, Handler, bool, tuple[str, ...]] | None:
        """(endpoint, handler, instance key may call, path groups) of the route, trailing slash or not."""
        path = request.path.rstrip("/") or "/"
        for method, pattern, endpoint, handler, instance_ok in self.routes:
            match = pattern.fullmatch(path)
            if match is None or method != request.method:
                continue
            optional = self._optional.get(handler)
            if optional is not None and self.variants[optional] == "absent":
                return None
            return endpoint, handler, instance_ok, match.groups()
        return None

    def _redirect(self, request: web.Request, found: object) -> web.Response | None:
        """The redirect variant trailing_slash asks for this request, if any (before auth, as a
        web framework's middleware redirects)."""
        mode = self.variants["trailing_slash"]
        if found is None or request.path.startswith("/_emulator/"):
            return None
        slashless = not request.path.endswith("/")
        target = request.path + ("/" if slashless else "")
        if request.query_string:
            target += "?" + request.query_string
        if mode == "off_origin_all" or (mode == "off_origin" and slashless):
            return web.Response(status=301, headers={"Location": self.off_origin_url + target})
        if slashless and mode in ("redirect_301", "redirect_308"):
            return web.Response(status=int(mode[-3:]), headers={"Location": target})
        return None

    def _missing(self, request: web.Request) -> web.Response:
        """A 404 for a route that does not exist, in the body variant missing_route says."""
        kind = self.variants["missing_route"]
        if kind == "html":
            return web.Response(text=NOT_FOUND_HTML, status=404, content_type="text/html")
        if kind == "text":
            return web.Response(text="404: Not Found", status=404, content_type="text/plain")
        return _error(404, "not_found", f"no such API route: {request.method} {request.path}")

    def _too_frequent(self, text: str) -> web.Response:
        """A 429 in plain text, with a Retry-After header where variant retry_after_s gives one."""
        response = web.Response(text=text, status=429, content_type="text/plain")
        retry_after_s = self.variants["retry_after_s"]
        if retry_after_s is not None:
            response.headers["Retry-After"] = f"{retry_after_s:g}"
        return response

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        text = await request.text()
        if not text.strip():
            return {}
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, "invalid_args", f"request body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_args", "request body must be a JSON object")
        return body

    @staticmethod
    def _scope(call: Call, endpoint: str, instance_ok: bool) -> web.Response | None:
        """An instance's own key may only show, stop/start or destroy that instance."""
        own = int(call.identity.split(":", 1)[1])
        allowed = instance_ok and call.id() == own
        if allowed and endpoint == "update" and set(call.body) - {"state"}:
            allowed = False
        if allowed:
            return None
        return _error(403, "forbidden", f"this key is instance {own}'s CONTAINER_API_KEY: it may only show, "
                      f"stop/start or destroy instance {own}; use your account's API key for anything else")

    # ------------------------------------------------------------------ search and rent
    async def search(self, call: Call) -> web.Response:
        return json_response({"offers": self.market.search(call.body)})

    async def search_new(self, call: Call) -> web.Response:
        query = dict(call.body.get("q") or {})
        return json_response({"offers": self.market.search(query)})

    async def search_legacy(self, call: Call) -> web.Response:
        raw = call.request.query.get("q", "{}")
        try:
            query = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, "invalid_args", f"q must be JSON, not {raw!r}") from e
        return json_response({"offers": self.market.search(query)})

    async def create(self, call: Call) -> web.Response:
        return json_response(self.market.create(call.id(), call.body))

    async def launch(self, call: Call) -> web.Response:
        """Search with ``q`` and rent the first offer, in one call (``vastai launch instance``)."""
        query = call.body.get("q")
        if not isinstance(query, dict):
            raise ApiError(400, "invalid_args", "launch_instance needs \"q\": the offer query object")
        offers = self.market.search(query)
        if not offers:
            raise ApiError(404, "no_offers", "No offers match the launch query; relax gpu_name, num_gpus, "
                           "region or disk.")
        body = {k: v for k, v in call.body.items() if k != "q"}
        return json_response(self.market.create(offers[0]["id"], body))

    async def create_bulk(self, call: Call) -> web.Response:
        ids = call.body.get("ids")
        if not isinstance(ids, list) or not ids:
            raise ApiError(400, "invalid_args", "bulk create needs \"ids\": a non-empty list of offer ids")
        body = {k: v for k, v in call.body.items() if k != "ids"}
        results = self.market.create_bulk(ids, body)
        shape = self.variants["bulk_create"]
        if shape == "results":
            return json_response({"success": True, "results": results})
        made = [r["new_contract"] for r in results if r["success"]]
        if not made:  # nothing rented: the first refusal, as a single create would answer it
            first = results[0]
            status = {"no_such_ask": 404, "invalid_args": 400, "invalid_price": 400}.get(first.get("error"), 400)
            return json_response(first, status)
        if shape == "ids":
            return json_response({"success": True, "new_contracts": made})
        if shape == "id_list":
            return json_response(made)
        return json_response({"success": True})

    # ------------------------------------------------------------------ instances
    async def show(self, call: Call) -> web.Response:
        return json_response({"instances": self.market.shown(call.id())})

    async def list_legacy(self, call: Call) -> web.Response:
        return json_response({"instances": self.market.rows()})

    async def list_v1(self, call: Call) -> web.Response:
        return json_response(self.market.list_page(call.request.query))

    async def filters(self, call: Call) -> web.Response:
        """Distinct (status, verification, GPU) combinations, for the CLI's "Filterable Values"."""
        cols = ("actual_status", "verification", "gpu_name")
        combos = sorted({tuple(str(r.get(c) or "") for c in cols) for r in self.market.rows()})
        return json_response({"success": True, "filters": [dict(zip(cols, c, strict=True)) for c in combos]})

    async def destroy(self, call: Call) -> web.Response:
        await self.market.destroy(call.id())
        return json_response({"success": True})

    async def destroy_bulk(self, call: Call) -> web.Response:
        ids = call.body.get("instance_ids")
        if not isinstance(ids, list):
            raise ApiError(400, "invalid_args", "bulk destroy needs \"instance_ids\": a list of instance ids")
        results = []
        for raw in ids:
            try:
                if self._survives(int(raw)):
                    results.append({"id": raw, "success": True})  # said, not done
                    continue
                await self.market.destroy(int(raw))
                results.append({"id": raw, "success": True})
            except (ApiError, TypeError, ValueError) as e:
                body = e.body if isinstance(e, ApiError) else {"success": False, "error": "not_found",
                                                               "msg": "Instance not found"}
                results.append({"id": raw, **body})
        if self.variants["bulk_destroy"] == "success_only":
            return json_response({"success": True})
        return json_response({"success": True, "results": results})

    def _survives(self, instance_id: int) -> bool:
        """Whether this bulk destroy leaves ``instance_id`` running (variant bulk_destroy_survivors;
        once per instance)."""
        r = self.market.rentals.get(instance_id)
        if r is None or instance_id in self._survived or not self.variants.picks(
                "bulk_destroy_survivors", instance_id, instance_id=instance_id,
                machine_id=r.offer.get("machine_id"), offer_id=r.offer.get("id")):
            return False
        self._survived.add(instance_id)
        return True

    async def update(self, call: Call) -> web.Response:
        if "state" not in call.body and "label" not in call.body:
            raise ApiError(400, "invalid_args", "give \"state\" (running|stopped) or \"label\"")
        self.market.live(call.id())
        if "label" in call.body:
            self.market.set_label(call.id(), call.body["label"])
        if "state" in call.body:
            await self.market.set_state(call.id(), str(call.body["state"]))
        return json_response({"success": True})

    async def update_bulk(self, call: Call) -> web.Response:
        ids, state = call.body.get("ids"), call.body.get("state")
        if not isinstance(ids, list) or state is None:
            raise ApiError(400, "invalid_args", "bulk update needs \"ids\" (a list) and \"state\"")
        results = []
        for raw in ids:
            try:
                await self.market.set_state(int(raw), str(state))
                results.append({"id": raw, "success": True})
            except ApiError as e:
                results.append({"id": raw, **e.body})
        return json_response({"success": True, "results": results})

    async def reboot(self, call: Call) -> web.Response:
        await self.market.reboot(call.id())
        return json_response({"success": True})

    def _result_url(self, token: str) -> str:
        return f"{self.market.api_url}/logs/{token}"

    async def request_logs(self, call: Call) -> web.Response:
        token = self.market.request_logs(call.id(), call.body.get("tail"), call.body.get("filter"))
        return json_response({"success": True, "result_url": self._result_url(token),
                              "msg": "Logs are being uploaded; fetch result_url shortly."})

    async def command(self, call: Call) -> web.Response:
        self.market.live(call.id())
        token = self.market.publish("the emulator does not run constrained commands; use SSH to the instance instead\n")
        return json_response({"success": True, "writeable_path": "/workspace",
                              "result_url": self._result_url(token), "msg": "Command queued."})

    async def log_file(self, request: web.Request) -> web.Response:
        started = time.time()
        text = self.market.log_text(request.match_info["token"])
        if text is None:
            response = web.Response(text="Not Found (not uploaded yet)", status=404, content_type="text/plain")
        else:
            response = web.Response(text=text, content_type="text/plain")
        self._record(request, {"endpoint": "logfile"}, response.status, None, started)
        return response

    # ------------------------------------------------------------------ keys and user
    async def instance_keys(self, call: Call) -> web.Response:
        r = self.market.rentals.get(call.id())
        if r is None:
            raise ApiError(404, "no_such_instance", f"no instance {call.id()}")
        keys = [{"id": i, "public_key": k} for i, k in r.attached_keys]
        return json_response({"success": True, "ssh_keys": json.dumps(keys)})

    async def attach_key(self, call: Call) -> web.Response:
        self.market.attach_key(call.id(), call.body.get("ssh_key"))
        return json_response({"success": True, "msg": "SSH key attached successfully"})

    async def detach_key(self, call: Call) -> web.Response:
        self.market.detach_key(call.id(0), call.id(1))
        return json_response({"success": True, "msg": "SSH key detached successfully"})

    async def account_keys(self, call: Call) -> web.Response:
        return json_response(self.market.account_keys)

    async def add_account_key(self, call: Call) -> web.Response:
        return json_response({"success": True, "key": self.market.add_account_key(call.body.get("ssh_key"))})

    async def update_account_key(self, call: Call) -> web.Response:
        return json_response({"success": True,
                              "key": self.market.update_account_key(call.id(), call.body.get("ssh_key"))})

    async def delete_account_key(self, call: Call) -> web.Response:
        self.market.delete_account_key(call.id())
        return json_response({"success": True})

    async def user(self, call: Call) -> web.Response:
        balance = round(self.market.balance(), 6)
        keys = self.market.account_keys
        return json_response({
            "id": 1, "key_id": 1, "username": "emulator", "email": "you@emulator.invalid",
            "fullname": "Emulated Vast user", "balance": balance, "credit": balance,
            "ssh_key": keys[0]["public_key"] if keys else "", "sid": "emulator-session",
            "can_pay": True, "has_billing": True, "billing_creditonly": 0,
        })

    # ------------------------------------------------------------------ emulator-only
    async def emu_meter(self, call: Call) -> web.Response:
        return json_response(self.market.meter())

    async def emu_requests(self, call: Call) -> web.Response:
        return json_response(list(self.records))

    async def emu_faults(self, call: Call) -> web.Response:
        method = call.request.method
        if method == "POST":
            try:
                self.faults.apply(call.body)
            except ValueError as e:
                raise ApiError(400, "invalid_args", str(e)) from e
        elif method == "DELETE":
            self.faults.clear()
        return json_response({"success": True, "armed": self.faults.armed()})

    async def emu_variants(self, call: Call) -> web.Response:
        """GET: the variants and their table; POST ``{"profile": ..., "values": {...}}`` (or the
        values alone) sets them; DELETE restores the defaults."""
        method = call.request.method
        try:
            if method == "POST":
                body = dict(call.body)
                profile = body.pop("profile", None)
                values = body.pop("values", None) if "values" in body else body
                if not isinstance(values, dict):
                    raise ValueError("\"values\" must be an object of variant names and values")
                parsed = {name: self.variants.parse(name, value) for name, value in values.items()}
                if profile is not None:
                    self.variants.reset(profile)
                self.variants.set(parsed)
            elif method == "DELETE":
                self.variants.reset()
        except ValueError as e:
            raise ApiError(400, "invalid_args", str(e)) from e
        return json_response({"success": True, **self.variants.describe()})
