"""The one HTTP/1.1 response parser: every upstream response meshllm reads goes through it.

Built on httptools (llhttp), which decodes Content-Length, chunked and
close-delimited bodies and hands body bytes over as they arrive, so a chunk
of any size costs no memory here. What llhttp does not bound, this does: the
bytes a response may send without reaching the next step (the head, a
chunk-size line, the trailers) are capped at `MAX_HEAD_BYTES`, so a server
that never ends its head cannot grow a buffer. The Proxy's upstream client
(`meshllm.http.upstream`), and through it the Tunnel and the console, and the
benchmark's load generator all subclass `ResponseReader`.
"""

from __future__ import annotations

import httptools

MAX_HEAD_BYTES = 64 * 1024
"""Head, trailers, or any other stretch without a body byte, at most this many bytes."""
MAX_HEADERS = 100
"""Header fields in a head (and, apart, in the trailers): llama-server sends about ten.
Without it, 64 KiB of empty headers would be thousands of stored pairs."""
CHUNK_HOLD_BYTES = 1024 * 1024
"""A chunk is passed on whole (an SSE event is never cut in two) up to this size."""


class ResponseError(ValueError):
    """The response breaks HTTP/1.1 or one of the bounds above."""


class ResponseReader:
    """One connection's responses, parsed as they arrive; one response at a time.

    Call `expect()` before each request, then `feed()` every byte received.
    After the head: `status`, `headers` (names lower-cased), `length` (None:
    chunked, or until the server closes), `chunked`, `keep_alive`. Body bytes
    are appended to `pieces` (override `body_piece` to do otherwise); `done` is
    set when the response is complete. The pieces of a chunked body are whole
    chunks (up to `CHUNK_HOLD_BYTES`), so an upstream that breaks off in the
    middle of a chunk never passes half an SSE event on. A body delimited by
    the connection closing is complete when `closed_cleanly()` is called.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = False
        self.head_done = False
        self.done = False
        self.pieces: list[bytes] = []
        self._chunk: list[bytes] = []
        self._chunk_bytes = 0
        self._no_body = False
        self._head_bytes = 0
        self._header_count = 0
        self._stalled = 0
        self._progress = False

    def expect(self, no_body: bool = False) -> None:
        """Start on a new response; `no_body`: it answers a HEAD request."""
        self.status = 0
        self.headers = []
        self.length = None
        self.chunked = False
        self.keep_alive = False
        self.head_done = False
        self.done = False
        self.pieces = []
        self._chunk = []
        self._chunk_bytes = 0
        self._no_body = no_body
        self._head_bytes = 0
        self._header_count = 0
        self._stalled = 0

    def feed(self, data: bytes) -> None:
        """Parse received bytes; `ResponseError` if the response is broken or too big."""
        self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ResponseError):
                raise cause from None
            raise ResponseError(f"{exc}: {cause!r}") from None
        except httptools.HttpParserUpgrade:
            raise ResponseError("the server switched protocols") from None
        except httptools.HttpParserError as exc:
            raise ResponseError(str(exc)) from None
        if self._progress:
            self._stalled = 0
        else:
            self._stalled += len(data)
            if self._stalled > MAX_HEAD_BYTES:
                raise ResponseError(
                    f"head, chunk line or trailers too large (over {MAX_HEAD_BYTES} bytes)"
                )

    def closed_cleanly(self) -> bool:
        """The server closed: True if that completes the response (a close-delimited body)."""
        if self.head_done and not self.done and self.length is None and not self.chunked:
            self.done = True
        return self.done

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second response in one read: nothing was asked for it.
            raise ResponseError("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._header_count += 1
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ResponseError(
                f"response head or trailers too large (over {MAX_HEAD_BYTES} bytes)"
            )
        if self._header_count > MAX_HEADERS:
            raise ResponseError(f"too many header or trailer fields (over {MAX_HEADERS})")
        if self.head_done:
            return  # a trailer: nothing here uses them
        name = name.lower()
        if name == b"content-length":
            self.length = int(value)
        elif name == b"transfer-encoding":
            # As llhttp decides: chunked when the last coding listed is "chunked".
            self.chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue): the real head follows.
            self.headers = []
            self.length = None
            self.chunked = False
            self._header_count = 0
            return
        self._progress = True
        self.status = status
        self.head_done = True
        self._head_bytes = self._header_count = 0  # from here on they count trailers
        self.keep_alive = self._parser.should_keep_alive()
        if self.chunked:
            self.length = None
        elif self.length is None:
            self.keep_alive = False  # until the server closes
        if self._no_body or status in (204, 304):
            self.length, self.chunked = 0, False
            self.done = True
            if self._no_body:
                # llhttp cannot be told a response answers a HEAD: it would take
                # the next bytes as the body. The connection is not reused.
                self.keep_alive = False

    def body_piece(self, data: bytes) -> None:
        """A piece of the body: a whole chunk, or what arrived of a sized body."""
        self.pieces.append(data)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self.done:
            return  # a body the response to a HEAD request must not have
        if not self.chunked:
            self.body_piece(body)
            return
        self._chunk.append(body)
        self._chunk_bytes += len(body)
        if self._chunk_bytes > CHUNK_HOLD_BYTES:
            self._flush_chunk()

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_chunk_complete(self) -> None:
        self._progress = True
        if self._chunk:
            self._flush_chunk()

    def _flush_chunk(self) -> None:
        chunk = self._chunk
        self.body_piece(chunk[0] if len(chunk) == 1 else b"".join(chunk))
        self._chunk = []
        self._chunk_bytes = 0

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an interim response
        self._progress = True
        self.done = True
