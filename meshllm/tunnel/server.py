"""The host's side of the Tunnel: tunnelled requests to this node's llama-server.

Each admitted stream starts with a `wire.TunnelOpen` frame naming the model,
then the `hop.TunnelRequest` frame the requesting Proxy wrote, then the body.
The request goes to llama-server through the same upstream client the Proxy
uses (`meshllm.http.upstream.Pool`: kept-alive connections, the one response
parser), and the response comes back down the stream as HTTP/1.1 that ends
where the stream ends (see `meshllm.tunnel.core`). A peer that resets the
stream or stops reading cancels the request, and closing the llama-server
connection stops the generation there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from meshllm.http.errors import error_response
from meshllm.http.upstream import HOP_BY_HOP, Pool, Response, UpstreamError
from meshllm.mesh import wire
from meshllm.mesh.quic import Link, release_stream, stop_waiter, write_last
from meshllm.runtime import messages as m
from meshllm.tunnel.core import LAST_CHUNK, chunk, response_head, serving_port
from meshllm.tunnel.hop import (
    LENGTH_BYTES,
    FrameError,
    TunnelRequest,
    decode_request,
    frame_length,
    upstream_headers,
)

log = logging.getLogger("meshllm.tunnel")

HEAD_TIMEOUT_S = 10.0
"""How long a peer may take to send a stream's frames and body."""
LOOPBACK = "127.0.0.1"
POOL_MAX_IDLE = 4
"""Idle kept-alive llama-server connections (each pins one of its HTTP threads)."""


class TunnelServer:
    """Splices admitted tunnel streams to the local llama-server."""

    def __init__(self, local: m.LocalServerState | None = None) -> None:
        self.local = local or m.LocalServerState()
        """This node's llama-server, as ServerSupervisor last published it."""
        self.dropped = 0
        """Streams dropped because their first frame was not a valid `TunnelOpen`."""
        self.pool: Pool | None = None
        """Kept-alive connections to the llama-server on `self.pool.port`."""

    def _pool(self, port: int) -> Pool:
        pool = self.pool
        if pool is None or pool.port != port:
            if pool is not None:
                pool.close()
            pool = self.pool = Pool(LOOPBACK, port, max_idle=POOL_MAX_IDLE)
        return pool

    async def handle_stream(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A `MeshEndpoint` stream handler: one tunnelled request."""
        opening: wire.WireMessage | None = None
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                opening = await wire.read_frame(reader)
                if isinstance(opening, wire.TunnelOpen):
                    prefix = await reader.readexactly(LENGTH_BYTES)
                    request = decode_request(await reader.readexactly(frame_length(prefix)))
                    # Refused before its body is read: a wrong model is answered at once.
                    port, why = serving_port(self.local, opening.model)
                    if not port:
                        _answer(reader, writer, error_response(503, why, "model_not_served", True))
                        return
                    body = await reader.readexactly(request.body_length)
            why = f"first frame was {type(opening).__name__}"
        except (
            wire.WireError,
            FrameError,
            asyncio.IncompleteReadError,
            ConnectionResetError,
            TimeoutError,
        ) as exc:
            if isinstance(opening, wire.TunnelOpen):
                msg = f"bad request in the tunnel stream: {exc}"
                _answer(reader, writer, error_response(400, msg, "bad_request"))
                return
            opening, why = None, repr(exc)
        if not isinstance(opening, wire.TunnelOpen):
            self.dropped += 1
            link.protocol.endpoint.counters.malformed_frames += 1
            log.warning("dropped a tunnel stream from %s: %s", link.peer_id, why)
            _answer(reader, writer, b"")  # closed both ways, nothing said
            return
        await self._forward(self._pool(port), request, body, reader, writer)

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
            except UpstreamError as exc:
                msg = f"cannot reach the llama-server for {request.model!r}: {exc}"
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
        """Close the kept-alive llama-server connections."""
        if self.pool is not None:
            self.pool.close()


async def _relay(resp: Response, writer: asyncio.StreamWriter) -> bytes:
    """Write the response down the stream but for its last bytes, which are returned."""
    headers = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
    if resp.complete():
        data = await resp.body()
        return response_head(resp.status, headers, len(data)) + data
    if resp.length is not None:
        writer.write(response_head(resp.status, headers, resp.length))
        async for piece in resp.iter_body():
            writer.write(piece)
        return b""
    writer.write(response_head(resp.status, headers, None))
    async for piece in resp.iter_body():
        writer.write(chunk(piece))
    return LAST_CHUNK


def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
    """Answer a stream and end it; the rest of its request is refused (STOP_SENDING)."""
    with contextlib.suppress(Exception):
        write_last(writer, response)
    release_stream(reader, writer)
