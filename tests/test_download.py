"""The downloader, only ever against a local HTTP server started here on 127.0.0.1 (port 0):
full downloads, resuming with Range after a dropped connection, a server that ignores Range,
redirects, size and sha256 checks, HTTP errors, being offline, and the atomic write."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshllm.models import download as download_mod
from meshllm.models.download import (
    DownloadError,
    TerminalProgress,
    download_file,
    format_bytes,
    part_path,
    terminal_progress,
    throttled,
)
from meshllm.models.files import download_model

DATA = os.urandom(300_000) + bytes(range(256)) * 100
SHA = hashlib.sha256(DATA).hexdigest()
TIMEOUT = 5.0


@dataclass
class Behaviour:
    """How the server treats one path."""

    ignore_range: bool = False
    drop_after: list[int] = field(default_factory=list)
    """For the next requests, one each: body bytes to send before the connection drops."""
    reset: bool = False
    """Drop with a TCP reset (the reader sees ECONNRESET) rather than a clean close."""
    statuses: list[int] = field(default_factory=list)
    """For the next requests, one each: answer with this error status instead."""
    redirect_to: str | None = None
    stall_s: float = 0.0
    """Wait this long before answering (bounded by the server's stop event)."""


class FileServer:
    """A tiny HTTP file server with Range support and scripted misbehaviour."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        handler = type("Handler", (_Handler,), {"fs": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ranges(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    fs: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        fs = self.fs
        range_header = self.headers.get("Range")
        with fs.lock:
            fs.requests.append((self.path, range_header))
            b = fs.behaviour.setdefault(self.path, Behaviour())
            status = b.statuses.pop(0) if b.statuses else None
            drop = b.drop_after.pop(0) if b.drop_after else None
        if b.stall_s:
            fs.stop.wait(b.stall_s)
        if status is not None:
            self.send_error(status)
            return
        if b.redirect_to:
            self.send_response(302)
            self.send_header("Location", b.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = fs.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header and not b.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert m, range_header
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if drop is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:drop])
        self.wfile.flush()
        self.close_connection = True
        if b.reset:
            fs.stop.wait(0.3)  # let the client read what was sent: a reset discards the rest
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


@pytest.fixture
def server() -> Iterator[FileServer]:
    fs = FileServer()
    fs.files["/model.gguf"] = DATA
    fs.thread.start()
    try:
        yield fs
    finally:
        fs.stop.set()
        fs.httpd.shutdown()
        fs.httpd.server_close()
        fs.thread.join(timeout=5)
        assert not fs.thread.is_alive()


@pytest.fixture
def delays() -> list[float]:
    return []


def fetch(fs: FileServer, dest: Path, delays: list[float], **kwargs: object) -> Path:
    kwargs.setdefault("timeout", TIMEOUT)
    return download_file(
        fs.url(str(kwargs.pop("path", "/model.gguf"))),
        dest,
        sleep=delays.append,
        **kwargs,  # type: ignore[arg-type]
    ).path


def test_full_download_with_checks_and_progress(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "models" / "model.gguf"  # the directory is created
    out = fetch(
        server,
        dest,
        delays,
        expected_size=len(DATA),
        sha256=SHA.upper(),
        progress=lambda done, total: seen.append((done, total)),
        chunk_size=64 * 1024,
    )
    assert out == dest
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()
    assert server.ranges("/model.gguf") == [None]
    assert seen[0] == (0, len(DATA))
    assert seen[-1] == (len(DATA), len(DATA))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert delays == []


def test_unknown_size_and_digest_still_downloads(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    dest = fetch(server, tmp_path / "m.gguf", delays)
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_dropped_connection_resumes_with_range(
    server: FileServer, tmp_path: Path, delays: list[float], reset: bool
) -> None:
    half = len(DATA) // 2
    server.behaviour["/model.gguf"] = Behaviour(drop_after=[half], reset=reset)
    chunk = 16 * 1024
    dest = fetch(
        server,
        tmp_path / "m.gguf",
        delays,
        expected_size=len(DATA),
        sha256=SHA,
        chunk_size=chunk,
    )
    assert dest.read_bytes() == DATA
    ranges = server.ranges("/model.gguf")
    assert ranges[0] is None
    assert len(ranges) == 2
    m = re.fullmatch(r"bytes=(\d+)-", ranges[1] or "")
    assert m, ranges
    # A clean close delivers every byte sent; a reset loses the chunk being read.
    resumed_at = int(m.group(1))
    assert resumed_at == half if not reset else half - chunk <= resumed_at <= half
    assert delays == [1.0]


def test_interrupted_download_leaves_part_then_resumes(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    server.behaviour["/model.gguf"] = Behaviour(drop_after=[100_000])
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match="run the same command again to resume") as info:
        fetch(server, dest, delays, expected_size=len(DATA), sha256=SHA, retries=0)
    assert "connection closed after 100000" in str(info.value)
    # Atomic: no final file, and the partial one is kept for the next attempt.
    assert not dest.exists()
    assert part_path(dest).read_bytes() == DATA[:100_000]

    fetch(server, dest, delays, expected_size=len(DATA), sha256=SHA)
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()
    assert server.ranges("/model.gguf") == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_from_zero(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    server.behaviour["/model.gguf"] = Behaviour(ignore_range=True)
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(b"stale bytes from another attempt")
    fetch(server, dest, delays, expected_size=len(DATA), sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.ranges("/model.gguf") == ["bytes=32-"]


def test_server_ignoring_range_and_dropping_gives_up_after_the_retries(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    # Every attempt restarts from zero and dies at the same byte: no progress, so bounded.
    server.behaviour["/model.gguf"] = Behaviour(ignore_range=True, drop_after=[1000] * 10)
    with pytest.raises(DownloadError, match="failed after 3 retries"):
        fetch(server, tmp_path / "m.gguf", delays, expected_size=len(DATA), retries=3)
    assert len(server.ranges("/model.gguf")) == 4
    assert delays == [1.0, 2.0, 4.0]


def test_a_complete_part_needs_no_request(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(DATA)
    fetch(server, dest, delays, expected_size=len(DATA), sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.ranges("/model.gguf") == []


def test_a_complete_part_of_unknown_size_is_detected_by_416(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(DATA)
    fetch(server, dest, delays)
    assert dest.read_bytes() == DATA
    assert server.ranges("/model.gguf") == [f"bytes={len(DATA)}-"]


def test_a_part_longer_than_the_file_restarts(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(DATA + b"extra")
    fetch(server, dest, delays)  # size unknown: the 416 reply shows the part is wrong
    assert dest.read_bytes() == DATA
    assert server.ranges("/model.gguf") == [f"bytes={len(DATA) + 5}-", None]


def test_redirects_are_followed_and_keep_the_range(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    server.behaviour["/resolve/model.gguf"] = Behaviour(redirect_to=server.url("/model.gguf"))
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(DATA[:5000])
    fetch(server, dest, delays, path="/resolve/model.gguf", expected_size=len(DATA), sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.ranges("/resolve/model.gguf") == ["bytes=5000-"]
    assert server.ranges("/model.gguf") == ["bytes=5000-"]


def test_server_errors_are_retried(server: FileServer, tmp_path: Path, delays: list[float]) -> None:
    server.behaviour["/model.gguf"] = Behaviour(statuses=[503, 502])
    dest = fetch(server, tmp_path / "m.gguf", delays, expected_size=len(DATA))
    assert dest.read_bytes() == DATA
    assert delays == [1.0, 2.0]


def test_size_mismatch(server: FileServer, tmp_path: Path, delays: list[float]) -> None:
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=f"size mismatch.*{len(DATA)} bytes.*{len(DATA) + 1}"):
        fetch(server, dest, delays, expected_size=len(DATA) + 1)
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert len(server.ranges("/model.gguf")) == 1  # refused before the body, not retried


def test_sha256_mismatch(server: FileServer, tmp_path: Path, delays: list[float]) -> None:
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=f"sha256 mismatch: got {SHA}"):
        fetch(server, dest, delays, expected_size=len(DATA), sha256="0" * 64)
    assert not dest.exists()
    assert not part_path(dest).exists()  # a wrong file is not kept for resuming


def test_not_found(server: FileServer, tmp_path: Path, delays: list[float]) -> None:
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=r"HTTP 404.*no such file"):
        fetch(server, dest, delays, path="/missing.gguf")
    assert server.ranges("/missing.gguf") == [None]  # not retried
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_forbidden_mentions_gated_repositories(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    server.behaviour["/model.gguf"] = Behaviour(statuses=[403])
    with pytest.raises(DownloadError, match=r"HTTP 403.*gated or private"):
        fetch(server, tmp_path / "m.gguf", delays)


def test_connection_refused_is_a_clear_offline_error(tmp_path: Path, delays: list[float]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=f"connection to 127.0.0.1:{port} refused"):
        download_file(f"http://127.0.0.1:{port}/m.gguf", dest, timeout=TIMEOUT, sleep=delays.append)
    assert delays == []  # no retrying when there is no server at all
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_dns_failure_says_offline(
    tmp_path: Path, delays: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dns(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(DownloadError, match=r"cannot resolve huggingface.co.*offline"):
        download_file(
            "https://huggingface.co/o/r/resolve/main/m.gguf",
            tmp_path / "m.gguf",
            timeout=TIMEOUT,
            sleep=delays.append,
        )
    assert delays == []


def test_a_stalled_server_times_out_and_gives_up(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    server.behaviour["/model.gguf"] = Behaviour(stall_s=10.0)
    with pytest.raises(DownloadError, match=r"failed after 1 retries.*timed out"):
        fetch(server, tmp_path / "m.gguf", delays, timeout=0.3, retries=1)
    assert delays == [1.0]


def test_backoff_is_capped(server: FileServer, tmp_path: Path, delays: list[float]) -> None:
    server.behaviour["/model.gguf"] = Behaviour(statuses=[503] * 5)
    fetch(server, tmp_path / "m.gguf", delays, retries=5, backoff_s=2.0, max_backoff_s=5.0)
    assert delays == [2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_second_download_of_the_same_file_is_refused(
    server: FileServer, tmp_path: Path, delays: list[float]
) -> None:
    dest = tmp_path / "m.gguf"
    with open(part_path(dest), "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another process is already downloading"):
            fetch(server, dest, delays)
    assert server.ranges("/model.gguf") == []
    assert part_path(dest).exists()  # the other process's file is left alone


def test_not_an_http_url(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not an http"):
        download_file("ftp://example.invalid/m.gguf", tmp_path / "m.gguf")


def test_not_enough_disk_space(
    server: FileServer, tmp_path: Path, delays: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = download_mod.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        download_mod.shutil, "disk_usage", lambda _p: usage._replace(free=len(DATA) - 1)
    )
    with pytest.raises(DownloadError, match="not enough disk space"):
        fetch(server, tmp_path / "m.gguf", delays, expected_size=len(DATA))


def test_download_model_from_a_url_into_the_models_dir(server: FileServer, tmp_path: Path) -> None:
    path = download_model(server.url("/model.gguf"), tmp_path / "models", timeout=TIMEOUT)
    assert path == tmp_path / "models" / "model.gguf"
    assert path.read_bytes() == DATA
    # Already there: nothing is fetched again.
    assert download_model(server.url("/model.gguf"), tmp_path / "models") == path
    assert server.ranges("/model.gguf") == [None]


# --- progress --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_terminal_progress_renders_percent_rate_and_eta() -> None:
    out = io.StringIO()
    clock = FakeClock()
    bar = TerminalProgress("model.gguf", out, width=10, clock=clock)
    bar(0, 4_000_000_000)
    clock.now += 10
    bar(1_000_000_000, 4_000_000_000)
    line = out.getvalue().split("\r")[-1]
    assert "model.gguf" in line
    assert "[##--------]" in line
    assert "25.0%" in line
    assert "1.00 GB/4.00 GB" in line
    assert "100.00 MB/s" in line
    assert "ETA 0:30" in line
    bar.close()
    assert out.getvalue().endswith("\n")


def test_terminal_progress_throttles_redraws() -> None:
    out = io.StringIO()
    clock = FakeClock()
    bar = TerminalProgress("m", out, clock=clock, min_interval_s=1.0)
    for i in range(100):
        bar(i, 1000)
    assert out.getvalue().count("\r") == 1
    bar(1000, 1000)  # the end is always drawn
    assert out.getvalue().count("\r") == 2
    assert "100.0%" in out.getvalue().split("\r")[-1]


def test_terminal_progress_of_unknown_size() -> None:
    out = io.StringIO()
    bar = TerminalProgress("m", out, clock=FakeClock())
    bar(5_000_000, None)
    assert "5.00 MB" in out.getvalue()
    assert "%" not in out.getvalue()


def test_terminal_progress_only_on_a_terminal() -> None:
    assert terminal_progress("m", io.StringIO()) is None

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(terminal_progress("m", Tty()), TerminalProgress)


def test_throttled_forwards_few_reports_and_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(download_mod.time, "monotonic", clock)
    got: list[tuple[int, int | None]] = []
    report = throttled(lambda d, t: got.append((d, t)), min_interval_s=1.0)
    for i in range(10):
        report(i, 10)
    clock.now += 1.5
    report(5, 10)
    report(10, 10)
    assert got == [(0, 10), (5, 10), (10, 10)]


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1_929_903_264) == "1.93 GB"
    assert format_bytes(19_851_336_576) == "19.85 GB"
    assert format_bytes(2.5e12) == "2.50 TB"


def test_remote_size_reads_content_length_and_says_none_when_unreachable(tmp_path: Path) -> None:
    import http.server
    import threading

    from meshllm.models.download import remote_size

    class Head(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "12345")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert remote_size(f"http://127.0.0.1:{port}/m.gguf") == 12345
    finally:
        server.shutdown()
        server.server_close()
    assert remote_size(f"http://127.0.0.1:{port}/m.gguf", timeout=1) is None
