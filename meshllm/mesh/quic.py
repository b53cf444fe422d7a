"""QUIC between nodes (aioquic, TLS 1.3) with admission by the mesh secret.

Every connection starts with an admission exchange on its first stream,
before anything else is served:

    client -> Hello(client_id, client_nonce, client_key)
    server -> Challenge(server_id, server_nonce, HMAC(secret, "server"|nonces|server_id|cert))
    client -> Proof(HMAC(secret, "client"|nonces|client_id|cert),
                    client_key's signature of nonces|cert|server_id|client_id)
    server -> Welcome | Refused

Each side proves it holds the secret without sending it, and fresh nonces
make old exchanges useless. `cert` is the SHA-256 of the server's TLS
certificate, so the proofs are bound to this TLS session: a man in the
middle cannot relay them.

Each side also proves its node id, which is derived from its key
(`identity.node_id_of_der`): the server's id must be the id of the key in
its TLS certificate (TLS proved the server holds that key), the client's
the id of the key in its Hello, which signs the Proof. So a member that
holds the secret still cannot pose as another node: `Link.peer_id` is
always a verified id.

A stranger gets next to nothing. A connection that has not completed
admission `ADMISSION_TIMEOUT_S` after it was created is closed, whatever it
sends or does not send. Until then it may open one bidirectional stream and
no unidirectional one, and the connection's flow-control window holds
`ADMISSION_WINDOW_BYTES`: aioquic buffers data that arrives out of order up
to the window, and grows windows as data arrives, so no window grows until
admission (and after it, only with data delivered in order). Frames before
admission are capped at `ADMISSION_FRAME_BYTES`. Connections waiting for
admission are capped per endpoint: over the cap, the oldest connection of the
source network (`source_prefix`) with the most waiting is closed to make
room, so strangers flooding from other networks cannot keep a member out
(from the member's own network, they make it race them). The server validates a client's address
with a QUIC Retry before it keeps any state for it, and warnings about
refused connections are throttled (`WarningThrottle`). A peer that opens any
other stream first, sends garbage, or is too slow is disconnected. After
admission the first stream carries framed control messages (`Link.send`: a
peer that stops reading them is disconnected once `CONTROL_SEND_BUFFER_BYTES`
wait unacknowledged); other streams are handed to the endpoint's stream
handler (the Tunnel's HTTP streams).

Every adaptation of aioquic lives in this module, and `pyproject.toml` pins
the aioquic versions it was tested against: the pacer for uvloop's
millisecond clock (`CoarseClockPacer`), the flow-control windows, and the
stream ends plain aioquic leaves unseen (a peer's RESET_STREAM and
STOP_SENDING, and the readers it keeps for every stream ever opened), which
`MeshProtocol` and `release_stream` handle through aioquic's private stream
fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamAdapter
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState, QuicErrorCode
from aioquic.quic.events import (
    ConnectionTerminated,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID

from meshllm.mesh import identity, wire

log = logging.getLogger("meshllm.mesh.quic")

ALPN = "meshllm/1"
ADMISSION_TIMEOUT_S = 5.0
"""A connection not admitted this long after it was created is closed."""
ADMISSION_FRAME_BYTES = 256
"""Cap on each frame before admission (the largest, a Hello with its key, is ~170 bytes)."""
ADMISSION_WINDOW_BYTES = 2048
"""Flow-control window of a connection until admission: room for the admission
frames, and all the stream data an unadmitted peer can make us hold."""
MAX_PENDING = 64
"""Incoming connections waiting for admission, per endpoint. A new one over the cap
is not refused: the oldest connection of the source network with the most waiting
is closed instead (`MeshEndpoint._wait_for_admission`). So a stranger who keeps
the slots full cannot shut members out: a member's connection is closed only if
its network has the most waiting and enough newer connections arrive before its
admission (two round trips) completes."""
WARNING_BURST = 5
WARNING_PER_S = 1.0
"""Warnings about refused connections, per endpoint: a burst of `WARNING_BURST`,
then `WARNING_PER_S` (`WarningThrottle`). A flood of strangers must not flood the
log, and a quiet node logs each refusal."""
CONTROL_SEND_BUFFER_BYTES = 16 * 1024 * 1024
"""Bytes a link's control stream may hold unacknowledged before the link is closed
(`Link.send`). aioquic buffers all that is written until the peer acknowledges it,
and a peer that gives no credit acknowledges nothing: a member asking for the full
table over and over could make us hold gigabytes. The largest burst an honest peer
takes at once is a full sync of the table (a mesh of 5,000 nodes is a few MB in
`wire.MAX_FRAME_BYTES` chunks), written in one go when the link opens; an honest
peer acknowledges as it reads, so its buffer stays near the congestion window."""
PEER_STREAMS = 128
"""Bidirectional streams a peer may have open after admission (aioquic's default).
It may open no unidirectional stream: meshllm never uses them."""
CLOCK_TICK_S = 0.001
"""Resolution of uvloop's clock."""
IDLE_TIMEOUT_S = 20.0
ERROR_REFUSED = 0x100
STREAM_CANCELLED = 0x1
"""Application error code of a stream given up by either side (RESET_STREAM, STOP_SENDING)."""
STREAM_WINDOW_BYTES = 1024 * 1024
"""Credit always open on a stream beyond what its reader has taken: a reader waiting
for a whole frame of this size (the largest gossip frame) always gets it."""
LONE_ACK_DELAY_S = 0.02
"""How long the ACK of a lone packet may wait for data to ride on (the next request
or its response): below the 25 ms max_ack_delay aioquic announces, so the peer's
loss timer never fires for it. Once a second packet is waiting, aioquic's 1 ms
applies again (bulk transfers keep their pace)."""
HOST_CID_BYTES = 8
"""Length of our connection ids (aioquic's default `connection_id_length`)."""
CONNECTION_WINDOW_BYTES = 8 * 1024 * 1024
"""Credit always open on a connection beyond what its readers have taken: every
tunnel stream to a peer shares it, so it is larger than aioquic's 1 MiB default,
which a few concurrent responses would fill."""
STREAM_HELD_BYTES = 2 * STREAM_WINDOW_BYTES
CONNECTION_HELD_BYTES = 2 * CONNECTION_WINDOW_BYTES
"""The most a peer can make us hold unread, on one stream and on one connection
(after admission): the initial windows, and where a window is moved to (what the
readers took plus these) once less than the `_WINDOW_BYTES` above is open, so a
short exchange never needs a window update (`_grow_credit_with_reading`)."""


class AdmissionError(ConnectionError):
    """The other side could not prove it holds the mesh secret (or never tried)."""


@dataclass
class Counters:
    """What the endpoint dropped, for status and tests."""

    garbage_datagrams: int = 0
    refused: int = 0
    """Connections that failed admission (or never tried within the deadline)."""
    malformed_frames: int = 0
    over_pending_cap: int = 0
    """Connections waiting for admission closed to make room for newer ones (`MAX_PENDING`)."""
    unread_control: int = 0
    """Links closed because the peer did not read its control stream
    (`CONTROL_SEND_BUFFER_BYTES`)."""
    warnings_suppressed: int = 0
    """Warnings about refused connections left out of the log (`WarningThrottle`)."""


@dataclass
class Traffic:
    """What the endpoint carried, for the benchmark's traffic figures.

    Datagrams are counted at the UDP socket (QUIC headers, AEAD tags, ACK-only
    packets and retransmissions included; add 28 bytes of IPv4 + UDP header per
    datagram for bytes on the wire). Control frames are counted by kind
    (`wire.traffic_kind`) as framed bytes, without packet overhead.
    """

    datagrams_sent: int = 0
    datagrams_received: int = 0
    udp_bytes_sent: int = 0
    udp_bytes_received: int = 0
    frame_bytes_sent: dict[str, int] = field(default_factory=dict)
    frame_bytes_received: dict[str, int] = field(default_factory=dict)
    frames_sent: dict[str, int] = field(default_factory=dict)
    frames_received: dict[str, int] = field(default_factory=dict)

    def frame_sent(self, msg: wire.WireMessage, size: int) -> None:
        kind = wire.traffic_kind(msg)
        self.frame_bytes_sent[kind] = self.frame_bytes_sent.get(kind, 0) + size
        self.frames_sent[kind] = self.frames_sent.get(kind, 0) + 1

    def frame_received(self, msg: wire.WireMessage, size: int) -> None:
        kind = wire.traffic_kind(msg)
        self.frame_bytes_received[kind] = self.frame_bytes_received.get(kind, 0) + size
        self.frames_received[kind] = self.frames_received.get(kind, 0) + 1


class _CountingTransport:
    """A datagram transport that counts what goes out, and passes everything on."""

    def __init__(self, transport: Any, traffic: Traffic) -> None:
        self._transport = transport
        self._traffic = traffic

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._traffic.datagrams_sent += 1
        self._traffic.udp_bytes_sent += len(data)
        self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class WarningThrottle:
    """A token bucket for log lines: `burst` at once, then `per_s` a second; counts the rest.

    Sans-I/O: the caller passes the time. The first warning let through after
    some were held back says how many (`allow` returns that count), so the log
    stays bounded and still tells the whole story.
    """

    def __init__(self, burst: int = WARNING_BURST, per_s: float = WARNING_PER_S) -> None:
        self.burst = burst
        self.per_s = per_s
        self.tokens = float(burst)
        self.last = float("-inf")
        self.suppressed = 0
        """Held back since the last warning let through."""

    def allow(self, now: float) -> int | None:
        """None: leave this warning out. Otherwise log it, with this many left out before."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_s)
            self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


def source_prefix(address: str) -> str:
    """The network a connection comes from, as the pending cap counts it.

    IPv4 /24 and IPv6 /64 (an IPv4-mapped IPv6 address counts as IPv4): one
    host typically holds a whole prefix, so a cap per address would let it
    take every slot by changing addresses. Not an IP address: itself.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The identity key as bytes, to hand to the actors that speak for the node."""
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def key_from_pem(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def self_signed(key: ec.EllipticCurvePrivateKey, node_id: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshllm-{node_id}")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


def _peer_certificate(protocol: QuicConnectionProtocol) -> tuple[bytes, str]:
    """SHA-256 of the certificate the server showed in TLS, and the id of its key.

    Both MACs and the client's signature cover the digest, so admission cannot
    be relayed: a man in the middle shows the client a certificate of its own,
    and the server's checks fail. TLS proved the server holds the key, so the
    key's id is the server's verified node id.
    """
    cert = protocol._quic.tls._peer_certificate
    if cert is None:
        raise AdmissionError("the peer showed no certificate")
    key = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest(), identity.node_id_of_der(key)


def _transcript(
    client_nonce: bytes, server_nonce: bytes, cert: bytes, server_id: str, client_id: str
) -> bytes:
    """What the client signs: this exchange (both nonces, this TLS session) and both ids.

    The ids are checked (16 hex digits) before anything is signed or verified,
    so the concatenation is unambiguous.
    """
    ids = f"{server_id}:{client_id}".encode()
    return b"meshllm admission\0" + client_nonce + server_nonce + cert + ids


def _shown(text: str, limit: int = 40) -> str:
    """An unauthenticated string as it may appear in a log or an error: quoted, truncated."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


class CoarseClockPacer(QuicPacketPacer):
    """aioquic's pacer with a bucket that holds at least two ticks of a coarse clock.

    uvloop's clock moves in whole milliseconds. On a fast, lossless path the
    congestion window grows until aioquic's bucket holds less than a millisecond
    of packets; the bucket then refills only once per tick and a link that has
    carried a few MB crawls at about one packet per millisecond.
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        self.bucket_max = max(self.bucket_max, 2 * CLOCK_TICK_S)


class Link:
    """An admitted connection to one peer: a control stream plus new streams on demand."""

    def __init__(
        self,
        protocol: MeshProtocol,
        peer_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dialed: bool,
        remote: tuple[str, int],
    ) -> None:
        self.protocol = protocol
        self.peer_id = peer_id
        self.reader = reader
        self.writer = writer
        self.dialed = dialed
        self.remote = remote
        self.closed = protocol.closed
        self.opened_at = time.monotonic()
        self.closing = False
        """`close` was called: nothing more is sent."""

    def send(self, msg: wire.WireMessage) -> None:
        """Queue a control frame; close the link if the peer does not take them.

        Writes never wait (the gossip core answers at once), so the stream's
        unacknowledged bytes are checked instead: past `CONTROL_SEND_BUFFER_BYTES`
        the peer has stopped reading (or acknowledging) and the link is closed,
        which frees all of it.
        """
        if self.closed.is_set() or self.closing:
            return
        frame = wire.encode_frame(msg)
        self.protocol.endpoint.traffic.frame_sent(msg, len(frame))
        self.writer.write(frame)
        held = self.unacknowledged()
        if held > CONTROL_SEND_BUFFER_BYTES:
            endpoint = self.protocol.endpoint
            endpoint.counters.unread_control += 1
            endpoint.warn(
                "closed the link to node %s: it does not read its control stream "
                "(%d MiB sent and not acknowledged)",
                self.peer_id,
                held >> 20,
            )
            self.close("peer does not read its control stream")

    def unacknowledged(self) -> int:
        """Bytes written on the control stream that the peer has not acknowledged yet."""
        _, stream_id = _stream_of(self.writer)
        stream = self.protocol._quic._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    async def open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.protocol.create_stream()

    def close(self, reason: str = "") -> None:
        self.closing = True
        self.protocol.close(reason_phrase=reason)


class MeshProtocol(QuicConnectionProtocol):
    """One QUIC connection of a `MeshEndpoint`."""

    def __init__(self, quic: QuicConnection, endpoint: MeshEndpoint, **kwargs: Any) -> None:
        super().__init__(quic, stream_handler=self._on_stream)
        quic._loss._pacer = CoarseClockPacer(max_datagram_size=quic._max_datagram_size)
        self.endpoint = endpoint
        self.link: Link | None = None
        self.first_stream_seen = False
        self.refused = False
        """Admission failed: counted and logged once, closing."""
        self.closed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop_waiters: dict[int, asyncio.Future[None]] = {}
        """Stream id -> set when the peer resets the stream or sends STOP_SENDING."""
        self.abandoned: set[int] = set()
        """Streams released before their end came in: what still arrives is dropped."""
        self._data_pending = False
        """Stream data was written since the last transmit."""
        self._timer_now = 0.0
        """The deadline of the timer being handled: the time the next transmit sends at."""
        self._deadline: asyncio.TimerHandle | None = None
        self.send_waiters: list[asyncio.Future[None]] = []
        """Woken after each batch of received packets (ACKs free send buffers): `drained`."""
        _hold_back_until_admission(quic)
        if not quic.configuration.is_client:
            # From creation, not from the first stream: a peer that opens none is
            # closed all the same.
            self._deadline = self._loop.call_later(ADMISSION_TIMEOUT_S, self._too_late)

    def _too_late(self) -> None:
        self._deadline = None
        if self.link is None:
            self.refuse(f"not admitted within {ADMISSION_TIMEOUT_S:g} s")

    def refuse(self, why: str) -> None:
        """Close a connection that failed admission; counted and logged once.

        `why` must hold no unauthenticated text unless quoted by `_shown`.
        """
        if self.refused or self.link is not None:
            return
        self.refused = True
        self.endpoint.counters.refused += 1
        self.endpoint.warn("refused a connection from %s: %s", self.remote_address(), why)
        with contextlib.suppress(Exception):
            self.transmit()  # send a pending Refused now: close() would discard it
        self.close(error_code=ERROR_REFUSED, reason_phrase="not admitted")

    def admitted(self, link: Link) -> None:
        """Admission succeeded: serve the link, and give the peer today's windows and streams."""
        self.link = link
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.endpoint.pending.pop(self, None)
        quic = self._quic
        _grow_credit_with_reading(self)
        quic._local_max_data.value = CONNECTION_HELD_BYTES
        quic._local_max_streams_bidi.value = PEER_STREAMS
        self._transmit_soon()  # MAX_DATA and MAX_STREAMS

    def _create_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # aioquic's, with a transport the reader can tell when it has room again.
        adapter = _StreamAdapter(self, stream_id)
        reader = asyncio.StreamReader()
        reader.set_transport(adapter)
        protocol = asyncio.StreamReaderProtocol(reader)
        writer = asyncio.StreamWriter(adapter, protocol, reader, self._loop)
        self._stream_readers[stream_id] = reader
        return reader, writer

    def _wake_senders(self) -> None:
        waiters, self.send_waiters = self.send_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        counted = _CountingTransport(transport, self.endpoint.traffic)
        super().connection_made(cast(asyncio.BaseTransport, counted))

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.endpoint.traffic.datagrams_received += 1
        self.endpoint.traffic.udp_bytes_received += len(data)
        quic = self._quic
        now = self._loop.time()
        space = quic._spaces.get(Epoch.ONE_RTT)
        waiting = space is not None and space.ack_at is not None
        quic.receive_datagram(cast(bytes, data), addr, now=now)
        if space is not None and space.ack_at is not None:
            if not waiting:
                space.ack_at = now + LONE_ACK_DELAY_S
            elif space.ack_at > now + quic._ack_delay:
                space.ack_at = now + quic._ack_delay
        self._process_events()
        if self.send_waiters:
            self._wake_senders()
        if _may_have_to_send(quic, now):
            # aioquic transmits at once here; later in this loop turn instead, so
            # datagrams read together are answered together, and what the streams'
            # handlers write in answer (a response) goes in the same packets.
            QuicConnectionProtocol._transmit_soon(self)
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        """What aioquic's `transmit` does after sending: the timer for the next due event."""
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def _transmit_soon(self) -> None:
        self._data_pending = True
        super()._transmit_soon()

    def transmit(self) -> None:
        if self._data_pending:
            self._data_pending = False
            # aioquic sends an ACK only once it is due (1 ms after the packet it
            # acknowledges), even when a packet goes out before then: a request
            # answered within that time cost the peer a second, ACK-only,
            # datagram. ACKs ride on the data we send anyway.
            space = self._quic._spaces.get(Epoch.ONE_RTT)
            if space is not None and space.ack_at is not None:
                space.ack_at = 0.0
        # aioquic's own transmit, but at `_timer_now` after a timer (see _handle_timer).
        self._transmit_task = None
        now = self._loop.time()
        if self._timer_now > now:
            now = self._timer_now
        self._timer_now = 0.0
        transport = self._transport
        assert transport is not None
        for data, addr in self._quic.datagrams_to_send(now=now):
            transport.sendto(data, addr)
        self._arm_timer()

    def _handle_timer(self) -> None:
        # uvloop's clock moves in whole milliseconds, and a timer can fire while the
        # clock still reads the millisecond before aioquic's deadline. aioquic handles
        # the timer at the deadline but then sends at the clock's time, when nothing
        # is due yet (the ACK the timer was for), and arms the timer again for the
        # same deadline: it fires again at once, until the clock moves on. Sending
        # at the deadline too ends that.
        self._timer_now = self._timer_at or 0.0
        super()._handle_timer()

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.link is not None:
            self._spawn(self.endpoint.stream_handler(self.link, reader, writer))
        elif not self.first_stream_seen and not self._quic.configuration.is_client:
            self.first_stream_seen = True
            self._spawn(self.endpoint._admit_incoming(self, reader, writer))
        else:
            # Any stream before admission completes: no service, close at once.
            self.refuse("opened a second stream before admission")

    def quic_event_received(self, event: Any) -> None:
        # aioquic's asyncio layer ignores RESET_STREAM (a reader then waits forever)
        # and STOP_SENDING; a cancelled request has to end the other side's work too.
        if isinstance(event, StreamDataReceived | StreamReset | StopSendingReceived):
            stream_id = event.stream_id
            if stream_id in self.abandoned and not isinstance(event, StopSendingReceived):
                # Late data would otherwise look like a new stream from the peer.
                if isinstance(event, StreamReset) or event.end_stream:
                    self.abandoned.discard(stream_id)
                return
            if isinstance(event, StreamReset):
                reader = self._stream_readers.get(stream_id)
                if reader is not None and reader.exception() is None:
                    reader.set_exception(ConnectionResetError("stream reset by the peer"))
            if not isinstance(event, StreamDataReceived):
                waiter = self.stop_waiters.get(stream_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        super().quic_event_received(event)
        if isinstance(event, ConnectionTerminated):
            self._wake_senders()
            if self.link is None and not self.refused and not self._quic.configuration.is_client:
                # Ended before admission without our refusal: aioquic closed it for a
                # protocol violation (a stream over the limit, data over the window).
                self.refused = True
                self.endpoint.counters.refused += 1
                why = (
                    _shown(event.reason_phrase)
                    if event.reason_phrase
                    else "it gave up before admission (another mesh's secret, "
                    "or not a meshllm node)"
                )
                self.endpoint.warn("refused a connection from %s: %s", self.remote_address(), why)
            self.closed.set()
            self.endpoint.protocols.discard(self)
            self.endpoint.pending.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            for task in list(self.tasks):
                task.cancel()

    def release(self, stream_id: int, reader: asyncio.StreamReader, reset: bool) -> None:
        """Forget a stream we are done with; STOP_SENDING if its end has not come in yet.

        `reset`: also abort what we were still sending (RESET_STREAM; no effect
        once everything we sent was acknowledged). aioquic keeps a reader for
        every stream the connection ever carried; this drops ours.
        """
        send = reset
        stream = self._quic._streams.get(stream_id)
        if stream is not None and not stream.receiver.is_finished:
            with contextlib.suppress(Exception):
                self._quic.stop_stream(stream_id, STREAM_CANCELLED)
            self.abandoned.add(stream_id)
            send = True
        if reset:
            with contextlib.suppress(Exception):
                self._quic.reset_stream(stream_id, STREAM_CANCELLED)
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

    def remote_address(self) -> tuple[str, int]:
        addr = self._quic._network_paths[0].addr if self._quic._network_paths else ("", 0)
        host = str(addr[0]).removeprefix("::ffff:")
        return host, int(addr[1])


def _hold_back_until_admission(quic: QuicConnection) -> None:
    """Give the peer the windows and streams admission needs, and no more, until admitted.

    Set before the transport parameters are sent (they carry the initial
    limits). The server takes one bidirectional stream (the admission
    stream), the client none; neither takes unidirectional streams. The
    connection's window bounds all that a peer can make us hold: aioquic
    counts a stream's bytes up to the highest offset received, gaps included.
    Stream windows keep their size: a new stream after admission can carry a
    whole request at once (the peer takes a stream's initial window from the
    transport parameters, not from later updates). aioquic doubles a window
    once half of it is used; until admission no limit is raised:
    `MeshProtocol.admitted` raises the limits and lets windows grow again
    (`_grow_credit_with_reading`).
    """
    streams = 0 if quic.configuration.is_client else 1
    quic._local_max_data.value = quic._local_max_data.sent = ADMISSION_WINDOW_BYTES
    quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = streams
    quic._local_max_streams_uni.value = quic._local_max_streams_uni.sent = 0
    quic._local_max_stream_data_uni = 0
    quic._write_connection_limits = _no_credit  # type: ignore[method-assign]
    quic._write_stream_limits = _no_credit  # type: ignore[method-assign]


def _no_credit(
    builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream | None = None
) -> None:
    """Stands in for aioquic's MAX_DATA / MAX_STREAMS / MAX_STREAM_DATA writers before admission."""


def _grow_credit_with_reading(protocol: MeshProtocol) -> None:
    """After admission: windows slide with what the application has *read*.

    aioquic doubles a stream's window once the highest offset received passes
    half of it, and the connection's once the bytes up to every stream's
    highest offset do: credit follows arrival, so a peer can make us hold
    whatever a reader has not read yet (a stalled client's response, a stream
    nobody reads), and bytes sent far past a gap make the windows grow without
    end. Here credit follows what the readers have taken: at least
    `STREAM_WINDOW_BYTES` beyond it is always open on a stream (so a reader
    waiting for a whole frame of that size gets it), and at most
    `STREAM_HELD_BYTES`; the same for the connection with
    `CONNECTION_WINDOW_BYTES` and `CONNECTION_HELD_BYTES`. What we hold for one
    peer stays within those, however it is sent, and a window moves in steps of
    at least `_WINDOW_BYTES` (one MAX_STREAM_DATA or MAX_DATA frame per step).
    A reader that reads again after its buffer paused the stream schedules a
    transmit (`_StreamAdapter.resume_reading`) so the credit goes out.
    """
    quic = protocol._quic
    readers = protocol._stream_readers

    def unread(stream: QuicStream) -> int:
        """Bytes of `stream` received but not read: gaps and all, and the reader's buffer."""
        receiver = stream.receiver
        reader = readers.get(stream.stream_id) if stream.stream_id is not None else None
        held = len(reader._buffer) if reader is not None else 0  # type: ignore[attr-defined]
        return receiver.highest_offset - receiver._buffer_start + held

    def stream_limits(
        builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        receiver = stream.receiver
        if (
            stream.max_stream_data_local
            and stream.max_stream_data_local - receiver._buffer_start < STREAM_WINDOW_BYTES
        ):
            taken = receiver.highest_offset - unread(stream)
            if stream.max_stream_data_local - taken < STREAM_WINDOW_BYTES:
                stream.max_stream_data_local = taken + STREAM_HELD_BYTES
        highest = receiver.highest_offset
        receiver.highest_offset = 0  # aioquic's own doubling never applies
        try:
            QuicConnection._write_stream_limits(quic, builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest

    def connection_limits(builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = quic._local_max_data
        if limit.value - limit.used < CONNECTION_WINDOW_BYTES:
            taken = limit.used - sum(unread(stream) for stream in quic._streams.values())
            if limit.value - taken < CONNECTION_WINDOW_BYTES:
                limit.value = taken + CONNECTION_HELD_BYTES
        used = limit.used
        limit.used = 0  # aioquic's own doubling never applies
        try:
            QuicConnection._write_connection_limits(quic, builder=builder, space=space)
        finally:
            limit.used = used

    quic._write_stream_limits = stream_limits  # type: ignore[method-assign]
    quic._write_connection_limits = connection_limits  # type: ignore[method-assign]


class _StreamAdapter(QuicStreamAdapter):
    """aioquic's stream transport, told when its reader has room again.

    aioquic gives a stream's `StreamReader` no transport, so the reader never
    pauses anything. With this one it calls `pause_reading` once it holds more
    than twice its limit and `resume_reading` once read down: the credit that
    reading made room for (`_grow_credit_with_reading`) then goes out at once,
    instead of with whatever packet next happens to be sent.
    """

    def pause_reading(self) -> None:
        pass  # the stream's credit already stops growing while its reader holds data

    def resume_reading(self) -> None:
        self.protocol._transmit_soon()

    def is_reading(self) -> bool:
        return True


def _may_have_to_send(quic: QuicConnection, now: float) -> bool:
    """False when a received datagram left nothing that must go out before the timer.

    A transmit that finds nothing to send still builds and drops a packet, about as
    costly as sending one; after every request and every response that was most of
    what was received (stream data, ACKs). True for anything queued that aioquic's
    `_write_application` would send: due ACKs, stream data (new, or lost and
    queued again), resets, stop requests, pings, probes, path responses, connection
    ids, and whatever the handshake and closing need. Flow-control credit is not
    checked: it follows received data, whose ACK timer transmits within 1 ms (or
    `LONE_ACK_DELAY_S` for a single packet, too little to use up a window).
    Finished streams are forgotten at the next transmit instead.
    """
    if quic._state is not QuicConnectionState.CONNECTED or not quic._handshake_complete:
        return True
    space = quic._spaces.get(Epoch.ONE_RTT)
    if space is None or (space.ack_at is not None and space.ack_at <= now):
        return True
    if (
        quic._close_pending
        or quic._ping_pending
        or quic._probe_pending
        or quic._handshake_done_pending
        or quic._streams_blocked_pending
        or quic._retire_connection_ids
        or quic._datagrams_pending
    ):
        return True
    paths = quic._network_paths
    if not paths or paths[0].remote_challenges or not paths[0].is_validated:
        return True
    if any(not cid.was_sent for cid in quic._host_cids):
        return True
    crypto = quic._crypto_streams.get(Epoch.ONE_RTT)
    if crypto is not None and not crypto.sender.buffer_is_empty:
        return True
    for stream in quic._streams_queue:
        sender = stream.sender
        if not sender.buffer_is_empty or sender.reset_pending or stream.receiver.stop_pending:
            return True
    return False


def _stream_of(writer: asyncio.StreamWriter) -> tuple[MeshProtocol | None, int]:
    transport = writer.transport
    if isinstance(transport, QuicStreamAdapter) and isinstance(transport.protocol, MeshProtocol):
        return transport.protocol, transport.stream_id
    return None, -1


def stop_waiter(writer: asyncio.StreamWriter) -> asyncio.Future[None]:
    """A future set when the peer resets this stream or asks us to stop sending on it."""
    protocol, stream_id = _stream_of(writer)
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if protocol is not None:
        protocol.stop_waiters[stream_id] = waiter
    return waiter


SEND_BUFFER_BYTES = STREAM_WINDOW_BYTES
"""What `drained` lets one stream hold unacknowledged before its writer waits."""


async def drained(writer: asyncio.StreamWriter, limit: int = SEND_BUFFER_BYTES) -> None:
    """Wait until the stream holds at most `limit` bytes not yet acknowledged by the peer.

    aioquic's writes never block: a peer that gives no credit (its reader stalled,
    or it never reads) would make us buffer all that is written. A writer that
    awaits this after each write keeps at most a window in memory.
    `ConnectionResetError` when the connection ends while waiting.
    """
    protocol, stream_id = _stream_of(writer)
    if protocol is None:
        await writer.drain()
        return
    while True:
        if protocol.closed.is_set():
            raise ConnectionResetError("the connection closed")
        stream = protocol._quic._streams.get(stream_id)
        sender = stream.sender if stream is not None else None
        if sender is None or sender._reset_error_code is not None:
            return  # gone, or reset: nothing more is held for it
        if len(sender._buffer) <= limit:
            return
        waiter = protocol._loop.create_future()
        protocol.send_waiters.append(waiter)
        await waiter


def write_last(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write `data` and end the stream (`write`, then `write_eof`) in one STREAM frame.

    The FIN goes with the data instead of in a second call into aioquic.
    """
    adapter = writer.transport
    if not isinstance(adapter, QuicStreamAdapter):
        writer.write(data)
        writer.write_eof()
    elif not adapter._closing:
        adapter._closing = True
        adapter.protocol._quic.send_stream_data(adapter.stream_id, data, end_stream=True)
        adapter.protocol._transmit_soon()


def release_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, abort: bool = False
) -> None:
    """Done with a stream: forget it; `abort`: give it up both ways."""
    protocol, stream_id = _stream_of(writer)
    if protocol is None:
        return
    protocol.release(stream_id, reader, reset=abort)
    # Nothing more goes out: a later close (StreamWriter.__del__ too) would try
    # a FIN on a stream that may be reset or discarded by now, which raises.
    writer.transport._closing = True  # type: ignore[attr-defined]


StreamHandler = Callable[[Link, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LinkHandler = Callable[[Link], Awaitable[None]]


async def _no_streams(link: Link, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """An endpoint that serves no streams (the Gossiper's) gives each up at once.

    Released, not only closed: its reader is dropped and what still arrives on
    it is discarded (`MeshProtocol.release`), instead of piling up in a reader
    nobody reads; STOP_SENDING and RESET_STREAM tell the peer.
    """
    release_stream(reader, w, abort=True)


class _CountingServer(QuicServer):
    def __init__(self, endpoint: MeshEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoint = endpoint

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        raw = cast(bytes, data)
        if len(raw) > HOST_CID_BYTES and raw[0] & 0xC0 == 0x40:
            # A 1-RTT (short header) packet, nearly every datagram: its connection
            # comes straight from the destination connection id that follows the
            # first byte, instead of parsing the header here, again in aioquic's
            # server and a third time in the connection.
            protocol = self._protocols.get(raw[1 : 1 + HOST_CID_BYTES])
            if protocol is not None:
                protocol.datagram_received(raw, addr)
                return
        try:
            header = pull_quic_header(Buffer(data=raw), host_cid_length=HOST_CID_BYTES)
        except ValueError:
            self.endpoint.counters.garbage_datagrams += 1
            return
        if header.destination_cid not in self._protocols and (
            header.packet_type != QuicPacketType.INITIAL or len(raw) < 1200
        ):
            # For no connection of ours and no valid connection attempt (a client's
            # Initial is padded to 1200 bytes): aioquic drops it silently; count it.
            self.endpoint.counters.garbage_datagrams += 1
        known = header.destination_cid in self._protocols
        super().datagram_received(data, addr)
        if not known and (protocol := self._protocols.get(header.destination_cid)) is not None:
            # aioquic has just created this connection (after the Retry, if any).
            self.endpoint._wait_for_admission(cast(MeshProtocol, protocol), str(addr[0]))


@dataclass
class MeshEndpoint:
    """Our side of QUIC: accepts admitted peers and dials others."""

    node_id: str
    """Must be `identity.node_id_of(key)`: peers check it against the key."""
    secret: bytes
    key: ec.EllipticCurvePrivateKey
    """The node's identity key (a lite client's is ephemeral); also the TLS key."""
    on_link: LinkHandler
    stream_handler: StreamHandler = _no_streams
    counters: Counters = field(default_factory=Counters)
    traffic: Traffic = field(default_factory=Traffic)
    retry: bool = True
    """Validate a client's address (a QUIC Retry, one more round trip) before keeping
    state for it: a spoofed source address gets no connection and no pending slot."""

    def __post_init__(self) -> None:
        if self.node_id != identity.node_id_of(self.key):
            raise ValueError(
                f"node id {self.node_id!r} is not the id of the key given "
                f"({identity.node_id_of(self.key)}): peers would refuse every link"
            )
        self.key_der = identity.public_der(self.key)
        self.cert = self_signed(self.key, self.node_id)
        self.cert_digest = hashlib.sha256(self.cert.public_bytes(Encoding.DER)).digest()
        self.server: QuicServer | None = None
        self.protocols: set[MeshProtocol] = set()
        self.pending: dict[MeshProtocol, str] = {}
        """Incoming connections not admitted yet, oldest first -> their source network."""
        self.throttle = WarningThrottle()

    def _config(self, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=IDLE_TIMEOUT_S,
            max_data=CONNECTION_HELD_BYTES,
            max_stream_data=STREAM_HELD_BYTES,
            connection_id_length=HOST_CID_BYTES,
        )
        if is_client:
            # Peers are authenticated by the mesh secret, not by a CA.
            config.verify_mode = ssl.CERT_NONE
        else:
            config.certificate = self.cert
            config.private_key = self.key
        return config

    def _protocol(self, quic: QuicConnection, **kwargs: Any) -> MeshProtocol:
        protocol = MeshProtocol(quic, self)
        self.protocols.add(protocol)
        return protocol

    async def listen(self, sock: socket.socket) -> None:
        """Serve on an already bound UDP socket (bound by the root, kept across restarts)."""
        loop = asyncio.get_running_loop()
        _, server = await loop.create_datagram_endpoint(
            lambda: _CountingServer(
                self,
                configuration=self._config(False),
                create_protocol=self._protocol,
                retry=self.retry,
            ),
            sock=sock,
        )
        self.server = server

    async def dial(self, host: str, port: int, timeout: float = 5.0) -> Link:
        """Connect and run admission as the client; `AdmissionError` or `OSError` on failure."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        config = self._config(True)
        config.server_name = host
        quic = QuicConnection(configuration=config)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1" if host.startswith("127.") else "", 0))
        _, protocol = await loop.create_datagram_endpoint(lambda: self._protocol(quic), sock=sock)
        assert isinstance(protocol, MeshProtocol)
        try:
            async with asyncio.timeout(timeout):
                protocol.connect(addr)
                await protocol.wait_connected()
                reader, writer = await protocol.create_stream()
                peer_id = await self._admit_outgoing(reader, writer, *_peer_certificate(protocol))
        except BaseException as exc:
            if (waiter := protocol._connected_waiter) is not None:
                # aioquic shields this future and fails it when the connection ends,
                # long after we gave up on it: take its error so asyncio does not log it.
                waiter.add_done_callback(_consume)
            protocol.close()
            protocol._transport.close()  # type: ignore[union-attr]
            if isinstance(exc, TimeoutError):
                raise AdmissionError(
                    f"{host}:{port} did not complete admission in time (the node is down, "
                    "or is not a meshllm node)"
                ) from None
            if isinstance(exc, wire.WireError):
                why = _shown(str(exc), 120)
                raise AdmissionError(f"{host}:{port} broke the admission protocol: {why}") from None
            if isinstance(exc, asyncio.IncompleteReadError) or (
                isinstance(exc, ConnectionError) and not isinstance(exc, AdmissionError)
            ):
                # The server hung up mid-admission: as much a refusal as a Refused frame
                # (and callers catch ConnectionError, not EOFError).
                raise AdmissionError(f"{host}:{port} closed the connection in admission") from None
            raise
        link = Link(protocol, peer_id, reader, writer, dialed=True, remote=(host, port))
        protocol.admitted(link)
        protocol._spawn(self._close_transport_after(protocol))
        return link

    async def _close_transport_after(self, protocol: MeshProtocol) -> None:
        # A dialed connection owns its UDP socket: release it with the connection.
        try:
            await protocol.closed.wait()
        finally:
            self.protocols.discard(protocol)
            with contextlib.suppress(Exception):
                protocol._transport.close()  # type: ignore[union-attr]

    async def _admit_outgoing(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cert: bytes,
        server_id: str,
    ) -> str:
        """Run admission as the client; the server's verified node id (that of its TLS key)."""
        nonce = os.urandom(16)
        writer.write(wire.encode_frame(wire.Hello(self.node_id, nonce, self.key_der)))
        challenge = await wire.read_frame(reader, ADMISSION_FRAME_BYTES)
        if not isinstance(challenge, wire.Challenge):
            raise AdmissionError(f"expected a challenge, got {type(challenge).__name__}")
        if challenge.node_id != server_id:
            # Checked before the MAC: a member with the secret could compute that one.
            raise AdmissionError(
                f"the peer claims node id {_shown(challenge.node_id)}, "
                f"but its certificate's key is node {server_id}"
            )
        expected = _mac(self.secret, b"server", nonce, challenge.nonce, server_id.encode(), cert)
        if not hmac.compare_digest(expected, challenge.mac):
            raise AdmissionError(
                "the peer does not hold this mesh's secret: it belongs to another mesh "
                "(is the invite token this mesh's, and current?)"
            )
        mac = _mac(self.secret, b"client", challenge.nonce, nonce, self.node_id.encode(), cert)
        signed = _transcript(nonce, challenge.nonce, cert, server_id, self.node_id)
        writer.write(wire.encode_frame(wire.Proof(mac, identity.sign(self.key, signed))))
        answer = await wire.read_frame(reader, ADMISSION_FRAME_BYTES)
        if isinstance(answer, wire.Refused):
            # Unauthenticated text from the server: quoted and cut.
            raise AdmissionError(f"refused by node {server_id}: {_shown(answer.reason, 80)}")
        if not isinstance(answer, wire.Welcome):
            raise AdmissionError(f"expected a welcome, got {type(answer).__name__}")
        return server_id

    async def _admit_incoming(
        self, protocol: MeshProtocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Run admission as the server (the connection's deadline bounds it)."""
        try:
            hello = await wire.read_frame(reader, ADMISSION_FRAME_BYTES)
            if not isinstance(hello, wire.Hello) or len(hello.nonce) != 16:
                raise AdmissionError("the first frame was not a hello")
            try:
                client_key = identity.load_public(hello.key)
            except identity.BadKey as exc:
                raise AdmissionError(f"the hello carries no usable key: {exc}") from None
            client_id = identity.node_id_of_der(hello.key)
            if hello.node_id != client_id:
                raise AdmissionError(
                    f"the hello claims node id {_shown(hello.node_id)}, "
                    f"but its key is node {client_id}"
                )
            nonce = os.urandom(16)
            cert = self.cert_digest
            mac = _mac(self.secret, b"server", hello.nonce, nonce, self.node_id.encode(), cert)
            writer.write(wire.encode_frame(wire.Challenge(self.node_id, nonce, mac)))
            proof = await wire.read_frame(reader, ADMISSION_FRAME_BYTES)
            if not isinstance(proof, wire.Proof):
                raise AdmissionError(f"expected a proof, got {type(proof).__name__}")
            expected = _mac(self.secret, b"client", nonce, hello.nonce, client_id.encode(), cert)
            if not hmac.compare_digest(expected, proof.mac):
                writer.write(wire.encode_frame(wire.Refused("wrong mesh secret")))
                raise AdmissionError(f"node {client_id} does not hold the mesh secret")
            signed = _transcript(hello.nonce, nonce, cert, self.node_id, client_id)
            if not identity.verify(client_key, proof.signature, signed):
                writer.write(wire.encode_frame(wire.Refused("bad signature")))
                raise AdmissionError(f"node {client_id} did not sign this admission with its key")
            writer.write(wire.encode_frame(wire.Welcome()))
        except AdmissionError as exc:
            protocol.refuse(str(exc))
            return
        except (wire.WireError, asyncio.IncompleteReadError) as exc:
            # A decoder's message can quote what the peer sent (a union tag).
            protocol.refuse(_shown(str(exc), 120))
            return
        link = Link(protocol, client_id, reader, writer, False, protocol.remote_address())
        protocol.admitted(link)
        await self.on_link(link)

    def warn(self, msg: str, *args: object) -> None:
        """Log a warning about a peer, throttled (`WarningThrottle`): strangers can cause many."""
        suppressed = self.throttle.allow(time.monotonic())
        if suppressed is None:
            self.counters.warnings_suppressed += 1
        elif suppressed:
            log.warning(msg + " (and %d similar warnings left out)", *args, suppressed)
        else:
            log.warning(msg, *args)

    def _wait_for_admission(self, protocol: MeshProtocol, address: str) -> None:
        """A new incoming connection: pending until admitted.

        Over `MAX_PENDING`, one waiting connection is closed to make room: the
        oldest of the source network with the most waiting (of those, the one
        whose oldest connection is oldest). Refusing the newest instead would let
        a stranger who keeps the slots full refuse every member; closing the
        oldest of all would let it evict a member by connecting fast enough. This
        way a flood from a few networks (one attacker usually holds a whole /24
        or /64) takes room only from itself.
        """
        if len(self.pending) >= MAX_PENDING:
            by_source: dict[str, list[MeshProtocol]] = {}
            for pending, source in self.pending.items():  # oldest first
                by_source.setdefault(source, []).append(pending)
            crowd = max(by_source.values(), key=len)  # the first of the largest: oldest
            self._evict(crowd[0], len(crowd), self.pending[crowd[0]])
        self.pending[protocol] = source_prefix(address)

    def _evict(self, protocol: MeshProtocol, crowd: int, source: str) -> None:
        """Close a connection still waiting for admission, to make room for a newer one."""
        del self.pending[protocol]
        self.counters.over_pending_cap += 1
        protocol.refused = True  # not an admission failure: counted here
        self.warn(
            "closed a connection from %s waiting for admission: %d waiting, the most (%d) from %s",
            protocol.remote_address()[0],
            MAX_PENDING,
            crowd,
            source,
        )
        protocol.close(
            error_code=QuicErrorCode.CONNECTION_REFUSED,
            reason_phrase="too many connections waiting for admission",
        )
        with contextlib.suppress(Exception):
            protocol.transmit()

    def close(self) -> None:
        for protocol in list(self.protocols):
            protocol.close()
        if self.server is not None:
            self.server.close()
