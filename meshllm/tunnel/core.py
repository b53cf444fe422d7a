"""The Tunnel's decisions, without I/O: peer addresses, what the host serves, reply framing.

A request for a remote model goes Proxy -> (unix socket, `hop.TunnelRequest`
frame) -> Tunnel -> QUIC stream -> the host's Tunnel -> its llama-server.
The host answers down the stream in HTTP/1.1 framed so that the Proxy can
tell where the response ends (Content-Length, or chunked), and the end of
the stream follows the end of the response; a response that breaks off
resets the stream instead. The requesting Tunnel copies those bytes to the
Proxy unchanged, so its unix connection carries the next request afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from meshllm.mesh.wire import PeerAnnouncement
from meshllm.runtime.messages import LocalServerState

Address = tuple[str, int]

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


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
    """(llama-server port, "") if this node serves `model` and it is ready, else (0, why).
    A paused node takes no new request (its requests in flight end; the Proxy that sent
    this one fails over to another replica)."""
    if state.paused:
        return 0, f"this node is paused: it takes no new request for {model!r}"
    extra = next((x for x in state.ready_extras() if x.model == model), None)
    if extra is not None:
        return extra.port, ""
    if not state.model:
        return 0, f"this node serves no model (asked for {model!r})"
    if state.model != model:
        return 0, f"this node serves {state.model!r}, not {model!r}"
    if state.split is not None and state.split.part != "host":
        return 0, f"this node is a {state.split.part} of {model!r}'s split, not its host"
    if state.state != "ready" or not state.port:
        return 0, f"model {model!r} is {state.state} on this node"
    return state.port, ""


def rpc_port(state: LocalServerState, peer: str) -> tuple[int, str]:
    """(RPC server port, "") if this node is a ready split worker of host `peer`, else
    (0, why): only the host a worker serves reaches its RPC server."""
    split = state.split
    if split is None or split.part != "worker":
        return 0, "this node is no split worker"
    if split.host != peer:
        return 0, f"this node is a split worker of {split.host}, not of {peer}"
    if state.state != "ready" or not state.port:
        return 0, f"this node's RPC server is {state.state}"
    return state.port, ""


def response_head(status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> bytes:
    """An HTTP/1.1 response head; `length` None: the body follows chunked (see `chunk`).

    `headers` are end-to-end ones only (no framing or connection headers).
    """
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()
    parts = [line]
    for key, value in headers:
        parts += [key, b": ", value, b"\r\n"]
    if length is None:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    else:
        parts.append(b"content-length: %d\r\n\r\n" % length)
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (`LAST_CHUNK` ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class PeerQuota:
    """What each peer may hold on this host at once: streams, and body bytes being read.

    A member's Tunnel may open as many QUIC streams as it likes, and each holds
    a task here, a buffered body and, once forwarded, a llama-server connection
    (one of its HTTP threads). Counted per peer, one hostile member runs into
    its own cap while every other peer's requests go on as before.
    """

    def __init__(self, streams: int, body_bytes: int) -> None:
        self.max_streams = streams
        self.max_body_bytes = body_bytes
        self.streams: dict[str, int] = {}
        self.body_bytes: dict[str, int] = {}

    def open(self, peer: str) -> bool:
        """Count a new stream of `peer`; False (nothing counted) when at its cap."""
        held = self.streams.get(peer, 0)
        if held >= self.max_streams:
            return False
        self.streams[peer] = held + 1
        return True

    def close(self, peer: str) -> None:
        """A stream `open` counted has ended."""
        held = self.streams.get(peer, 0) - 1
        if held > 0:
            self.streams[peer] = held
        else:
            self.streams.pop(peer, None)

    def reserve(self, peer: str, size: int) -> bool:
        """Count `size` body bytes `peer` is about to send; False (nothing counted) when
        they would take it over its cap."""
        held = self.body_bytes.get(peer, 0)
        if size and held + size > self.max_body_bytes:
            return False
        if size:
            self.body_bytes[peer] = held + size
        return True

    def free(self, peer: str, size: int) -> None:
        """Body bytes `reserve` counted are no longer held."""
        held = self.body_bytes.get(peer, 0) - size
        if held > 0:
            self.body_bytes[peer] = held
        else:
            self.body_bytes.pop(peer, None)
