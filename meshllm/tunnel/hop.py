"""The request frame of the Proxy -> Tunnel hop, and the Proxy's end of that hop.

The Proxy sends a request for a remote model to the Tunnel's unix socket as
one `TunnelRequest` frame (a 4-byte big-endian length, then msgpack) followed
by `body_length` body bytes; the Tunnel answers in plain HTTP/1.1, which the
Proxy reads with the same client and parser as a local llama-server's answer.
Connections stay open across requests, one request at a time, like
keep-alive HTTP. The requesting Tunnel passes the frame on unchanged down
the QUIC stream, so the host's Tunnel reads the very same frame, and
checks it (`decode_request`) against the same rules: only what the Proxy
passes through the tunnel (`meshllm.http.endpoints.tunnelled`), within its
body limit and the header caps.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec

from meshllm.http.endpoints import DROPPED_REQUEST_HEADERS, tunnelled
from meshllm.http.upstream import Pool, Response
from meshllm.runtime.messages import RouteTarget

LENGTH_BYTES = 4
MAX_FRAME_BYTES = 64 * 1024
"""Largest frame (without the body): a request head is small."""
MAX_BODY_BYTES = 16 * 1024 * 1024
"""The Proxy's default body limit (`--max-body-mb`). A Tunnel applies its own
node's limit (the actor passes it); this is what applies when none is given."""
MAX_HEADERS = 64
"""Headers in one frame: the client's end-to-end ones (`endpoints.request_headers`)."""
MAX_HEADER_BYTES = 16 * 1024
"""Names and values of a frame's headers together."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TEXT = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_PATH = re.compile(r"/[^\x00-\x20\x7f]*")


class FrameError(ValueError):
    """A frame that cannot be forwarded, answered with `status` (and error `code`)."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def body_too_large(limit: int) -> str:
    """The Proxy's words for a body over its limit."""
    return f"request body exceeds the limit of {limit} bytes"


class TunnelRequest(msgspec.Struct, frozen=True):
    """A request for `model` on node `node`; its body follows the frame.

    New fields get defaults: Tunnels of different versions read each other's frames.
    """

    node: str
    """The node whose llama-server answers (the target)."""
    model: str
    """The model that node serves: checked there against what it really serves."""
    method: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """End-to-end request headers (names lower-case), passed to llama-server."""
    body_length: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TunnelRequest)


def encode_request(request: TunnelRequest) -> bytes:
    """The frame: length, then msgpack."""
    payload = _encoder.encode(request)
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"request frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


def frame_length(prefix: bytes | bytearray) -> int:
    """The payload size a frame's first `LENGTH_BYTES` announce; `FrameError` if too big."""
    size = int.from_bytes(prefix[:LENGTH_BYTES], "big")
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"request frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    return size


def decode_request(payload: bytes, max_body: int = MAX_BODY_BYTES) -> TunnelRequest:
    """A frame's payload, checked: whatever passes here is safe to forward to llama-server.

    It must be well formed (safe to write as an HTTP head), within the header
    caps, one of the requests the Proxy sends through the tunnel (`tunnelled`), with
    a body of at most `max_body` bytes (its node's Proxy limit).
    """
    try:
        request = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise FrameError(f"malformed request frame: {str(exc)[:200]}") from None
    except RecursionError:
        # msgspec skips an unknown field's value recursively: a peer can nest one
        # deeper than the stack goes.
        raise FrameError("malformed request frame: nested too deep") from None
    if not request.node or not request.model:
        raise FrameError("the request frame names no target node or model")
    if not _TOKEN.fullmatch(request.method.encode()):
        raise FrameError(f"bad method {request.method[:40]!r}")
    if not _PATH.fullmatch(request.path):
        raise FrameError(f"bad path {request.path[:200]!r}")
    if len(request.headers) > MAX_HEADERS:
        raise FrameError(
            f"{len(request.headers)} headers; at most {MAX_HEADERS}", 431, "headers_too_large"
        )
    size = 0
    for name, value in request.headers:
        if not _TOKEN.fullmatch(name) or not _TEXT.fullmatch(value):
            raise FrameError(f"bad header {name[:100]!r}")
        size += len(name) + len(value)
    if size > MAX_HEADER_BYTES:
        raise FrameError(
            f"headers of {size} bytes; at most {MAX_HEADER_BYTES}", 431, "headers_too_large"
        )
    if not tunnelled(request.method, request.path):
        raise FrameError(
            f"{request.method} {request.path[:200]!r} is not forwarded: the tunnel carries "
            "llama-server's model endpoints and its reads, nothing that changes a server",
            403,
            "not_forwarded",
        )
    if request.body_length < 0:
        raise FrameError(f"bad body length {request.body_length}")
    if request.body_length > max_body:
        raise FrameError(body_too_large(max_body), 413, "body_too_large")
    return request


def upstream_headers(request: TunnelRequest) -> list[tuple[bytes, bytes]]:
    """The frame's headers that go on to llama-server."""
    return [(k, v) for k, v in request.headers if k.lower() not in DROPPED_REQUEST_HEADERS]


# -- the Proxy's end ----------------------------------------------------------------------


class TunnelRoute:
    """Requests for one (node, model), sent as frames over the Tunnel's shared `Pool`."""

    def __init__(self, pool: Pool, node: str, model: str) -> None:
        self.pool = pool
        self.node = node
        self.model = model
        self.where = f"node {node} through the tunnel"

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        frame = encode_request(
            TunnelRequest(self.node, self.model, method, path, tuple(headers or ()), len(body))
        )
        return await self.pool.exchange(frame + body)


def remote_via_tunnel(unix_path: str) -> Callable[[RouteTarget], TunnelRoute]:
    """The Proxy's `remote` hook: every remote target goes to the Tunnel's unix socket."""
    pool = Pool("meshllm-tunnel", 0, max_idle=64, unix_path=unix_path)
    routes: dict[tuple[str, str], TunnelRoute] = {}

    def remote(target: RouteTarget) -> TunnelRoute:
        key = (target.node_id, target.model)
        route = routes.get(key)
        if route is None:
            if len(routes) > 1024:
                routes.clear()  # targets come and go; the pool is what is shared
            route = routes[key] = TunnelRoute(pool, target.node_id, target.model)
        return route

    return remote
