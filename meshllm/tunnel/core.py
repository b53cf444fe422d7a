"""The Tunnel's decisions, without I/O: request heads, peer addresses, error replies.

A request for a remote model goes Proxy -> (unix socket) -> Tunnel -> QUIC
stream -> the host's Tunnel -> its llama-server, and the response comes back
the same way as raw HTTP/1.1 bytes. The Proxy names the target in two headers
(`x-meshllm-node`, `x-meshllm-model`); the Tunnel strips them, asks for
`connection: close` (one request per stream, so the end of the response is the
end of the stream) and forwards everything else untouched. The actor glue and
the byte pumps are in `actors/tunnel.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from meshllm.http.upstream import Pool
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.runtime.messages import LocalServerState, RouteTarget

NODE_HEADER = b"x-meshllm-node"
MODEL_HEADER = b"x-meshllm-model"
MAX_HEAD_BYTES = 64 * 1024
RETRY_AFTER_S = 2

# Headers that belong to the Proxy -> Tunnel hop and must not reach llama-server.
_DROPPED = frozenset({NODE_HEADER, MODEL_HEADER, b"connection", b"keep-alive", b"proxy-connection"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REASONS = {
    400: "Bad Request",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_json = msgspec.json.Encoder()

Address = tuple[str, int]
RemoteHook = Callable[[RouteTarget], tuple[Pool, list[tuple[bytes, bytes]]]]


class BadRequest(ValueError):
    """The Proxy's request head cannot be forwarded (answered with a 400)."""


@dataclass(frozen=True)
class TunnelRequest:
    """A parsed request from the Proxy, ready to go down a tunnel stream."""

    node_id: str
    """The node whose llama-server must answer (`x-meshllm-node`)."""
    model: str
    """The model that node serves (`x-meshllm-model`), sent in `TunnelOpen`."""
    head: bytes
    """The request head to forward: tunnel headers removed, `connection: close` set."""
    content_length: int
    """Body bytes that follow the head."""


def parse_request_head(head: bytes) -> TunnelRequest:
    """Parse a request head (request line + headers, ending in an empty line).

    Strict on purpose: only the Proxy talks to this socket, so anything odd is a
    bug to report (400), not something to guess around. Bodies must be sized by
    Content-Length (the Proxy always sends one).
    """
    if not head.endswith(b"\r\n\r\n"):
        raise BadRequest("the request head does not end with an empty line")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith(b"/"):
        raise BadRequest(f"bad request line {lines[0][:200]!r}")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(f"unsupported HTTP version {parts[2][:20]!r}")
    kept = [lines[0]]
    found: dict[bytes, bytes] = {}
    length: bytes | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(f"bad header line {line[:200]!r}")
        key = name.lower()
        value = value.strip(b" \t")
        if key == b"transfer-encoding":
            raise BadRequest("request bodies must have a Content-Length")
        if key == b"content-length":
            if not value.isdigit() or (length is not None and value != length):
                raise BadRequest(f"bad Content-Length {value[:40]!r}")
            length = value
        if key in (NODE_HEADER, MODEL_HEADER):
            if key in found:
                raise BadRequest(f"{key.decode()} appears twice")
            found[key] = value
        if key not in _DROPPED:
            kept.append(line)
    node_id = _header_text(found, NODE_HEADER)
    model = _header_text(found, MODEL_HEADER)
    kept.append(b"connection: close\r\n\r\n")
    return TunnelRequest(node_id, model, b"\r\n".join(kept), int(length or b"0"))


def _header_text(found: dict[bytes, bytes], key: bytes) -> str:
    value = found.get(key, b"")
    if not value:
        raise BadRequest(f"missing {key.decode()} header")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{key.decode()} is not UTF-8") from None


def error_response(status: int, message: str, code: str, retry_after: bool = False) -> bytes:
    """A complete raw HTTP/1.1 error response with an OpenAI-shaped JSON body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = _json.encode({"error": {"message": message, "type": kind, "param": None, "code": code}})
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after:
        head.append(f"retry-after: {RETRY_AFTER_S}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def host_of(address: str) -> str:
    """The host part of `host:port` (`[v6]:port` too); the whole string if no port."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return address.strip("[]")
    return host.strip("[]")


def tunnel_address(peer: PeerAnnouncement) -> Address | None:
    """Where `peer`'s Tunnel listens: its gossip host and its `tunnel_port`."""
    if not peer.addresses or not peer.tunnel_port:
        return None
    host = host_of(peer.addresses[0])
    return (host, peer.tunnel_port) if host else None


def tunnel_addresses(peers: tuple[PeerAnnouncement, ...]) -> dict[str, Address | None]:
    """node id -> tunnel address (None: the peer is live but gave no tunnel address)."""
    return {peer.node_id: tunnel_address(peer) for peer in peers}


def peers_to_drop(
    old: Mapping[str, Address | None], new: Mapping[str, Address | None]
) -> list[str]:
    """Peers whose tunnel state must go: gone from the mesh, or moved to another address."""
    return sorted(n for n, addr in old.items() if n not in new or new[n] != addr)


def serving_port(state: LocalServerState, model: str) -> tuple[int, str]:
    """(llama-server port, "") if this node serves `model` and it is ready, else (0, why)."""
    if not state.model:
        return 0, f"this node serves no model (asked for {model!r})"
    if state.model != model:
        return 0, f"this node serves {state.model!r}, not {model!r}"
    if state.state != "ready" or not state.port:
        return 0, f"model {model!r} is {state.state} on this node"
    return state.port, ""


def remote_via_tunnel(unix_path: str) -> RemoteHook:
    """The Proxy's `remote` hook: every remote target goes to the Tunnel's unix socket."""
    pool = Pool("meshllm-tunnel", 0, unix_path=unix_path)

    def remote(target: RouteTarget) -> tuple[Pool, list[tuple[bytes, bytes]]]:
        headers = [(NODE_HEADER, target.node_id.encode()), (MODEL_HEADER, target.model.encode())]
        return pool, headers

    return remote


# -- the host's side: keep-alive connections to llama-server -----------------------------------

_CLOSE_TAIL = b"\r\nconnection: close\r\n\r\n"
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive"})


@dataclass(frozen=True)
class PooledRequest:
    """A tunnelled request that may go down a kept-alive llama-server connection."""

    head: bytes
    """The head without the `connection: close` the requesting Tunnel added."""
    method: bytes
    content_length: int


def pooled_request(head: bytes) -> PooledRequest | None:
    """The request as `parse_request_head` built it, made keep-alive; None if it is not one.

    Only an HTTP/1.1 head ending in our own `connection: close`, with its body
    sized by Content-Length (or none), qualifies; anything else goes to
    llama-server as it came, on a connection of its own.
    """
    if not head.endswith(_CLOSE_TAIL):
        return None
    lines = head[: -len(_CLOSE_TAIL)].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            value = value.strip()
            if not value.isdigit():
                return None
            length = int(value)
        elif key in _HOP_BY_HOP or key == b"transfer-encoding":
            return None
    return PooledRequest(head[: -len(_CLOSE_TAIL)] + b"\r\n\r\n", parts[0], length)


@dataclass(frozen=True)
class ResponseHead:
    """llama-server's response head, and how to find the end of its body."""

    head: bytes
    """The head to send back: hop-by-hop headers dropped, `Connection: close` set,
    as it came when the request asked for `connection: close`."""
    interim: bool
    """A 1xx response: the real head follows."""
    length: int | None
    """Body bytes (0 for HEAD, 204, 304); None: chunked, or until the server closes."""
    chunked: bool
    reusable: bool
    """The connection can carry another request once the body has been read."""


def parse_response_head(head: bytes, method: bytes) -> ResponseHead:
    """Parse a response head (status line + headers + empty line); ValueError if broken."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:200]!r}")
    status = int(parts[1])
    reusable = parts[0] == b"HTTP/1.1"
    kept = [lines[0]]
    length: int | None = None
    chunked = False
    coded = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"bad header line {line[:200]!r}")
        key = name.strip().lower()
        if key == b"connection":
            if b"close" in value.lower():
                reusable = False
            continue
        if key == b"keep-alive":
            continue
        if key == b"transfer-encoding":
            coded = True
            chunked = value.strip().lower().endswith(b"chunked")
        elif key == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length is not None and int(value) != length):
                raise ValueError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        kept.append(line)
    interim = 100 <= status < 200 and status != 101
    if interim:
        return ResponseHead(head, True, 0, False, reusable)
    kept.append(b"Connection: close\r\n\r\n")
    if method == b"HEAD" or status in (204, 304):
        length, chunked = 0, False
    elif coded:
        length = None
        reusable = reusable and chunked
    elif length is None or status == 101:
        length, reusable = None, False  # the body ends when the server closes
    return ResponseHead(b"\r\n".join(kept), interim, length, chunked, reusable)
