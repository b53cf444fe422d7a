"""The host's side of the Tunnel: tunnelled requests to this node's llama-server.

Each admitted stream starts with a `wire.TunnelOpen` frame naming the model,
then the `hop.TunnelRequest` frame the requesting Proxy wrote, then the body.
The request goes to llama-server through the same upstream client the Proxy
uses (`meshllm.http.upstream.Pool`: kept-alive connections, the one response
parser), and the response comes back down the stream as HTTP/1.1 that ends
where the stream ends (see `meshllm.tunnel.core`). A peer that resets the
stream or stops reading cancels the request, and closing the llama-server
connection stops the generation there.

A member is trusted with the mesh, not with this node's llama-server: a
stream carries one request of the kinds the Proxy sends through the tunnel
(`meshllm.http.endpoints.tunnelled`: none that changes a server), with the
node's body limit and the frame's header caps, its head in time and its body
making progress; each peer holds at most `MAX_STREAMS_PER_PEER` streams and
`BODY_BYTES_PER_PEER` body bytes at once. What breaks a rule is answered with
the OpenAI-shaped error and ends the stream, and a member that sends data on a
link's control stream, which nothing reads, loses the link (`guard_control`).

A stream that starts with `wire.RpcOpen` instead carries a split host's RPC
connection to this node's RPC server (`meshllm.tunnel.rpc`), when this node
is a ready worker of that very host (`core.rpc_port`); otherwise it is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from meshllm.http.backends import pick
from meshllm.http.errors import error_response
from meshllm.http.upstream import HOP_BY_HOP, Pool, Response, UpstreamError, UpstreamRefused
from meshllm.mesh import wire
from meshllm.mesh.quic import Link, drained, release_stream, stop_waiter, write_last
from meshllm.runtime import messages as m
from meshllm.runtime.logs import Throttle
from meshllm.tunnel.core import (
    LAST_CHUNK,
    PeerQuota,
    chunk,
    response_head,
    rpc_port,
    serving_port,
)
from meshllm.tunnel.hop import (
    LENGTH_BYTES,
    MAX_BODY_BYTES,
    FrameError,
    TunnelRequest,
    decode_request,
    frame_length,
    upstream_headers,
)
from meshllm.tunnel.rpc import serve_rpc_stream

log = logging.getLogger("meshllm.tunnel")

HEAD_TIMEOUT_S = 10.0
"""How long a peer may take to send a stream's frames (the head), from the stream's start."""
BODY_STALL_S = 10.0
"""How long a request body may go without a byte arriving (and its end, once whole).
A deadline on progress, not on the whole body: a large body on a slow link is fine."""
MAX_STREAMS_PER_PEER = 64
"""Requests one peer may have in progress here at once. A llama-server answers a
few at a time (its slots) and queues the rest, so an honest peer's queue fits
well within this (the benchmark runs 32 concurrent requests), while a hostile
member pins at most this many tasks and llama-server connections. Streams over
it are answered 429 at once, unread."""
BODY_BYTES_PER_PEER = 64 * 1024 * 1024
"""Request body bytes one peer may have buffered here at once (at least one whole
body of the node's limit): streams times the body limit would be gigabytes."""
OPEN_FRAME_BYTES = 4096
"""The `TunnelOpen` frame names a model: small."""
READ_BYTES = 256 * 1024
LOOPBACK = "127.0.0.1"
POOL_MAX_IDLE = 4
"""Idle kept-alive llama-server connections (each pins one of its HTTP threads)."""


OWNER_ACK_S = 2.0
"""How long the answer to an owner command may take to reach the peer before it is acted on."""
OwnerHandler = Callable[
    [str, wire.OwnerOrder], Awaitable[tuple[wire.OwnerAnswer, Callable[[], Awaitable[Any]] | None]]
]


class RequestTimeout(Exception):
    """The peer did not send its request in time (answered with a 408)."""


class TunnelServer:
    """Splices admitted tunnel streams to the local llama-server.

    A stream carries exactly what the Proxy itself would forward (see
    `meshllm.tunnel.hop.decode_request`), one request per stream, sent in time;
    each peer holds at most `max_streams_per_peer` streams at once. Whatever
    breaks one of those rules is answered with an OpenAI-shaped error (or, when
    the stream never said what it was, reset), and nothing of it reaches
    llama-server.
    """

    def __init__(
        self,
        local: m.LocalServerState | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        body_stall_s: float = BODY_STALL_S,
    ) -> None:
        self.local = local or m.LocalServerState()
        """This node's llama-server, as ServerSupervisor last published it."""
        self.max_body_bytes = max_body_bytes
        """This node's Proxy limit: a tunnelled body gets no more than a local one."""
        self.head_timeout_s = head_timeout_s
        self.body_stall_s = body_stall_s
        self.quota = PeerQuota(max_streams_per_peer, max(BODY_BYTES_PER_PEER, max_body_bytes))
        self.capped: set[str] = set()
        """Peers at their stream cap now (each logged once per episode)."""
        self.dropped = 0
        self.drop_warnings = Throttle()
        """One line per peer per interval about streams that were not tunnel requests."""
        """Streams dropped because their first frame was not a valid `TunnelOpen`."""
        self.rpc_streams = 0
        """Split RPC connections relayed to this node's RPC server."""
        self.refused = 0
        """Streams answered with an error because they broke a rule or a cap."""
        self.pool: Pool | None = None
        """Kept-alive connections to the llama-server on `self.pool.port`."""
        self.backends = m.BackendsState()
        """This node's external backends (`--backend-url`): they serve what it announces."""
        self.backend_pools: dict[str, Pool] = {}
        """Kept-alive connections to each backend (a fixed few, by URL)."""
        self.turns = itertools.count()
        self.on_owner_order: OwnerHandler | None = None
        """Decides on an owner command from a peer: the answer, and what to do once it
        is delivered (the Tunnel actor's, with `meshllm.mesh.owner.OwnerGate`)."""
        self.local_in_flight = 0
        """Requests the local llama-server is answering through this tunnel now (a paused
        node stops its server once they ended: `meshllm ctl pause`)."""

    def _pool(self, port: int) -> Pool:
        pool = self.pool
        if pool is None or pool.port != port:
            if pool is not None:
                pool.close()
            pool = self.pool = Pool(LOOPBACK, port, max_idle=POOL_MAX_IDLE)
        return pool

    def _backend_pool(self, backend: m.BackendStatus) -> Pool:
        pool = self.backend_pools.get(backend.url)
        if pool is None:
            pool = Pool(backend.host, backend.port, max_idle=POOL_MAX_IDLE)
            self.backend_pools[backend.url] = pool
        return pool

    async def handle_stream(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A `MeshEndpoint` stream handler: one tunnelled request, within the peer's cap."""
        peer = link.peer_id
        if not self.quota.open(peer):
            self.refused += 1
            if peer not in self.capped:
                self.capped.add(peer)
                log.warning(
                    "node %s holds %d tunnel streams, its cap: refusing more",
                    peer,
                    self.quota.max_streams,
                )
            msg = (
                f"too many concurrent requests from node {peer} (at most {self.quota.max_streams})"
            )
            _answer(reader, writer, error_response(429, msg, "too_many_streams", True))
            return
        try:
            await self._serve(link, reader, writer)
        finally:
            self.quota.close(peer)
            if self.quota.streams.get(peer, 0) < self.quota.max_streams // 2:
                self.capped.discard(peer)

    async def _serve(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        opening: wire.WireMessage | None = None
        reserved = 0
        try:
            try:
                async with asyncio.timeout(self.head_timeout_s):
                    opening = await wire.read_frame(reader, OPEN_FRAME_BYTES)
                    if isinstance(opening, (wire.RpcOpen, wire.OwnerOrder)):
                        pass  # served below, out of this deadline
                    elif not isinstance(opening, wire.TunnelOpen):
                        self._drop(
                            link, reader, writer, f"first frame was {type(opening).__name__}"
                        )
                        return
                    else:
                        prefix = await reader.readexactly(LENGTH_BYTES)
                        payload = await reader.readexactly(frame_length(prefix))
            except TimeoutError:
                if opening is None:
                    self._drop(link, reader, writer, "no first frame in time")
                    return
                raise RequestTimeout(
                    f"the request head did not arrive within {self.head_timeout_s:g}s"
                ) from None
            if isinstance(opening, wire.OwnerOrder):
                await self._owner_order(link, opening, reader, writer)
                return
            if isinstance(opening, wire.RpcOpen):
                port, why = rpc_port(self.local, link.peer_id)
                if not port:
                    self._drop(link, reader, writer, f"an RPC stream: {why}")
                    return
                self.rpc_streams += 1
                await serve_rpc_stream(reader, writer, port)
                return
            request = decode_request(payload, self.max_body_bytes)
            # Refused before its body is read: a wrong model is answered at once.
            port, why = serving_port(self.local, opening.model)
            backend = None if port else pick(self.backends, opening.model, next(self.turns))
            if not port and backend is None:
                _answer(reader, writer, error_response(503, why, "model_not_served", True))
                return
            if not self.quota.reserve(link.peer_id, request.body_length):
                self.refused += 1
                msg = f"too many request bytes in flight from node {link.peer_id}"
                _answer(reader, writer, error_response(429, msg, "too_many_streams", True))
                return
            reserved = request.body_length
            body = await self._body(reader, request.body_length)
            if backend is not None:
                await self._forward(self._backend_pool(backend), request, body, reader, writer)
                return
            self.local_in_flight += 1
            try:
                await self._forward(self._pool(port), request, body, reader, writer)
            finally:
                self.local_in_flight -= 1
        except (wire.WireError, asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if not isinstance(opening, wire.TunnelOpen):
                self._drop(link, reader, writer, repr(exc))
            elif not isinstance(exc, ConnectionResetError):  # reset: no one to answer
                self._refuse(link, reader, writer, 400, f"bad request in the tunnel stream: {exc}")
            else:
                release_stream(reader, writer, abort=True)
        except FrameError as exc:
            self._refuse(link, reader, writer, exc.status, str(exc), exc.code)
        except RequestTimeout as exc:
            self._refuse(link, reader, writer, 408, str(exc), "request_timeout")
        finally:
            self.quota.free(link.peer_id, reserved)

    async def _owner_order(
        self,
        link: Link,
        order: wire.OwnerOrder,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """A signed owner command (`meshllm.mesh.owner`): decided by `on_owner_order`,
        answered, and acted on once the answer has reached the peer (or after
        `OWNER_ACK_S`): a stop must not close the link before the answer is out."""
        if self.on_owner_order is None:
            self._drop(link, reader, writer, "an owner command, and this node takes none")
            return
        answer, act = await self.on_owner_order(link.peer_id, order)
        try:
            write_last(writer, wire.encode_frame(answer))
            async with asyncio.timeout(OWNER_ACK_S):
                await drained(writer, 0)
        except (TimeoutError, ConnectionError, RuntimeError, ValueError) as exc:
            log.debug("the answer to an owner command from %s: %r", link.peer_id, exc)
        finally:
            release_stream(reader, writer)
        if act is not None:
            await act()

    async def _body(self, reader: asyncio.StreamReader, length: int) -> bytes:
        """The request body, then the stream's end: one request per stream.

        Each read must make progress within `body_stall_s`."""
        parts: list[bytes] = []
        left = length
        while left > 0:
            try:
                async with asyncio.timeout(self.body_stall_s):
                    piece = await reader.read(min(left, READ_BYTES))
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body stalled: no byte for {self.body_stall_s:g}s "
                    f"with {left} of {length} bytes to come"
                ) from None
            if not piece:
                raise asyncio.IncompleteReadError(b"".join(parts), length)
            parts.append(piece)
            left -= len(piece)
        try:
            async with asyncio.timeout(self.body_stall_s):
                more = await reader.read(1)
        except TimeoutError:
            raise RequestTimeout(
                f"the stream did not end within {self.body_stall_s:g}s of the request body"
            ) from None
        if more:
            raise FrameError("bytes after the request body: one request per stream")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _drop(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str
    ) -> None:
        """A stream that never said it was a tunnel request: closed, nothing said."""
        self.dropped += 1
        link.protocol.endpoint.counters.malformed_frames += 1
        # A member controls `why` and how often: one line per peer per interval, cut short.
        skipped = self.drop_warnings.allow(link.peer_id, time.monotonic())
        if skipped is not None:
            more = f" ({skipped} more not logged)" if skipped else ""
            log.warning("dropped a tunnel stream from %s: %s%s", link.peer_id, why[:200], more)
        _answer(reader, writer, b"")

    def _refuse(
        self,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        why: str,
        code: str = "bad_request",
    ) -> None:
        """A request that broke a rule: answered with an error, nothing forwarded.

        Logged at debug level only: the error goes back to the member's node, and a
        member sending bad requests by the thousand must not fill this node's log."""
        self.refused += 1
        log.debug("refused a tunnelled request from %s: %s", link.peer_id, why)
        _answer(reader, writer, error_response(status, why, code))

    async def _forward(
        self,
        pool: Pool,
        request: TunnelRequest,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """The request to llama-server, its response down the stream, then the stream's end."""
        task = asyncio.current_task()
        assert task is not None
        gave_up = stop_waiter(writer)

        def cancel(_: asyncio.Future[None]) -> None:
            task.cancel()

        gave_up.add_done_callback(cancel)
        resp: Response | None = None
        completed = False
        try:
            try:
                headers = upstream_headers(request)
                resp = await pool.request(request.method, request.path, body, headers)
            except UpstreamRefused as exc:
                # Nothing listens: the server is down (restarting); another may answer.
                msg = f"the server of {request.model!r} on this node is down: {exc}"
                last = error_response(503, msg, "model_not_ready", retry_after=True)
            except UpstreamError as exc:
                msg = f"cannot reach the server of {request.model!r}: {exc}"
                last = error_response(502, msg, "upstream_error")
            else:
                last = await _relay(resp, writer)
            write_last(writer, last)
            completed = True
        except asyncio.CancelledError:
            if not gave_up.done() or task.uncancel() > 0:
                raise
        except (UpstreamError, RuntimeError, ValueError) as exc:
            # RuntimeError/ValueError: a write after the peer's STOP_SENDING.
            log.debug("tunnelled request broke off: %r", exc)
        finally:
            gave_up.remove_done_callback(cancel)
            gave_up.cancel()
            if resp is not None:
                resp.release()
            release_stream(reader, writer, abort=not completed)

    def close(self) -> None:
        """Close the kept-alive llama-server (and backend) connections."""
        if self.pool is not None:
            self.pool.close()
        for pool in self.backend_pools.values():
            pool.close()


async def _relay(resp: Response, writer: asyncio.StreamWriter) -> bytes:
    """Write the response down the stream but for its last bytes, which are returned.

    Each piece waits for the peer to take what came before (`drained`): a peer
    whose client reads slowly, or not at all, holds llama-server back instead
    of growing this process."""
    headers = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
    if resp.complete():
        data = await resp.body()
        return response_head(resp.status, headers, len(data)) + data
    if resp.length is not None:
        writer.write(response_head(resp.status, headers, resp.length))
        async for piece in resp.iter_body():
            writer.write(piece)
            await drained(writer)
        return b""
    writer.write(response_head(resp.status, headers, None))
    async for piece in resp.iter_body():
        writer.write(chunk(piece))
        await drained(writer)
    return LAST_CHUNK


def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
    """Answer a stream and end it; the rest of its request is refused (STOP_SENDING)."""
    with contextlib.suppress(Exception):
        write_last(writer, response)
    release_stream(reader, writer)


async def guard_control(link: Link) -> None:
    """Watch a Tunnel link's control stream (its first), which carries nothing after
    admission: whatever a peer sent there would stay buffered, unread, for the
    link's life. The first byte closes the link; its end, or the link's, ends the watch.
    """
    try:
        data = await link.reader.read(1)
    except ConnectionError:
        return
    if data:
        link.protocol.endpoint.counters.malformed_frames += 1
        log.warning("node %s sent data on the tunnel's control stream: link closed", link.peer_id)
        link.close("unexpected data on the control stream")
