"""Which llama-server endpoints a node passes through, and how (sans-I/O, defined once).

The Proxy forwards these to the server it routes to and the Tunnel of the node
that runs that server accepts exactly these from its members, so both read this
table. Three kinds:

- `MODEL`: a POST whose JSON body may name a `model`: routed by it (to the
  first model's servers when it names none), admitted, balanced and failed over.
- `READ`: a GET with no body (`/props`, `/slots`, `/metrics`...), routed by the
  query's `?model=` like llama-server's own router, else to the first model
  (`/metrics` without a model: the node's own, see below).
- `LOCAL`: a POST that changes a llama-server for everyone who uses it (LoRA
  scales, slot save/restore/erase, props): only to this node's own server, never
  through the tunnel, so no member can change another member's server.

The node answers `/health`, `/v1/health`, `/models` and `/v1/models` itself: the
first two for the node (ready once one model is), the others with the mesh's models.
It answers `GET /metrics` itself too (its own, `meshllm.http.metrics`); with
`?model=NAME` that is a read like the others: the metrics of a llama-server of NAME.
llama-server's resumable streams (`/v1/stream`), its router-mode `/models/*` and
`/cors-proxy` are not passed: each belongs to one server process, not to a mesh.
"""

from __future__ import annotations

import enum
from urllib.parse import parse_qs


class Kind(enum.Enum):
    MODEL = "model"
    READ = "read"
    LOCAL = "local"


MODEL_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/completion",
        "/v1/responses",
        "/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/chat/completions/input_tokens",
        "/chat/completions/input_tokens",
        "/v1/responses/input_tokens",
        "/responses/input_tokens",
        "/infill",
        "/v1/embeddings",
        "/embeddings",
        "/embedding",
        "/v1/rerank",
        "/v1/reranking",
        "/rerank",
        "/reranking",
        "/tokenize",
        "/detokenize",
        "/apply-template",
    }
)
"""POSTs with a JSON body, routed by its `model` (llama-server's own list)."""
READ_PATHS = frozenset({"/props", "/slots", "/metrics", "/lora-adapters"})
"""GETs, routed by `?model=`."""
METRICS_PATH = "/metrics"
"""A read with `?model=NAME`; without it the node answers with its own metrics."""
LOCAL_PATHS = frozenset({"/props", "/lora-adapters"})
LOCAL_PREFIX = "/slots/"
"""POST /slots/ID?action=save|restore|erase."""
NODE_PATHS = frozenset({"/health", "/v1/health", "/models", "/v1/models"})
"""GETs the node answers itself."""


def kind_of(method: str, path: str) -> Kind | None:
    """How `method path` (the path without its query) is passed on; None: not at all."""
    if method == "POST":
        if path in MODEL_PATHS:
            return Kind.MODEL
        if path in LOCAL_PATHS or _slot_path(path):
            return Kind.LOCAL
    elif method == "GET" and path in READ_PATHS:
        return Kind.READ
    return None


def _slot_path(path: str) -> bool:
    """`/slots/ID`, ID a slot number (llama-server's `/slots/:id_slot`)."""
    slot = path[len(LOCAL_PREFIX) :]
    return (
        path.startswith(LOCAL_PREFIX) and 0 < len(slot) <= 6 and slot.isascii() and slot.isdigit()
    )


def tunnelled(method: str, path: str) -> bool:
    """Whether a member's node may send `method path` (a query allowed) through the tunnel:
    model endpoints and reads, and `GET /health` (how a node probes a stalled server)."""
    bare = path.partition("?")[0]
    kind = kind_of(method, bare)
    return kind is Kind.MODEL or kind is Kind.READ or (method == "GET" and bare == "/health")


def query_model(query: bytes) -> str | None:
    """The `model` a query string names (`?model=NAME`), if any."""
    if b"model=" not in query:
        return None
    values = parse_qs(query.decode("latin-1"), max_num_fields=32).get("model")
    return values[0] if values else None


DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"proxy-connection",
        b"proxy-authorization",
        b"cookie",
        b"origin",
        b"referer",
        b"sec-fetch-site",
        b"sec-fetch-mode",
        b"sec-fetch-dest",
        b"sec-fetch-user",
    }
)
"""Request headers that stay at the node: hop-by-hop ones (the upstream client sets its
own), and what a browser says about the page behind a request (the node judged it
already, and llama-server's own origin rules would judge it a second time)."""


CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
"""A client's keys: they go to this node's own servers only, never to another member's
node (a member is trusted with the mesh, not with its users' keys)."""


def without_credentials(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k not in CREDENTIALS]


def request_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers that go on to llama-server: `Authorization`, `x-api-key`,
    `Content-Type`, `Accept`, `anthropic-version` and the rest, in their order."""
    return [(k, v) for k, v in headers if k not in DROPPED_REQUEST_HEADERS]
