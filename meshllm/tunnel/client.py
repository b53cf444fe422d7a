"""The requesting side of the Tunnel: the Proxy's unix socket, and QUIC links to peers.

The Proxy keeps a few unix connections open and sends one request at a time
on each (`hop.TunnelRequest` frame, then the body). For each, this side
opens a stream on its link to the target node, writes `TunnelOpen`, the
frame and the body, and copies what comes back to the Proxy as it arrives:
the host frames it as HTTP/1.1, so the Proxy's connection carries the next
request once the stream has ended.

Failure has to show up quickly and as an error, never as a hang: a peer
leaving the mesh view or losing its connection aborts every request to it,
answered 502 here before any byte came back, or else by closing the Proxy's
connection mid-response (the Proxy turns that into an SSE error event). The
other way round, a Proxy that closes its connection mid-response (its
client went away) resets the stream, and the host's Tunnel closes its
llama-server connection, so generation stops there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

from meshllm.http.errors import error_response
from meshllm.http.h1 import ResponseError, ResponseReader
from meshllm.mesh import wire
from meshllm.mesh.quic import AdmissionError, Link, MeshEndpoint, release_stream, write_last
from meshllm.runtime import messages as m
from meshllm.tunnel.core import Address, peers_to_drop, tunnel_addresses
from meshllm.tunnel.hop import (
    LENGTH_BYTES,
    MAX_BODY_BYTES,
    FrameError,
    TunnelRequest,
    decode_request,
    frame_length,
)
from meshllm.tunnel.server import guard_control

log = logging.getLogger("meshllm.tunnel")

CHUNK = 65536
DIAL_TIMEOUT_S = 5.0
UNKNOWN_PEER_WAIT_S = 1.0
"""A peer the Router already routes to may reach this actor's mesh view a moment later."""
KEEPALIVE_S = 5.0
"""Ping period on idle links: a long non-streaming generation sends nothing for
longer than QUIC's idle timeout, which would otherwise close the connection."""

SuspectHandler = Callable[[str, str], Awaitable[None]]


class _ResponseCheck(ResponseReader):
    """Follows a host's response only to find where it ends; keeps no body."""

    def body_piece(self, data: bytes) -> None:
        pass


class _Exchange:
    """One request from the Proxy in flight to a peer."""

    __slots__ = ("aborted", "forwarded", "link", "node_id", "notify", "task")

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.task: asyncio.Task[None] | None = None
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
            if self.task is not None:
                self.task.cancel()


class ProxyConnection(asyncio.Protocol):
    """One unix connection from the Proxy: frame and body in, HTTP/1.1 out, then again."""

    def __init__(self, client: TunnelClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.request: TunnelRequest | None = None
        """The frame read, its body still coming."""
        self.frame = b""
        self.exchange: _Exchange | None = None
        self.closed = False
        self.writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.client.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.connections.discard(self)
        if self.exchange is not None:
            # The Proxy gave up on the response: its client went away.
            self.exchange.abort("the client went away", notify=False)
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.exchange is None:
            self._parse()
        # Else the Proxy has read the whole response and sends its next request
        # before the end of the stream was seen here: it waits its turn.

    def _parse(self) -> None:
        buf = self.buf
        try:
            if self.request is None:
                if len(buf) < LENGTH_BYTES:
                    return
                end = LENGTH_BYTES + frame_length(buf)
                if len(buf) < end:
                    return
                self.frame = bytes(buf[:end])
                del buf[:end]
                self.request = decode_request(self.frame[LENGTH_BYTES:], self.client.max_body_bytes)
            length = self.request.body_length
            if len(buf) < length:
                return
            if len(buf) > length:
                raise FrameError("bytes after the request body (one request at a time)")
        except FrameError as exc:
            self.refuse(exc)
            return
        request, data = self.request, self.frame + buf
        self.request, self.frame = None, b""
        buf.clear()
        self.exchange = self.client.start(request, data, self)

    def refuse(self, exc: FrameError) -> None:
        """Answer the frame's error and close: after a bad frame the byte stream cannot
        be trusted."""
        log.warning("bad request from the Proxy: %s", exc)
        self.write(error_response(exc.status, str(exc), exc.code, close=True))
        self.close()

    def finished(self, reusable: bool) -> None:
        """The exchange is over; `reusable`: its response went out whole."""
        self.exchange = None
        if not reusable:
            self.close()
        elif self.buf:
            self._parse()

    # -- writing, with the Proxy's flow control ---------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_writer(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def drain(self) -> None:
        if self.writable is not None:
            await self.writable
        if self.closed:
            raise ConnectionResetError("the Proxy closed the connection")


class TunnelClient:
    """The requesting side: serves the Proxy's unix socket and dials peers' Tunnels.

    Its link table (`links`) is its own, not the Gossiper's: each actor is a
    process with its own UDP socket, and a QUIC connection lives in one process.
    """

    def __init__(
        self,
        endpoint: MeshEndpoint,
        suspect: SuspectHandler | None = None,
        unknown_peer_wait_s: float = UNKNOWN_PEER_WAIT_S,
        dial_timeout_s: float = DIAL_TIMEOUT_S,
        keepalive_s: float = KEEPALIVE_S,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.endpoint = endpoint
        self.max_body_bytes = max_body_bytes
        """The node's Proxy limit: a frame announcing more is refused (413)."""
        self.suspect = suspect
        self.unknown_peer_wait_s = unknown_peer_wait_s
        self.dial_timeout_s = dial_timeout_s
        self.keepalive_s = keepalive_s
        self.addresses: dict[str, Address | None] = {}
        self.links: dict[str, Link] = {}
        self.dialing: dict[str, asyncio.Future[Link]] = {}
        self.exchanges: dict[str, set[_Exchange]] = {}
        self.view_changed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[ProxyConnection] = set()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.openings: dict[str, bytes] = {}
        """model -> its encoded `TunnelOpen` frame."""

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

    async def open_stream(self, node_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to `node_id`'s Tunnel (dialled if need be), for a split's RPC
        connection; ConnectionError when the node is not known or not reachable."""
        addr = await self._address(node_id)
        if addr is None:
            raise ConnectionError(f"node {node_id} has no tunnel address in the mesh")
        try:
            link = await self._link(node_id, addr)
        except (AdmissionError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach node {node_id}'s tunnel: {exc}") from exc
        return await link.open_stream()

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
        self._spawn(guard_control(link))
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

    async def serve(self, path: str) -> asyncio.AbstractServer:
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
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(
            lambda: ProxyConnection(self), sock=sock, backlog=1024
        )
        return self.server

    def start(self, request: TunnelRequest, data: bytes, conn: ProxyConnection) -> _Exchange:
        """Begin forwarding one request (`data`: its frame and body) for `conn`."""
        ex = _Exchange(request.node)
        self.exchanges.setdefault(ex.node_id, set()).add(ex)
        ex.task = asyncio.ensure_future(self._exchange(ex, request, data, conn))
        return ex

    async def _exchange(
        self, ex: _Exchange, request: TunnelRequest, data: bytes, conn: ProxyConnection
    ) -> None:
        task = ex.task
        assert task is not None
        reusable = False
        try:
            reusable = await self._forward(ex, request, data, conn)
        except asyncio.CancelledError:
            if ex.aborted is None or task.uncancel() > 0:
                raise
            # A client going away is routine (and races a response's last bytes).
            level = logging.WARNING if ex.notify else logging.DEBUG
            log.log(level, "request to %s aborted: %s", ex.node_id, ex.aborted)
            if ex.notify and ex.forwarded == 0:
                conn.write(error_response(502, ex.aborted, "peer_lost"))
                reusable = True
        except ConnectionError:
            pass  # the Proxy went away
        except Exception as exc:
            # Whatever else breaks: an error, never a connection closed without one
            # (the Proxy would send the request again).
            log.warning("request to %s failed: %r", ex.node_id, exc)
            if ex.forwarded == 0:
                conn.write(error_response(502, f"tunnel error: {exc}", "tunnel_error"))
                reusable = True
        finally:
            peers = self.exchanges.get(ex.node_id)
            if peers is not None:
                peers.discard(ex)
                if not peers:
                    del self.exchanges[ex.node_id]
            conn.finished(reusable)

    async def _forward(
        self, ex: _Exchange, request: TunnelRequest, data: bytes, conn: ProxyConnection
    ) -> bool:
        """True when a whole response went to the Proxy (its connection can be reused)."""
        node_id = request.node
        addr = await self._address(node_id)
        if addr is None:
            if node_id in self.addresses:
                msg, code = f"node {node_id} has no tunnel address", "peer_unreachable"
            else:
                msg, code = f"node {node_id} is not in the mesh", "peer_unknown"
            conn.write(error_response(502, msg, code))
            return True
        try:
            link = await self._link(node_id, addr)
            qreader, qwriter = await link.open_stream()
        except (OSError, TimeoutError, EOFError, wire.WireError) as exc:
            # OSError covers ConnectionError and so AdmissionError.
            self._suspect(node_id, f"tunnel dial failed: {exc}")
            msg = f"cannot reach node {node_id}: {exc}"
            conn.write(error_response(503, msg, "peer_unreachable", True))
            return True
        ex.link = link
        # The host's bytes are parsed, not trusted: the Proxy's connection carries the
        # next request after this response, so a host that sends more than one
        # response, or ends short, must not leave bytes for the next exchange to read.
        check = _ResponseCheck()
        check.expect(no_body=request.method == "HEAD")
        finished = False
        try:
            opening = self.openings.get(request.model)
            if opening is None:
                opening = self.openings[request.model] = wire.encode_frame(
                    wire.TunnelOpen(request.model)
                )
            # The whole request at once: the host cannot have refused any of it yet.
            write_last(qwriter, opening + data)
            while chunk := await qreader.read(CHUNK):
                try:
                    check.feed(chunk)
                except ResponseError as exc:
                    log.warning("node %s sent a broken response: %s", node_id, exc)
                    break  # not forwarded; the Proxy's connection closes below
                conn.write(chunk)
                ex.forwarded += len(chunk)
                await conn.drain()
                if check.done:
                    break  # whole: what may follow on the stream is not read
            # Reusable only when the response ended where its own framing says.
            finished = check.done and check.keep_alive and not link.closed.is_set()
        except ConnectionResetError:
            pass  # the host reset the stream: a response cut short
        finally:
            release_stream(qreader, qwriter, abort=not finished)
        if link.closed.is_set():
            self._suspect(node_id, "tunnel connection lost mid-response")
        elif ex.forwarded == 0:
            self._suspect(node_id, "tunnel stream ended without a response")
        if ex.forwarded == 0:
            msg = f"node {node_id} closed the tunnel stream without a response"
            conn.write(error_response(502, msg, "peer_no_response"))
            return True
        # Cut short, the Proxy sees its connection close mid-response.
        return finished

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
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0)
