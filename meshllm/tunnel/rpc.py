"""Tensor split's RPC connections over QUIC (issue 10, item 4; not wired to the actors yet).

The host's llama-server dials one local port per worker (`RpcForwarder`); each
connection becomes one QUIC stream, opened with `RpcOpen`, to the worker's
Tunnel, which connects it to its RPC server on loopback (`serve_rpc_stream`).
The bytes are relayed as they come, in both directions at once, each side
waiting for the other to take what it was given (`drained` on QUIC, `drain`
on TCP), so neither node buffers more than a window however large the
weights. Nothing here parses the RPC protocol: the RPC server itself checks
what it gets, and only admitted members can open such a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

from meshllm.mesh import wire
from meshllm.mesh.quic import drained, release_stream
from meshllm.runtime.procutil import loopback_peer_uid
from meshllm.runtime.rpc import LOOPBACK

log = logging.getLogger("meshllm.tunnel.rpc")

PIECE_BYTES = 256 * 1024
"""Largest read relayed at once: weights move in large pieces, per-token messages
(a few hundred bytes) go out as soon as they are read."""

StreamOpener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Relayed:
    """Bytes carried, for the benchmark and the tests (a second load of a model moves
    far fewer bytes than the first when the worker's RPC server keeps its cache)."""

    def __init__(self) -> None:
        self.to_worker = 0
        self.from_worker = 0


async def _copy_to_quic(
    source: asyncio.StreamReader, quic: asyncio.StreamWriter, count: Callable[[int], None]
) -> None:
    try:
        while piece := await source.read(PIECE_BYTES):
            count(len(piece))
            quic.write(piece)
            await drained(quic)
        quic.write_eof()
    except (RuntimeError, ValueError) as exc:
        # aioquic refuses writes on a stream the other side gave up (STOP_SENDING made
        # it reset the stream, or forget it): the RPC server or llama-server went away.
        raise ConnectionResetError(f"the other side gave up the stream: {exc}") from None


async def _copy_from_quic(
    quic: asyncio.StreamReader, sink: asyncio.StreamWriter, count: Callable[[int], None]
) -> None:
    while piece := await quic.read(PIECE_BYTES):
        count(len(piece))
        sink.write(piece)
        await sink.drain()
    if sink.can_write_eof():
        sink.write_eof()


async def _relay(
    tcp_reader: asyncio.StreamReader,
    tcp_writer: asyncio.StreamWriter,
    quic_reader: asyncio.StreamReader,
    quic_writer: asyncio.StreamWriter,
    outgoing: Callable[[int], None],
    incoming: Callable[[int], None],
) -> None:
    """Both directions at once until both ends are done, or either side fails."""
    tasks = [
        asyncio.ensure_future(_copy_to_quic(tcp_reader, quic_writer, outgoing)),
        asyncio.ensure_future(_copy_from_quic(quic_reader, tcp_writer, incoming)),
    ]
    ended = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failure ends both directions
        await asyncio.gather(*tasks)
        ended = True
    except (ConnectionError, OSError) as exc:
        log.info("an RPC connection ended: %s", exc)
    finally:
        for task in tasks:
            task.cancel()
        # Aborted only when it failed: after a clean end both ways, a reset could
        # overtake (and discard) the last bytes still unacknowledged, such as the
        # RPC server's last reply on a lossy link.
        release_stream(quic_reader, quic_writer, abort=not ended)
        tcp_writer.close()


class RpcForwarder:
    """The host's side: a loopback port for its llama-server's `--rpc`, whose every
    connection is carried over a new QUIC stream to one worker.

    Loopback is open to every user of the machine: a connection from a socket that
    another user owns (read from /proc) is closed unrelayed, so only this node's own
    llama-server speaks for it to the worker."""

    def __init__(self, open_stream: StreamOpener) -> None:
        self.open_stream = open_stream
        self.refused = 0
        """Connections closed because another local user made them."""
        self.relayed = Relayed()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def listen(self) -> int:
        """Start listening on 127.0.0.1; the port to give llama-server."""
        self.server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task rather than asyncio's for a coroutine callback: `close` cancels
        # it, and Python 3.11's streams log a cancelled callback task as an error.
        task = asyncio.ensure_future(self._carry(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_port = writer.get_extra_info("peername")[1]
        local_port = writer.get_extra_info("sockname")[1]
        uid = loopback_peer_uid(peer_port, local_port)
        if uid is not None and uid != os.getuid():
            self.refused += 1
            log.warning("refused an RPC connection from another local user (uid %d)", uid)
            writer.close()
            return
        try:
            quic_reader, quic_writer = await self.open_stream()
        except (ConnectionError, OSError) as exc:
            log.warning("cannot reach the worker for an RPC connection: %s", exc)
            writer.close()
            return
        quic_writer.write(wire.encode_frame(wire.RpcOpen()))
        relayed = self.relayed

        def outgoing(n: int) -> None:
            relayed.to_worker += n

        def incoming(n: int) -> None:
            relayed.from_worker += n

        await _relay(reader, writer, quic_reader, quic_writer, outgoing, incoming)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve_rpc_stream(
    quic_reader: asyncio.StreamReader, quic_writer: asyncio.StreamWriter, rpc_port: int
) -> None:
    """The worker's side, once a stream's `RpcOpen` frame was read: connect it to the
    RPC server on 127.0.0.1:`rpc_port` and relay until either end closes."""
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, rpc_port)
    except OSError as exc:
        log.warning("the RPC server on port %d does not answer: %s", rpc_port, exc)
        release_stream(quic_reader, quic_writer, abort=True)
        return
    await _relay(reader, writer, quic_reader, quic_writer, lambda n: None, lambda n: None)
