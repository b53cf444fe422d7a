"""The OpenAI-compatible HTTP front of a node (an ASGI app run by the Proxy actor).

It decides every request locally from the last route table pushed to it: no
round trip to another actor per request. Completion endpoints are plain ASGI
callables, because on the hot path every microsecond of framework shows up in
the added latency the benchmark measures.

Among a model's targets, `meshllm.http.balance` decides: a request waits for
admission (per model, at most `--max-in-flight` at once, then a bounded queue
with a deadline, then 429), goes to the least busy healthy replica (or the one
its prompt is cached on), and fails over to the next before any byte reached
the client (a refused connection, a 502/503/504); a target that failed cools
down with exponential backoff, and with none healthy the answer is 503 with
Retry-After. Once bytes were sent nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from meshllm.http.auth import (
    OPEN_PATHS,
    Allowed,
    ApiKey,
    KeyRing,
    Limited,
    TokenCharge,
    estimate_tokens,
)
from meshllm.http.balance import (
    FAILOVER_STATUSES,
    LOAD_WAIT_S,
    MAX_IN_FLIGHT,
    MAX_QUEUED,
    PROBE_TIMEOUT_S,
    QUEUE_WAIT_S,
    STALL_S,
    Admission,
    AffinityFields,
    Balancer,
    Queued,
    Refused,
    affinity_key,
    target_id,
)
from meshllm.http.endpoints import (
    LOCAL_PATHS,
    METRICS_PATH,
    MODEL_PATHS,
    NODE_PATHS,
    READ_PATHS,
    Kind,
    kind_of,
    query_model,
    request_headers,
    without_credentials,
)
from meshllm.http.errors import RETRY_AFTER_S, error_body
from meshllm.http.metrics import CONTENT_TYPE_LATEST, BodyTail, Metrics
from meshllm.http.origin import (
    LOCAL_NAMES,
    Policy,
    Verdict,
    browser_headers,
    form_content_type,
    from_browser,
    judge,
    preflight_headers,
    rebinding_safe_host,
    with_cors,
)
from meshllm.http.routing import Routes
from meshllm.http.upstream import Pool, Response, Upstream, UpstreamError, UpstreamRefused
from meshllm.placement.demand import DemandMeter
from meshllm.runtime.messages import ModelRoute, RouteTable, RouteTarget
from meshllm.tunnel.hop import MAX_HEADER_BYTES, MAX_HEADERS

log = logging.getLogger("meshllm.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class _Peek(AffinityFields):
    """What the proxy checks in a request body: `model` routes it; a `stream` of the
    wrong type is refused here with a clear message (null is OpenAI's default). The
    fields an affinity key is made from come in the same pass (kept raw)."""

    model: str | None = None
    stream: bool | None = None


_peek = msgspec.json.Decoder(_Peek)
_json = msgspec.json.Encoder()


class _Request(NamedTuple):
    """What goes to the upstream: the client's method, path with query, body, headers."""

    method: str
    path: str
    body: bytes
    headers: list[tuple[bytes, bytes]]
    key_name: str = ""
    """The API key it came with (`--api-key`), by name: the `key` label of its metrics."""

    def remote_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers for another node: the client's keys stay here."""
        return without_credentials(self.headers)


async def decode_peek(body: bytes, send: Send) -> _Peek | None:
    """The fields the Proxy reads of a JSON body; None once a 400 went out."""
    try:
        return _peek.decode(body)
    except msgspec.ValidationError as exc:
        await send_error(send, 400, f"invalid request body: {exc}", "invalid_body")
    except msgspec.DecodeError as exc:
        await send_error(send, 400, f"request body is not valid JSON: {exc}", "invalid_json")
    except RecursionError:
        # msgspec gives up on JSON nested thousands deep (even in a field it skips).
        await send_error(send, 400, "request body is nested too deeply", "invalid_json")
    return None


def upstream_target(scope: Scope) -> str:
    """The request target to send upstream: the path as the client wrote it (still
    percent-encoded, so that nothing it encodes, a CR or LF included, becomes part of
    the request line), and its query."""
    raw = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    target = raw + b"?" + query if query else raw
    return target.decode("latin-1")


def body_model(body: bytes) -> str | None:
    """The `model` a JSON object body names, if any (anything else: None, no error)."""
    try:
        return _peek.decode(body).model
    except (msgspec.DecodeError, RecursionError):
        return None


class _Flight:
    """One attempt of a request on one target, as the stall watch sees it (and, for a
    measured request, when its first body byte went out and the body's end)."""

    __slots__ = ("balancer", "first", "hung", "tail", "task", "tid")

    def __init__(self, balancer: Balancer, tid: str, task: asyncio.Task[Any]) -> None:
        self.balancer = balancer
        self.tid = tid
        self.task = task
        self.hung = False
        """The target was found hung, and the task cancelled for that."""
        self.first = 0.0
        self.tail: BodyTail | None = None

    def progress(self, chunk: bytes) -> None:
        now = time.monotonic()
        self.balancer.progressed(self.tid, now)
        if not self.first:
            self.first = now
        if self.tail is not None:
            self.tail.add(chunk)


class Flights:
    """The requests under way on each target, so that a hung target's can be cancelled
    (and the targets themselves, to probe them)."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.by_target: dict[str, dict[asyncio.Task[Any], _Flight]] = {}
        self.targets: dict[str, RouteTarget] = {}

    def start(self, target: RouteTarget, task: asyncio.Task[Any], now: float) -> _Flight:
        tid = target_id(target)
        self.balancer.started(target, now)
        flight = _Flight(self.balancer, tid, task)
        self.by_target.setdefault(tid, {})[task] = flight
        self.targets[tid] = target
        return flight

    def end(self, flight: _Flight) -> None:
        flights = self.by_target.get(flight.tid)
        if flights is not None:
            flights.pop(flight.task, None)
            if not flights:
                del self.by_target[flight.tid]

    def cancel(self, tid: str) -> None:
        """Cancel the requests under way on a hung target (once each)."""
        for flight in self.by_target.get(tid, {}).values():
            if not flight.hung:
                flight.hung = True
                flight.task.cancel()

    def retain(self, ids: set[str]) -> None:
        for tid in list(self.targets):
            if tid not in ids and tid not in self.by_target:
                del self.targets[tid]


async def probe(upstream: Upstream, timeout: float) -> bool:
    """Whether a server answers `GET /health` at all (any status) within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            resp = await upstream.request("GET", "/health")
    except (UpstreamError, TimeoutError):
        return False
    resp.release()
    return True


async def send_error(
    send: Send,
    status: int,
    message: str,
    code: str | None = None,
    retry_after: bool | int = False,
) -> None:
    """An OpenAI-shaped error; `retry_after` True sends the default Retry-After, a
    number sends that many seconds."""
    headers = list(JSON_HEADERS)
    if retry_after is not False:
        seconds = RETRY_AFTER_S if retry_after is True else int(retry_after)
        headers.append((b"retry-after", str(seconds).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(status, message, code)})


async def browser_request(scope: Scope, send: Send, policy: Policy) -> Send | None:
    """Judge a request that `from_browser` found a browser's (`meshllm.http.origin`).

    Returns the `send` to answer it with (one that adds CORS headers for an allowed
    origin), or None when it is answered here: refused with 403, or a preflight."""
    host, origin, site = browser_headers(scope["headers"])
    verdict = judge(scope.get("scheme", "http"), host, origin, site, policy)
    if verdict is Verdict.SAME_ORIGIN:
        return send
    if verdict is Verdict.REFUSED or origin is None:
        await send_error(
            send,
            403,
            "cross-site requests are refused; allow the page's origin with --cors-origin",
            "cross_site_refused",
        )
        return None
    allowed = origin
    if scope["method"] == "OPTIONS":
        headers = dict(scope["headers"])
        if b"access-control-request-method" in headers:
            requested = headers.get(b"access-control-request-headers")
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": preflight_headers(allowed, requested),
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return None

    async def send_cors(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": with_cors(message.get("headers", ()), allowed)}
        await send(message)

    return send_cors


def _charging(send: Send, receive: Receive, charge: TokenCharge) -> tuple[Send, Receive]:
    """`send` and `receive` of a request whose key has a tokens-per-minute limit: the body
    re-estimates its reservation once read; the answer's end settles it, or the client's
    leaving first does (`forward` watches for it). An answer that fails without an end
    keeps its reservation."""
    chunks: list[bytes] = []

    async def charging_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            charge.feed(message.get("body", b""))
            if not message.get("more_body", False):
                charge.settle(time.monotonic(), ended=True)
        await send(message)

    async def charging_receive() -> dict[str, Any]:
        message = await receive()
        if message["type"] == "http.disconnect":
            charge.settle(time.monotonic(), ended=False)  # nothing if the answer ended
        elif message["type"] == "http.request" and not charge.settled:
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                charge.reserve(estimate_tokens(b"".join(chunks)), time.monotonic())
                chunks.clear()
        return message

    return charging_send, charging_receive


class _Raw:
    """Marks a handler as a plain ASGI app (Starlette would wrap a bare function)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


LOOPBACK_NAMES = frozenset({b"localhost", b"127.0.0.1", b"[::1]", b"::1"})


def loopback_host(scope: Scope) -> bool:
    """True unless the request's Host header names something other than this machine."""
    for key, value in scope["headers"]:
        if key == b"host":
            name = value.rsplit(b":", 1)[0] if not value.endswith(b"]") else value
            return not name or name.lower() in LOOPBACK_NAMES or _is_127(name)
    return True  # no Host (HTTP/1.0): not a browser, which always names the host


def _is_127(name: bytes) -> bool:
    parts = name.split(b".")
    return len(parts) == 4 and parts[0] == b"127" and all(p.isdigit() for p in parts)


def is_loopback_address(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def machine_names() -> frozenset[bytes]:
    """This machine's own names, as a browser on the network may put them in `Host`:
    localhost, its host name and that name under mDNS's `.local` (no DNS lookup)."""
    name = socket.gethostname().lower().rstrip(".").encode("ascii", "ignore")
    names = set(LOCAL_NAMES)
    if name:
        names |= {name, name.split(b".")[0] + b".local"}
    return frozenset(names)


async def refuse_scope(scope: Scope, receive: Receive, send: Send) -> None:
    """Turn away a connection that is not plain HTTP (a websocket, should one get here)."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})


class PoolMap:
    """Upstream pools keyed by target (local llama-server port, or the tunnel)."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, int], Pool] = {}

    def get(self, host: str, port: int) -> Pool:
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = Pool(host, port)
        return pool

    def retain(self, keep: set[tuple[str, int]]) -> None:
        for key in list(self.pools):
            if key not in keep:
                self.pools.pop(key).close()


class ProxyApp:
    """Holds the route table and forwards OpenAI requests to their targets."""

    def __init__(
        self,
        strict_models: bool = False,
        max_body_bytes: int = 16 * 1024 * 1024,
        remote: Callable[[RouteTarget], Upstream] | None = None,
        loopback_only: bool = False,
        cors_origins: tuple[str, ...] | list[str] = (),
        own_names: frozenset[bytes] | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_queued: int = MAX_QUEUED,
        queue_wait_s: float = QUEUE_WAIT_S,
        balancer: Balancer | None = None,
        affinity: bool = True,
        stall_s: float = STALL_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        api_keys: Sequence[ApiKey] = (),
        load_wait_s: float = LOAD_WAIT_S,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.demand = DemandMeter()
        """Requests per model of the mesh that entered here (announced: placement follows
        demand, `meshllm.placement.demand`)."""
        self.load_wait_s = load_wait_s
        """How long a request for a model nobody serves waits for a node to load it."""
        self.table_changed = asyncio.Event()
        self.loading: Counter[str] = Counter()
        """Requests waiting for a model to be loaded, by model (at most `--queue` each)."""
        self.loopback_only = loopback_only
        self.own_names = machine_names() if own_names is None else own_names
        """Host names (besides IP literals) a browser may use to reach a non-loopback
        endpoint: see `trusted_host`."""
        self.cors = Policy(cors_origins)
        self.strict_models = strict_models
        self.keys = KeyRing(api_keys)
        """`--api-key`: when any is given, every request but `OPEN_PATHS` needs one, and
        no credential of the client's goes on to a server (the node checked it)."""
        self.remote = remote
        self.pools = PoolMap()
        self.routes = Routes(RouteTable(), strict_models)
        self.balancer = balancer or Balancer()
        self.affinity = affinity
        """Whether requests of one conversation prefer one replica (`--no-affinity`)."""
        self.stall_s = stall_s
        self.probe_timeout_s = probe_timeout_s
        self.flights = Flights(self.balancer)
        self.probes: dict[str, asyncio.Future[None]] = {}
        self.stall_watch: asyncio.Future[None] | None = None
        self.admission = Admission(max_in_flight, max_queued, queue_wait_s)
        self.waiters: dict[int, asyncio.Future[None]] = {}
        """Queued requests' tickets -> what `_release` resolves when they are admitted."""
        self.models_body = b'{"object":"list","data":[]}'
        self.metrics = Metrics(self._admission_gauges)
        self.app = Starlette(
            routes=[
                *(
                    Route(
                        path,
                        _Raw(self.health if "health" in path else self.models),
                        methods=["GET"],
                    )
                    for path in sorted(NODE_PATHS)
                ),
                *(
                    Route(path, _Raw(self.forward), methods=sorted(methods))
                    for path, methods in _passed_methods().items()
                ),
                Route("/slots/{slot}", _Raw(self.forward), methods=["POST"]),
            ],
            # Unknown path (404) and wrong method (405) in OpenAI's error shape too.
            exception_handlers={HTTPException: _http_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # Nothing here speaks websockets (uvicorn runs with them off): no other
            # kind of request gets past the checks below by not being "http".
            await refuse_scope(scope, receive, send)
            return
        if self.loopback_only and not loopback_host(scope):
            # A web page that rebinds its own name to 127.0.0.1 must not drive the mesh.
            await send_error(send, 421, "this endpoint answers only to a loopback host name")
            return
        # A web page on another site must not drive it either, unless --cors-origin
        # allows it; requests without browser headers (SDKs, curl) skip this.
        if from_browser(scope["headers"]):
            if not self.loopback_only and not self.trusted_host(scope["headers"]):
                await send_error(
                    send,
                    421,
                    "a browser may reach this endpoint by IP address or by this machine's "
                    "own name only (or from an origin allowed with --cors-origin)",
                    "untrusted_host",
                )
                return
            answer = await browser_request(scope, send, self.cors)
            if answer is None:
                return
            send = answer
        # After the browser checks: a CORS preflight carries no key, and a 401 to an
        # allowed origin gets its CORS headers (so the page can read it).
        if self.keys and scope["path"] not in OPEN_PATHS:
            allowed = await self.authorise(scope, send)
            if allowed is None:
                return
            if allowed.charge is not None:
                send, receive = _charging(send, receive, allowed.charge)
        # The forwarded endpoints skip Starlette's middleware and router (about 10% of
        # the proxy's CPU per request); every other request goes through Starlette.
        if kind_of(scope["method"], scope["path"]) is not None:
            await self.forward(scope, receive, send)
            return
        await self.app(scope, receive, send)  # type: ignore[arg-type]

    async def authorise(self, scope: Scope, send: Send) -> Allowed | None:
        """Whether a request's key lets it on (`--api-key`): None once it was answered
        401 or 429. The key's name goes into the scope (`meshllm.api_key`); a key with a
        tokens-per-minute limit comes with the request's reservation (`_charging`).
        Wrong keys are limited by the client's address (`FailureLimit`)."""
        client = scope.get("client")
        verdict = self.keys.check(scope["headers"], time.monotonic(), client and client[0])
        if isinstance(verdict, Allowed):
            scope["meshllm.api_key"] = verdict.name
            return verdict
        if isinstance(verdict, Limited):
            await send_error(
                send, 429, verdict.message, "rate_limit_exceeded", verdict.retry_after_s
            )
        else:
            await send_error(send, 401, verdict.message, verdict.code)
        return None

    def trusted_host(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Bound beyond loopback: a browser's request names this machine in `Host`, or
        comes from an origin `--cors-origin` allows (the name a rebinding page sends is
        its own, and its origin is that name: not allowed)."""
        host, origin, _ = browser_headers(headers)
        if rebinding_safe_host(host, self.own_names):
            return True
        return origin is not None and self.cors.allows(origin)

    def local_in_flight(self, node_id: str, model: str) -> tuple[int, bool]:
        """Requests in flight to this node's own llama-server of `model`, and whether the
        route table still sends new ones there (a paused node waits for (0, False))."""
        tid = target_id(RouteTarget(node_id, True, 0, model))
        routed = any(
            t.local and not t.backend and t.model == model
            for r in self.routes.table.models
            for t in r.targets
        )
        return self.balancer.in_flight(tid), routed

    def set_table(self, table: RouteTable) -> None:
        self.routes = Routes(table, self.strict_models)
        self.table_changed.set()
        self.table_changed = asyncio.Event()
        self.balancer.retain(t for r in table.models for t in r.targets)
        self.flights.retain({target_id(t) for r in table.models for t in r.targets})
        self.pools.retain(
            {(t.host or "127.0.0.1", t.port) for r in table.models for t in r.targets if t.local}
        )
        created = int(time.time())
        self.models_body = _json.encode(
            {
                "object": "list",
                "data": [
                    {
                        "id": r.name,
                        "object": "model",
                        "created": created,
                        "owned_by": "meshllm",
                        "meshllm": _model_info(r),
                    }
                    for r in table.models
                ],
            }
        )

    # -- small endpoints (plain ASGI, see the module docstring) ---------------

    async def metrics_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /metrics`: the node's metrics (`meshllm.http.metrics`)."""
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.metrics.render()})

    def _admission_gauges(self) -> list[tuple[str, int, int]]:
        """(model, in flight, queued) of each routed model and each one admitted."""
        names = dict.fromkeys([*(r.name for r in self.routes.table.models), *self.admission.gates])
        return [(n, self.admission.in_flight(n), self.admission.queued(n)) for n in names]

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready = [r.name for r in self.routes.table.models if r.targets]
        status = 200 if ready else 503
        body = _json.encode({"status": "ok" if ready else "no model ready", "models": ready})
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": self.models_body})

    # -- forwarding ------------------------------------------------------------

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A llama-server endpoint (`meshllm.http.endpoints`): to the server its request
        is routed to, with the client's headers, path and query, answered as it answers."""
        kind = kind_of(scope["method"], scope["path"])
        if kind is None:  # only reached through `__call__`'s check
            await send_error(send, 404, f"{scope['path'][:200]!r} is not passed on")
            return
        if kind is not Kind.READ and form_content_type(scope["headers"]):
            # What an HTML form on any site can post, old browsers without saying so.
            await send_error(
                send,
                415,
                "the body must be sent as Content-Type: application/json",
                "unsupported_media_type",
            )
            return
        headers = request_headers(scope["headers"])
        if self.keys:
            # The node's key was for the node: llama-server never sees it.
            headers = without_credentials(headers)
        if (
            len(headers) > MAX_HEADERS
            or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES
        ):
            why = f"at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes in all are passed on"
            await send_error(send, 431, why, "headers_too_large")
            return
        body = await read_body(scope, receive, send, self.max_body_bytes)
        if body is None:
            return
        peek: _Peek | None = None
        if kind is Kind.MODEL:
            peek = await decode_peek(body, send)
            if peek is None:
                return
            model = peek.model
        else:
            try:
                model = query_model(scope["query_string"])
            except ValueError as exc:
                await send_error(send, 400, f"invalid query string: {exc}", "invalid_query")
                return
            if model is None and kind is Kind.LOCAL:
                # The body's `model` if it names one, else this node's own server.
                model = body_model(body) or self.routes.local_model()
            elif model is None and scope["path"] == METRICS_PATH:
                # The node's own; a model's llama-server's with `?model=NAME`.
                await self.metrics_endpoint(scope, receive, send)
                return
        route, why = self.routes.candidates(model)
        request = _Request(
            scope["method"], upstream_target(scope), body, headers, scope.get("meshllm.api_key", "")
        )
        # Demand is what clients ask a model to do, not what reads it (a scraper's
        # `/slots?model=X` keeps nothing loaded): the model that answers (the first one
        # for a request without a known model), or the cold model of the mesh asked for.
        mesh_model = model is not None and model in self.routes.by_name
        asked = route.name if route is not None else model if mesh_model else None
        if kind is Kind.MODEL and asked is not None:
            self.demand.seen(asked, time.time())
        if route is not None:
            await until_disconnect(receive, self._dispatch(scope, kind, route, request, peek, send))
        elif self.routes.unknown(model):
            await send_error(send, 404, why, "model_not_found")
        elif (
            model is None
            or kind is not Kind.MODEL
            or self.load_wait_s <= 0
            or not self.routes.awaits_load(model)
        ):
            await send_error(send, 503, why, "model_not_ready", retry_after=True)
        elif self.loading[model] >= self.admission.queue_limit:
            why += f"; {self.loading[model]} requests already wait for a node to load it"
            await send_error(send, 503, why, "model_not_ready", retry_after=True)
        else:
            loaded = self._when_loaded(scope, kind, model, request, peek, send)
            await until_disconnect(receive, loaded)

    async def _when_loaded(
        self,
        scope: Scope,
        kind: Kind,
        model: str,
        request: _Request,
        peek: _Peek | None,
        send: Send,
    ) -> None:
        """A request for a model of the mesh that no node serves: its demand is announced
        and a node loads it (`meshllm.placement.election`, "Usage-aware placement"); the
        request waits for that up to `load_wait_s`, then gets 503 with Retry-After."""
        deadline = time.monotonic() + self.load_wait_s
        self.loading[model] += 1
        try:
            while (route := self.routes.candidates(model)[0]) is None:
                changed = self.table_changed
                left = deadline - time.monotonic()
                if model not in self.routes.by_name or left <= 0:
                    why = self.routes.choose(model)[1]
                    if left <= 0:
                        why += f" (waited {self.load_wait_s:g} s for a node to load it)"
                    await send_error(send, 503, why, "model_not_ready", retry_after=True)
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await changed.wait()
        finally:
            self.loading[model] -= 1
            if not self.loading[model]:
                del self.loading[model]
        await self._dispatch(scope, kind, route, request, peek, send)

    async def _dispatch(
        self,
        scope: Scope,
        kind: Kind,
        route: ModelRoute,
        request: _Request,
        peek: _Peek | None,
        send: Send,
    ) -> None:
        """Forward a request whose route has targets: admission and failover for a model
        request, this node's own server for a server-changing one, else any target."""
        if kind is Kind.MODEL:
            assert peek is not None
            key = affinity_key(peek) if self.affinity and len(route.targets) > 1 else None
            work = self._admit_and_forward(route, request, key, send)
        elif kind is Kind.LOCAL:
            local = tuple(t for t in route.targets if t.local)
            if not local:
                where = ", ".join(f"{t.node_id} (API port {t.port})" for t in route.targets[:4])
                why = (
                    f"{scope['method']} {scope['path'][:200]} changes a llama-server for all "
                    f"its users, so it goes only to this node's own: send it to a node that "
                    f"runs {route.name!r}: {where}"
                )
                await send_error(send, 403, why, "not_local")
                return
            work = self._forward_with_failover(route, request, None, send, local)
        else:
            work = self._forward_with_failover(route, request, None, send)
        await work

    async def _admit_and_forward(
        self, route: ModelRoute, request: _Request, key: bytes | None, send: Send
    ) -> None:
        """Wait for admission, then try the route's targets in the balancer's order."""
        arrived = time.monotonic()
        decision = self.admission.request(route.name, arrived)
        if isinstance(decision, Refused):
            self.metrics.requests.refused(route.name, 429, request.key_name)
            await send_error(
                send, 429, decision.reason, "too_many_requests", decision.retry_after_s
            )
            return
        if isinstance(decision, Queued) and not await self._wait_admitted(route.name, decision):
            self.metrics.requests.refused(route.name, 429, request.key_name)
            wait = self.admission.wait_s
            why = f"no slot for {route.name!r} within {wait:g} s"
            await send_error(send, 429, why, "too_many_requests", max(1, round(wait)))
            return
        try:
            await self._forward_with_failover(route, request, key, send, arrived=arrived)
        finally:
            self._release(route.name)

    async def _wait_admitted(self, model: str, queued: Queued) -> bool:
        """Whether the queued request got a slot before its deadline (when it did, the
        caller owns it and `_release`s it)."""
        future = asyncio.get_running_loop().create_future()
        self.waiters[queued.ticket] = future
        try:
            async with asyncio.timeout(queued.deadline - time.monotonic()):
                await asyncio.shield(future)
            return True
        except TimeoutError:
            if future.done():
                return True  # admitted as the deadline came
            self.admission.cancel(model, queued.ticket)
            return False
        except asyncio.CancelledError:
            if future.done():
                self._release(model)  # admitted, but its client left: hand the slot on
            else:
                self.admission.cancel(model, queued.ticket)
            raise
        finally:
            self.waiters.pop(queued.ticket, None)

    def _release(self, model: str) -> None:
        """An admitted request ended: wake those admitted in its place."""
        for admitted in self.admission.release(model):
            future = self.waiters.get(admitted.ticket)
            if future is not None and not future.done():
                future.set_result(None)
            else:
                self._release(model)  # its waiter is gone: pass the slot on

    def _upstream(self, target: RouteTarget) -> Upstream | None:
        if target.local:
            return self.pools.get(target.host or "127.0.0.1", target.port)
        return self.remote(target) if self.remote is not None else None

    async def _forward_with_failover(
        self,
        route: ModelRoute,
        request: _Request,
        key: bytes | None,
        send: Send,
        targets: tuple[RouteTarget, ...] | None = None,
        arrived: float | None = None,
    ) -> None:
        """Try the route's targets (or `targets`) in the balancer's order (`key`: the
        request's affinity key) until one answers; never again once a byte went to the
        client. A target found hung while it works on the request counts as failed.
        A model request (`arrived`: when) is counted in the metrics when it ends."""
        now = time.monotonic()
        stats = self.metrics.requests
        targets = route.targets if targets is None else targets
        order = self.balancer.order(targets, now, key)
        if not order:
            retry = self.balancer.retry_after(targets, now)
            why = f"every server of {route.name!r} failed just now; retry in {retry} s"
            if arrived is not None:
                stats.refused(route.name, 503, request.key_name)
            await send_error(send, 503, why, "model_not_ready", retry)
            return
        self._watch_stalls()
        task = asyncio.current_task()
        assert task is not None
        failure = ""
        down = True
        """Every target tried was down (refused, or hung): 503, not this request's 502."""
        tried = 0
        for attempt, target in enumerate(order):
            upstream = self._upstream(target)
            if upstream is None:
                continue  # a remote target, and no tunnel
            last = attempt == len(order) - 1
            if tried:
                stats.retried(route.name)
            tried += 1
            flight = self.flights.start(target, task, time.monotonic())
            try:
                headers = request.headers if target.local else request.remote_headers()
                try:
                    resp = await upstream.request(
                        request.method, request.path, request.body, headers
                    )
                except UpstreamError as exc:
                    # Refused: nothing listens, the server is down, so it cools down. Closed
                    # before answering (it died mid-request, or this request made it drop
                    # the connection) or a broken answer: this request's failure only.
                    # Either way no byte went out yet, so another replica may answer.
                    if isinstance(exc, UpstreamRefused):
                        self.balancer.failed(target, time.monotonic())
                    else:
                        self.balancer.finished(target, ok=False)
                        down = False
                    log.warning("upstream %s failed: %s", upstream.where, exc)
                    failure = f"upstream failed: {exc}"
                    stats.failed_attempt(route.name, target.node_id)
                    continue
                except asyncio.CancelledError:
                    self.balancer.finished(target, ok=False)
                    if not flight.hung or task.uncancel() > 0:
                        raise
                    stats.failed_attempt(route.name, target.node_id)
                    failure = f"{upstream.where} stopped answering"
                    log.warning("upstream %s failed: it stopped answering", upstream.where)
                    continue
                except BaseException:
                    self.balancer.finished(target, ok=False)
                    raise
                self.balancer.progressed(target, time.monotonic())
                if resp.status in FAILOVER_STATUSES and not last:
                    # Not a byte sent yet: another replica may answer.
                    self.balancer.failed(target, time.monotonic())
                    log.info("%s answered %d; trying another server", upstream.where, resp.status)
                    resp.release()  # unread: the connection is closed, not reused
                    stats.failed_attempt(route.name, target.node_id)
                    continue
                ok = False
                if arrived is not None and resp.status == 200:
                    flight.tail = BodyTail()
                try:
                    await relay_response(resp, send, flight.progress)
                    ok = resp.status not in FAILOVER_STATUSES  # a last failing answer: no reset
                except asyncio.CancelledError:
                    if not flight.hung or task.uncancel() > 0:
                        raise
                    log.warning("%s stopped answering mid-response", upstream.where)
                    await cut_response(resp, send, f"{upstream.where} stopped answering")
                finally:
                    self.balancer.finished(target, ok=ok)
                    if arrived is not None:
                        self._count(
                            route.name, target.node_id, resp.status, arrived, flight, request
                        )
                return
            finally:
                self.flights.end(flight)
        if not failure:
            status = 503
            await send_error(send, 503, "remote models need the tunnel", "no_tunnel")
        elif down:
            status = 503
            retry = self.balancer.retry_after(targets, time.monotonic())
            why = f"every server of {route.name!r} is down ({failure}); retry in {retry} s"
            await send_error(send, 503, why, "model_not_ready", retry)
        else:
            status = 502
            await send_error(send, 502, failure, "upstream_error")
        if arrived is not None:
            stats.refused(route.name, status, request.key_name)

    def _count(
        self, model: str, node: str, status: int, arrived: float, flight: _Flight, request: _Request
    ) -> None:
        """A model request answered by `node` ended (or was cut off): into the metrics."""
        now = time.monotonic()
        self.metrics.requests.answered(
            model,
            node,
            status,
            request.key_name,
            now - arrived,
            flight.first - arrived if flight.first else None,
            flight.tail.usage() if flight.tail is not None else None,
        )

    # -- hung servers ----------------------------------------------------------

    def _watch_stalls(self) -> None:
        """Start the one task that looks for stalled targets, if it is not running."""
        if self.stall_watch is None or self.stall_watch.done():
            self.stall_watch = asyncio.ensure_future(self._stall_watch())

    async def _stall_watch(self) -> None:
        """Every half stall time: probe the targets that went silent with requests in
        flight (`Balancer.stalled`) and those found hung before; ends when none is left."""
        tick = max(0.1, self.stall_s / 2)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for tid in {*self.balancer.stalled(now, self.stall_s), *self.balancer.hung_ids()}:
                target = self.flights.targets.get(tid)
                if target is not None and tid not in self.probes:
                    self.probes[tid] = asyncio.ensure_future(self._probe(tid, target))
            if not self.flights.by_target and not self.balancer.hung_ids():
                return

    async def _probe(self, tid: str, target: RouteTarget) -> None:
        try:
            upstream = self._upstream(target)
            alive = upstream is not None and await probe(upstream, self.probe_timeout_s)
            now = time.monotonic()
            if alive:
                if tid in self.balancer.hung_ids():
                    log.info("%s answers again", target_id(target))
                self.balancer.revived(target, now)
                return
            if tid not in self.balancer.hung_ids():
                log.warning(
                    "%s sent nothing for %g s and does not answer: avoided until it does",
                    tid,
                    self.stall_s,
                )
            self.balancer.hung(target, now)
            self.flights.cancel(tid)
        finally:
            self.probes.pop(tid, None)


async def forward_until_disconnect(
    pool: Upstream,
    method: str,
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    receive: Receive,
    send: Send,
    what: str,
    code: str,
) -> None:
    """Send a request to `pool` and relay the answer to the ASGI client.

    The client going away while the upstream works closes the upstream
    connection, which makes llama-server stop generating. An upstream that
    cannot be reached is a 502 naming `what`, with error code `code`.
    """
    await until_disconnect(receive, _relay(pool, method, path, body, headers, send, what, code))


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work` in this task (no task of its own, no asyncio.wait), cancelled by one
    watcher task if the client goes away before it is done."""
    task = asyncio.current_task()
    assert task is not None
    state = _Watch()
    watch = asyncio.ensure_future(_watch_disconnect(receive, task, state))
    try:
        await work
    except asyncio.CancelledError:
        if not state.cancelled or task.uncancel() > 0:
            raise  # cancelled from outside, not by the watcher
    finally:
        state.running = False
        watch.cancel()


class _Watch:
    __slots__ = ("cancelled", "running")

    def __init__(self) -> None:
        self.running = True
        self.cancelled = False


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], state: _Watch) -> None:
    await wait_disconnect(receive)
    if state.running:
        state.cancelled = True
        task.cancel()


async def _relay(
    pool: Upstream,
    method: str,
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    send: Send,
    what: str,
    code: str,
) -> None:
    try:
        resp = await pool.request(method, path, body, headers)
    except UpstreamError as exc:
        log.warning("%s %s failed: %s", what, pool.where, exc)
        await send_error(send, 502, f"{what} failed: {exc}", code)
        return
    await relay_response(resp, send)


async def relay_response(
    resp: Response, send: Send, progress: Callable[[bytes], None] | None = None
) -> None:
    """Pass an upstream response to the ASGI client chunk by chunk (`progress` is called
    with each as it goes out). A body that has arrived whole by the time the head is
    read goes out in one message."""
    if resp.complete():
        headers = resp.forward_headers()
        body = await resp.body()
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if progress is not None:
            progress(body)
        return
    await send(
        {"type": "http.response.start", "status": resp.status, "headers": resp.forward_headers()}
    )
    try:
        async for chunk in resp.iter_body():
            if progress is not None:
                progress(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamError as exc:
        log.warning("upstream broke mid-response: %s", exc)
        await cut_response(resp, send, f"upstream failed mid-stream: {exc}")
        return
    finally:
        resp.release()
    await send({"type": "http.response.body", "body": b""})


async def cut_response(resp: Response, send: Send, why: str) -> None:
    """End a response whose upstream broke off after its head went to the client: a
    stream with an error event an SSE client can parse, not a silent cut. A body of
    announced length cannot say so: it ends short, and the connection is closed."""
    resp.release()
    if resp.length is None:
        event = b"data: " + error_body(502, why) + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _http_error(request: Request, exc: Exception) -> HTTPResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code in (404, 405):
        what = f"{request.method} {request.url.path[:200]}"
        detail = (
            f"{what}: no such endpoint (the node passes on llama-server's endpoints)"
            if exc.status_code == 404
            else f"{what}: not allowed on this endpoint"
        )
    return HTTPResponse(
        error_body(exc.status_code, detail),
        exc.status_code,
        headers=exc.headers,
        media_type="application/json",
    )


async def read_body(scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
    """The whole request body, at most `limit` bytes; None once an error went out or
    the client left (a declared length over the limit is refused before reading)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                await send_error(send, 400, "invalid Content-Length header")
                return None
            if declared > limit:
                await send_error(send, 413, _too_large(limit), "body_too_large")
                return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await send_error(send, 413, _too_large(limit), "body_too_large")
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _passed_methods() -> dict[str, set[str]]:
    """Path -> methods of the llama-server endpoints the Proxy passes on (for Starlette's
    405 on a wrong method; `__call__` sends them to `forward` before Starlette)."""
    methods: dict[str, set[str]] = {}
    for path in MODEL_PATHS | LOCAL_PATHS:
        methods.setdefault(path, set()).add("POST")
    for path in READ_PATHS:
        methods.setdefault(path, set()).add("GET")
    return methods


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


def _model_info(route: ModelRoute) -> dict[str, object]:
    """The `meshllm` part of a `/v1/models` entry: where the model is served, and how."""
    info: dict[str, object] = {
        "status": "warm" if route.targets else "cold",
        "nodes": list(route.nodes),
    }
    splits = [
        {
            "host": t.node_id,
            "workers": list(t.workers),
            "shares": dict(zip((t.node_id, *t.workers), t.shares, strict=False)),
        }
        for t in route.targets
        if t.workers
    ]
    if splits:
        info["split"] = splits
    if backends := list(dict.fromkeys(t.node_id for t in route.targets if t.backend)):
        info["backends"] = backends  # nodes where an external backend (--backend-url) serves it
    if route.note:
        info["note"] = route.note
    return info
