"""Tunnel: carries HTTP requests for remote models over QUIC, streamed both ways.

Local side (`TunnelClient`): the Proxy sends a request for a remote model to a
unix socket; the Tunnel keeps one QUIC connection per peer, opens a stream per
request, writes a `TunnelOpen` frame and the request, and pipes the response
bytes back as they arrive. Remote side (`TunnelServer`): each admitted stream
is checked against the model this node serves and spliced to its llama-server.

Failure has to show up quickly and as an error, never as a hang (issue 3,
item 6): a peer leaving the mesh view or losing its connection aborts every
request to it, which cuts the Proxy's upstream connection mid-response (the
Proxy turns that into an SSE error event) or, before any byte came back,
answers 502 here. The other way round, a client that goes away makes the
remote Tunnel close its llama-server connection, so generation stops there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aioquic.asyncio.protocol import QuicStreamAdapter
from aioquic.quic.events import StopSendingReceived, StreamDataReceived, StreamReset

from meshllm.mesh import wire
from meshllm.mesh.identity import load_or_create_key
from meshllm.mesh.quic import AdmissionError, Link, MeshEndpoint, MeshProtocol
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.tunnel.core import (
    MAX_HEAD_BYTES,
    Address,
    BadRequest,
    PooledRequest,
    TunnelRequest,
    error_response,
    parse_request_head,
    parse_response_head,
    peers_to_drop,
    pooled_request,
    serving_port,
    tunnel_addresses,
)

log = logging.getLogger("meshllm.tunnel.core")

CHUNK = 65536
HEAD_TIMEOUT_S = 10.0
"""How long the Proxy (or a peer) may take to send a request head / TunnelOpen."""
DIAL_TIMEOUT_S = 5.0
UNKNOWN_PEER_WAIT_S = 1.0
"""A peer the Router already routes to may reach this actor's mesh view a moment later."""
KEEPALIVE_S = 5.0
"""Ping period on idle links: a long non-streaming generation sends nothing for
longer than QUIC's idle timeout, which would otherwise close the connection."""
CANCELLED = 0x1
"""QUIC application error code for a stream given up by either side."""
LOOPBACK = "127.0.0.1"
POOL_MAX = 4
"""Idle kept-alive llama-server connections the host's Tunnel keeps."""
POOL_IDLE_S = 2.0
"""How long one stays idle (llama-server drops them after 5 s, each pins one of its threads)."""
POOL_BODY_MAX = 64 * 1024
"""Request bodies up to this size are read whole and may go down a kept-alive connection."""

SuspectHandler = Callable[[str, str], Awaitable[None]]
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# -- QUIC streams: the resets and stop requests that plain aioquic leaves unseen ---------------


class TunnelProtocol(MeshProtocol):
    """A mesh connection whose streams also end when the peer resets or stops them.

    aioquic's asyncio layer ignores RESET_STREAM (a reader then waits forever)
    and STOP_SENDING; the tunnel needs both to pass a cancellation on. That
    layer also keeps a reader for every stream the connection ever carried:
    `release` forgets them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_waiters: dict[int, asyncio.Future[None]] = {}
        """Stream id -> set when the peer sends STOP_SENDING on it."""
        self.abandoned: set[int] = set()
        """Streams released before their end came in: what still arrives is dropped."""

    def quic_event_received(self, event: Any) -> None:
        if (
            isinstance(event, StreamDataReceived | StreamReset)
            and event.stream_id in self.abandoned
        ):
            # Without this, late data would look like a new stream from the peer.
            if isinstance(event, StreamReset) or event.end_stream:
                self.abandoned.discard(event.stream_id)
            return
        if isinstance(event, StreamReset):
            reader = self._stream_readers.get(event.stream_id)
            if reader is not None and reader.exception() is None:
                reader.set_exception(ConnectionResetError("tunnel stream reset by the peer"))
        if isinstance(event, StreamReset | StopSendingReceived):
            waiter = self.stop_waiters.get(event.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        super().quic_event_received(event)

    def release(self, stream_id: int, reader: asyncio.StreamReader, reset: bool) -> None:
        """Forget a stream we are done with; STOP_SENDING if its end has not come in yet.

        `reset`: also abort what we were still sending (RESET_STREAM; no effect
        once everything we sent was acknowledged).
        """
        send = reset
        stream = self._quic._streams.get(stream_id)
        if stream is not None and not stream.receiver.is_finished:
            with contextlib.suppress(Exception):
                self._quic.stop_stream(stream_id, CANCELLED)
            self.abandoned.add(stream_id)
            send = True
        if reset:
            with contextlib.suppress(Exception):
                self._quic.reset_stream(stream_id, CANCELLED)
        if self._stream_readers.get(stream_id) is reader:
            del self._stream_readers[stream_id]
        self.stop_waiters.pop(stream_id, None)
        pending = self._transmit_task
        if send or pending is not None:
            # Now, not on the next loop turn: the end of a response goes out at
            # once, and the transmit its writes scheduled is not run for nothing.
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                self.transmit()


class TunnelEndpoint(MeshEndpoint):
    """A `MeshEndpoint` whose connections are `TunnelProtocol`s."""

    def _protocol(self, quic: Any, **kwargs: Any) -> MeshProtocol:
        protocol = TunnelProtocol(quic, self)
        self.protocols.add(protocol)
        return protocol


def _stream_of(writer: asyncio.StreamWriter) -> tuple[TunnelProtocol | None, int]:
    transport = writer.transport
    if isinstance(transport, QuicStreamAdapter) and isinstance(transport.protocol, TunnelProtocol):
        return transport.protocol, transport.stream_id
    return None, -1


def stop_waiter(writer: asyncio.StreamWriter) -> asyncio.Future[None]:
    """A future set when the peer asks us to stop sending on this stream."""
    protocol, stream_id = _stream_of(writer)
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if protocol is not None:
        protocol.stop_waiters[stream_id] = waiter
    return waiter


def release_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, abort: bool = False
) -> None:
    """Done with a tunnel stream: forget it; `abort`: give it up both ways."""
    protocol, stream_id = _stream_of(writer)
    if protocol is None:
        return
    protocol.release(stream_id, reader, reset=abort)
    # Nothing more goes out: a later close (StreamWriter.__del__ too) would try
    # a FIN on a stream that may be reset or discarded by now, which raises.
    writer.transport._closing = True  # type: ignore[attr-defined]


# -- local side: requests from the Proxy ---------------------------------------------------


class _Exchange:
    """One request from the Proxy in flight to a peer."""

    __slots__ = ("aborted", "forwarded", "link", "node_id", "notify", "task")

    def __init__(self, node_id: str, task: asyncio.Task[Any]) -> None:
        self.node_id = node_id
        self.task = task
        self.link: Link | None = None
        self.aborted: str | None = None
        self.notify = True
        """Answer the Proxy with an error if nothing has been forwarded yet."""
        self.forwarded = 0
        """Response bytes passed to the Proxy."""

    def abort(self, reason: str, notify: bool = True) -> None:
        if self.aborted is None:
            self.aborted = reason
            self.notify = notify
            self.task.cancel()


class TunnelClient:
    """The local side: serves the Proxy's unix socket and dials peers' Tunnels."""

    def __init__(
        self,
        endpoint: MeshEndpoint,
        suspect: SuspectHandler | None = None,
        unknown_peer_wait_s: float = UNKNOWN_PEER_WAIT_S,
        dial_timeout_s: float = DIAL_TIMEOUT_S,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.endpoint = endpoint
        self.suspect = suspect
        self.unknown_peer_wait_s = unknown_peer_wait_s
        self.dial_timeout_s = dial_timeout_s
        self.keepalive_s = keepalive_s
        self.addresses: dict[str, Address | None] = {}
        self.links: dict[str, Link] = {}
        self.dialing: dict[str, asyncio.Future[Link]] = {}
        self.exchanges: dict[str, set[_Exchange]] = {}
        self.view_changed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Future[Any]] = set()

    # -- mesh view -------------------------------------------------------------

    def set_view(self, view: m.MeshView) -> None:
        """Take the Gossiper's latest view; requests to peers that left are aborted."""
        new = tunnel_addresses(view.peers)
        for node_id in peers_to_drop(self.addresses, new):
            self.drop_peer(node_id, "left the mesh" if node_id not in new else "moved")
        self.addresses = new
        self.view_changed.set()
        self.view_changed = asyncio.Event()

    def drop_peer(self, node_id: str, reason: str) -> None:
        """Abort every request to `node_id` and close its connection."""
        for ex in list(self.exchanges.get(node_id, ())):
            ex.abort(f"node {node_id} {reason}")
        dialing = self.dialing.pop(node_id, None)
        if dialing is not None:
            dialing.cancel()
        link = self.links.pop(node_id, None)
        if link is not None:
            link.close(reason)

    async def _address(self, node_id: str) -> Address | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unknown_peer_wait_s
        while (addr := self.addresses.get(node_id)) is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.view_changed.wait(), left)
        return addr

    # -- links -----------------------------------------------------------------

    async def _link(self, node_id: str, addr: Address) -> Link:
        link = self.links.get(node_id)
        if link is not None and not link.closed.is_set():
            return link
        dialing = self.dialing.get(node_id)
        if dialing is None:
            dialing = asyncio.ensure_future(self._dial(node_id, addr))
            self.dialing[node_id] = dialing
            dialing.add_done_callback(lambda f: self._dial_done(node_id, f))
        # Shielded: one request giving up must not cancel the dial others wait on.
        return await asyncio.shield(dialing)

    def _dial_done(self, node_id: str, dialing: asyncio.Future[Link]) -> None:
        if self.dialing.get(node_id) is dialing:
            del self.dialing[node_id]
        if not dialing.cancelled():
            dialing.exception()  # retrieved here; the waiters report it

    async def _dial(self, node_id: str, addr: Address) -> Link:
        link = await self.endpoint.dial(addr[0], addr[1], timeout=self.dial_timeout_s)
        if link.peer_id != node_id:
            # The address now belongs to another node (a restart reused the port).
            link.close("wrong node")
            raise AdmissionError(f"{addr[0]}:{addr[1]} is node {link.peer_id}, not {node_id}")
        self.links[node_id] = link
        self._spawn(self._keep(node_id, link))
        return link

    async def _keep(self, node_id: str, link: Link) -> None:
        """Ping an idle link now and then; when it closes, abort what still uses it."""
        protocol = link.protocol
        while not link.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.closed.wait(), self.keepalive_s)
                break
            try:
                await asyncio.wait_for(protocol.ping(), self.keepalive_s)
            except TimeoutError:
                self._suspect(node_id, "tunnel keepalive ping timed out")
            except ConnectionError:
                break
        if self.links.get(node_id) is link:
            del self.links[node_id]
        lost = [ex for ex in self.exchanges.get(node_id, ()) if ex.link is link]
        for ex in lost:
            ex.abort(f"lost the connection to node {node_id}")
        if lost:
            self._suspect(node_id, "tunnel connection lost mid-request")

    # -- serving the Proxy -----------------------------------------------------

    async def serve(self, path: str) -> asyncio.Server:
        """Listen on the unix socket `path` (a stale file is replaced; owner-only)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.server = await asyncio.start_unix_server(
            self.handle, sock=sock, limit=MAX_HEAD_BYTES, backlog=1024
        )
        return self.server

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection from the Proxy: one request, then close."""
        task = asyncio.current_task()
        assert task is not None
        ex: _Exchange | None = None
        try:
            request = await _read_request(reader, writer)
            if request is None:
                return
            ex = _Exchange(request.node_id, task)
            self.exchanges.setdefault(ex.node_id, set()).add(ex)
            await self._forward(ex, request, reader, writer)
        except asyncio.CancelledError:
            if ex is None or ex.aborted is None or task.uncancel() > 0:
                raise
            # A client going away is routine (and races a response's last bytes).
            level = logging.WARNING if ex.notify else logging.DEBUG
            log.log(level, "request to %s aborted: %s", ex.node_id, ex.aborted)
            if ex.notify and ex.forwarded == 0:
                writer.write(error_response(502, ex.aborted, "peer_lost"))
        except ConnectionError:
            pass  # the Proxy went away
        finally:
            if ex is not None:
                peers = self.exchanges.get(ex.node_id)
                if peers is not None:
                    peers.discard(ex)
                    if not peers:
                        del self.exchanges[ex.node_id]
            with contextlib.suppress(Exception):
                writer.close()

    async def _forward(
        self,
        ex: _Exchange,
        request: TunnelRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        node_id = request.node_id
        addr = await self._address(node_id)
        if addr is None:
            if node_id in self.addresses:
                msg, code = f"node {node_id} has no tunnel address", "peer_unreachable"
            else:
                msg, code = f"node {node_id} is not in the mesh", "peer_unknown"
            writer.write(error_response(502, msg, code))
            return
        try:
            link = await self._link(node_id, addr)
            qreader, qwriter = await link.open_stream()
        except (OSError, TimeoutError, EOFError, wire.WireError) as exc:
            # OSError covers ConnectionError and so AdmissionError.
            self._suspect(node_id, f"tunnel dial failed: {exc}")
            writer.write(
                error_response(503, f"cannot reach node {node_id}: {exc}", "peer_unreachable", True)
            )
            return
        ex.link = link
        finished = False
        try:
            opening = wire.encode_frame(wire.TunnelOpen(request.model)) + request.head
            if not await _send_request(opening, request.content_length, reader, qwriter):
                return  # the Proxy went away mid-body
            watch = asyncio.ensure_future(_watch_proxy(reader, ex))
            try:
                while chunk := await qreader.read(CHUNK):
                    writer.write(chunk)
                    ex.forwarded += len(chunk)
                    await writer.drain()
            finally:
                watch.cancel()
            finished = True
            if link.closed.is_set():
                self._suspect(node_id, "tunnel connection lost mid-response")
            elif ex.forwarded == 0:
                self._suspect(node_id, "tunnel stream ended without a response")
            if ex.forwarded == 0:
                msg = f"node {node_id} closed the tunnel stream without a response"
                writer.write(error_response(502, msg, "peer_no_response"))
        finally:
            release_stream(qreader, qwriter, abort=not finished)

    # -- helpers ---------------------------------------------------------------

    def _suspect(self, node_id: str, reason: str) -> None:
        log.warning("node %s: %s", node_id, reason)
        if self.suspect is not None:
            self._spawn(self._tell_suspect(node_id, reason))

    async def _tell_suspect(self, node_id: str, reason: str) -> None:
        assert self.suspect is not None
        try:
            await asyncio.wait_for(self.suspect(node_id, reason), 1.0)
        except Exception as exc:
            log.debug("could not report %s as suspect: %r", node_id, exc)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for node_id in list(self.exchanges) + list(self.links) + list(self.dialing):
            self.drop_peer(node_id, "tunnel stopping")
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0)


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> TunnelRequest | None:
    """The Proxy's request head, or None after answering 400 (or on a silent close)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        return parse_request_head(head)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None  # connected and closed without a request
        why = "incomplete request head"
    except asyncio.LimitOverrunError:
        why = f"request head larger than {MAX_HEAD_BYTES} bytes"
    except TimeoutError:
        why = f"no request head within {HEAD_TIMEOUT_S:.0f}s"
    except BadRequest as exc:
        why = str(exc)
    writer.write(error_response(400, why, "bad_request"))
    return None


async def _send_request(
    opening: bytes, length: int, reader: asyncio.StreamReader, qwriter: asyncio.StreamWriter
) -> bool:
    """TunnelOpen, head and body down the stream, then its end; False if the Proxy left.

    The body is read whole from the Proxy even when the peer refuses it early
    (STOP_SENDING: it answers without reading, e.g. a 503), so that nothing
    unread is left between the Proxy and the response.
    """
    refused = False
    data = opening
    while True:
        if not refused:
            try:
                qwriter.write(data)
                if length == 0:
                    qwriter.write_eof()
            except (RuntimeError, ValueError):
                refused = True  # aioquic reset the stream on the peer's STOP_SENDING
        if length == 0:
            return True
        data = await reader.read(min(length, CHUNK))
        if not data:
            return False
        length -= len(data)


async def _watch_proxy(reader: asyncio.StreamReader, ex: _Exchange) -> None:
    """The Proxy sends nothing after the body; EOF means it gave up on the response."""
    with contextlib.suppress(ConnectionError):
        await reader.read(1)
    ex.abort("the client went away", notify=False)


# -- remote side: streams from peers -----------------------------------------------------------


class TunnelServer:
    """The remote side: splices admitted tunnel streams to the local llama-server.

    Small requests go down kept-alive llama-server connections (a few idle ones
    are kept for `POOL_IDLE_S`), the end of each response found from its head
    (Content-Length or chunked framing); anything else gets a connection of its
    own, closed by llama-server after the response (`connection: close`).
    """

    def __init__(self, local: m.LocalServerState | None = None) -> None:
        self.local = local or m.LocalServerState()
        """This node's llama-server, as ServerSupervisor last published it."""
        self.dropped = 0
        """Streams dropped because their first frame was not a valid `TunnelOpen`."""
        self.idle: list[tuple[int, _Conn, asyncio.TimerHandle]] = []
        """Kept-alive llama-server connections (port, connection, expiry), newest last."""

    async def handle_stream(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A `MeshEndpoint` stream handler: one tunnelled request."""
        opening: wire.WireMessage | None = None
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                opening = await wire.read_frame(reader)
                if isinstance(opening, wire.TunnelOpen):
                    head = await reader.readuntil(b"\r\n\r\n")
            why = f"first frame was {type(opening).__name__}"
        except (
            wire.WireError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionResetError,
            TimeoutError,
        ) as exc:
            if isinstance(opening, wire.TunnelOpen):
                msg = f"bad request head in the tunnel stream: {exc!r}"
                _answer(reader, writer, error_response(400, msg, "bad_request"))
                return
            opening, why = None, repr(exc)
        if not isinstance(opening, wire.TunnelOpen):
            self.dropped += 1
            link.protocol.endpoint.counters.malformed_frames += 1
            log.warning("dropped a tunnel stream from %s: %s", link.peer_id, why)
            _answer(reader, writer, b"")  # closed both ways, nothing said
            return
        port, why = serving_port(self.local, opening.model)
        if not port:
            _answer(reader, writer, error_response(503, why, "model_not_served", True))
            return
        request = pooled_request(head)
        if request is not None and request.content_length <= POOL_BODY_MAX:
            await self._pooled(port, request, reader, writer)
            return
        try:
            treader, twriter = await asyncio.open_connection(LOOPBACK, port)
        except OSError as exc:
            msg = f"cannot reach the llama-server for {opening.model!r}: {exc}"
            _answer(reader, writer, error_response(502, msg, "upstream_error"))
            return
        completed = False
        try:
            twriter.write(head)
            completed = await _splice(reader, writer, treader, twriter)
        finally:
            twriter.close()
            release_stream(reader, writer, abort=not completed)

    async def _pooled(
        self,
        port: int,
        request: PooledRequest,
        qreader: asyncio.StreamReader,
        qwriter: asyncio.StreamWriter,
    ) -> None:
        """Whole request (it is small) down a kept-alive connection, response back.

        A reset or STOP_SENDING from the requesting side cancels this at once and
        the llama-server connection is closed, which stops generation there. A
        kept-alive connection that turns out closed before any byte of the
        response is replaced by a fresh one (the request is in hand).
        """
        task = asyncio.current_task()
        assert task is not None
        gave_up = stop_waiter(qwriter)

        def cancel(_: asyncio.Future[None]) -> None:
            task.cancel()

        gave_up.add_done_callback(cancel)
        conn: _Conn | None = None
        completed = False
        try:
            body = b""
            if request.content_length:
                body = await qreader.readexactly(request.content_length)
            data = request.head + body
            conn = self._take(port)
            if conn is not None:
                conn[1].write(data)
                try:
                    reusable = await _relay(conn[0], qwriter, request.method, stale_ok=True)
                except _Stale:
                    conn[1].close()
                    conn = None
            if conn is None:
                try:
                    conn = await asyncio.open_connection(LOOPBACK, port)
                except OSError as exc:
                    msg = f"cannot reach the llama-server: {exc}"
                    qwriter.write(error_response(502, msg, "upstream_error"))
                    qwriter.write_eof()
                    completed = True
                    return  # the stream is released below
                conn[1].write(data)
                reusable = await _relay(conn[0], qwriter, request.method, stale_ok=False)
            completed = True
            if reusable:
                self._give(port, conn)
                conn = None
        except asyncio.CancelledError:
            if not gave_up.done() or task.uncancel() > 0:
                raise
        except (OSError, ValueError, EOFError, RuntimeError, asyncio.LimitOverrunError) as exc:
            log.debug("tunnelled request failed: %r", exc)
        finally:
            gave_up.remove_done_callback(cancel)
            gave_up.cancel()
            if conn is not None:
                conn[1].close()
            release_stream(qreader, qwriter, abort=not completed)

    def _take(self, port: int) -> _Conn | None:
        while self.idle:
            idle_port, conn, expiry = self.idle.pop()
            expiry.cancel()
            if idle_port == port and not conn[0].at_eof() and not conn[1].is_closing():
                return conn
            conn[1].close()
        return None

    def _give(self, port: int, conn: _Conn) -> None:
        expiry = asyncio.get_running_loop().call_later(POOL_IDLE_S, self._expire, conn)
        self.idle.append((port, conn, expiry))
        if len(self.idle) > POOL_MAX:
            self._expire(self.idle[0][1])

    def _expire(self, conn: _Conn) -> None:
        for i, (_, idle, expiry) in enumerate(self.idle):
            if idle is conn:
                del self.idle[i]
                expiry.cancel()
                break
        conn[1].close()

    def close(self) -> None:
        """Close the kept-alive llama-server connections."""
        while self.idle:
            _, conn, expiry = self.idle.pop()
            expiry.cancel()
            conn[1].close()


class _Stale(Exception):
    """A kept-alive connection was closed before it answered."""


async def _relay(
    treader: asyncio.StreamReader, qwriter: asyncio.StreamWriter, method: bytes, stale_ok: bool
) -> bool:
    """llama-server's response -> the stream, then its end; True if the connection is reusable."""
    while True:
        try:
            raw = await treader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if stale_ok and not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise _Stale() from None
            raise ConnectionError(
                "llama-server closed the connection in the response head"
            ) from exc
        stale_ok = False
        head = parse_response_head(raw, method)
        qwriter.write(head.head)
        if not head.interim:
            break
    if head.chunked:
        while True:
            line = await treader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (trailer := await treader.readuntil(b"\r\n")) != b"\r\n":
                    line += trailer
                qwriter.write(line + trailer)
                break
            qwriter.write(line + await treader.readexactly(size + 2))
    elif head.length is not None:
        left = head.length
        while left:
            chunk = await treader.read(min(left, CHUNK))
            if not chunk:
                raise ConnectionError("llama-server closed the connection mid-response")
            qwriter.write(chunk)
            left -= len(chunk)
    else:
        while chunk := await treader.read(CHUNK):
            qwriter.write(chunk)
    qwriter.write_eof()
    return head.reusable and not treader._buffer  # type: ignore[attr-defined]


def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
    """Answer a stream and end it; the rest of its request is refused (STOP_SENDING)."""
    with contextlib.suppress(Exception):
        writer.write(response)
        writer.write_eof()
    release_stream(reader, writer)


async def _splice(
    qreader: asyncio.StreamReader,
    qwriter: asyncio.StreamWriter,
    treader: asyncio.StreamReader,
    twriter: asyncio.StreamWriter,
) -> bool:
    """Request stream -> llama-server, response -> stream, until the response ends.

    The end of the request stream is not passed on as a TCP half-close:
    llama-server takes a readable EOF for a client that went away and cancels
    the generation. It closes the connection itself after the response
    (`connection: close`). A reset or STOP_SENDING from the requesting side
    ends it all early, and closing the TCP connection stops generation there.
    True when the whole response went out.
    """
    gave_up = stop_waiter(qwriter)
    upload = asyncio.ensure_future(_upload(qreader, twriter, gave_up))
    download = asyncio.ensure_future(_download(treader, qwriter))
    try:
        await asyncio.wait((download, gave_up), return_when=asyncio.FIRST_COMPLETED)
        return download.done() and download.exception() is None
    finally:
        for task in (upload, download, gave_up):
            task.cancel()


async def _upload(
    qreader: asyncio.StreamReader, twriter: asyncio.StreamWriter, gave_up: asyncio.Future[None]
) -> None:
    while True:
        try:
            chunk = await qreader.read(CHUNK)
        except ConnectionResetError:
            if not gave_up.done():
                gave_up.set_result(None)  # the requesting side reset the stream
            return
        if not chunk:
            return
        try:
            twriter.write(chunk)
            await twriter.drain()
        except OSError:
            return  # llama-server closed early; its response (if any) still goes back


async def _download(treader: asyncio.StreamReader, qwriter: asyncio.StreamWriter) -> None:
    # Raises on a broken llama-server connection, and on a write after the
    # requesting side's STOP_SENDING (aioquic has reset the stream by then).
    while chunk := await treader.read(CHUNK):
        qwriter.write(chunk)
    qwriter.write_eof()


# -- the actor -------------------------------------------------------------------------------


class Tunnel(Actor):
    """Glue: the QUIC endpoint, the Proxy's unix socket, mesh view and local state."""

    name = "tunnel"
    subscriptions = {"gossiper": ["mesh"], "server_supervisor": ["local"]}

    async def on_start(self) -> None:
        # Everything on_topic touches exists before the first await.
        self.server = TunnelServer()
        self.endpoint = TunnelEndpoint(
            self.config.node_id,
            self.config.mesh_secret,
            load_or_create_key(None),
            on_link=_accept_link,
            stream_handler=self.server.handle_stream,
        )
        self.client = TunnelClient(self.endpoint, suspect=self._suspect)
        sock: socket.socket | None = self.resources.get("socket")
        if sock is not None:
            await self.endpoint.listen(sock)
            self.log.info("tunnel on udp port %s", sock.getsockname()[1])
        await self.client.serve(self.config.tunnel_http_path)

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.MeshView):
            self.client.set_view(msg)
        elif isinstance(msg, m.LocalServerState):
            self.server.local = msg

    async def _suspect(self, node_id: str, reason: str) -> None:
        await self.bus.tell("health_prober", m.SuspectPeer(node_id, reason))

    async def on_stop(self) -> None:
        await self.client.close()
        self.server.close()
        self.endpoint.close()
        with contextlib.suppress(OSError):
            os.unlink(self.config.tunnel_http_path)


async def _accept_link(link: Link) -> None:
    """Incoming links need no setup: their streams go to `TunnelServer.handle_stream`."""
