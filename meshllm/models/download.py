"""Resumable, verified downloads of model files over HTTP(S), with the standard library only.

`download_file(url, dest)` writes into `dest + ".part"` and renames it to `dest` only once every
byte is there and checked (size, and SHA-256 when known), so a model file in the models
directory is always whole. An interrupted download leaves the `.part` behind; the next call
resumes it with an HTTP `Range` request (a server that ignores `Range` answers 200 with the
whole file, and the download restarts from zero). A connection dropped mid-transfer is retried
a bounded number of times with exponential backoff, resuming each time from where it stopped.
Failures that retrying cannot fix (offline, DNS, HTTP 4xx, wrong size or digest) raise
`DownloadError` at once, with a message that says what happened and what to do.

The URL, and so the server, may come from a peer (a model proposed in gossip, with its size
and SHA-256), so nothing the server says is trusted: redirects go to http(s) only and at most
`MAX_REDIRECTS` times; the size is checked before and after; the file lands only at `dest`
and never replaces a file already there (one with the expected digest is simply kept); a full
disk (ENOSPC) ends the download at once, with the partial file removed, instead of being
retried like a dropped connection. `DownloadError.permanent` tells a caller whether trying
again later could help.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO
from urllib.parse import urljoin, urlsplit

from meshllm import __version__
from meshllm.placement.memory import format_bytes
from meshllm.runtime.backoff import Backoff

log = logging.getLogger("meshllm.models.download")

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes of the file on disk so far, total size or None when unknown)."""

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 5
CHUNK_SIZE = 1 << 20
MAX_REDIRECTS = 5
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_CONTENT_RANGE_UNSATISFIED = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


class DownloadError(RuntimeError):
    """A download that failed; the message says why and, where possible, what to do.

    `permanent` is False for failures that trying again later may fix (the server was down or
    kept dropping the connection, another process holds the file); True for the rest (HTTP
    4xx, wrong size or digest, a refused redirect, a full disk, a file already in the way).
    """

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Downloaded:
    """A finished, checked download: where it is, its size and its SHA-256 (lowercase hex)."""

    path: Path
    size: int
    sha256: str


class _Transient(Exception):
    """A failure worth retrying (the connection dropped, timed out, or the server hiccupped)."""


class _ConnectFailed(Exception):
    """No connection at all (DNS, refused, unreachable): fatal, unless a retry is under way."""


def part_path(dest: str | os.PathLike[str]) -> Path:
    """Where the partial file of a download to `dest` lives."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    chunk_size: int = CHUNK_SIZE,
    sleep: Callable[[float], None] = time.sleep,
) -> Downloaded:
    """Download `url` to `dest` atomically, resuming a `.part` left by an earlier attempt;
    the file's path, size and SHA-256 (computed once the file is whole, so a node can
    announce the digest of a model it fetched without one).

    `timeout` bounds connecting and each read (seconds). `retries` bounds the consecutive
    failed attempts after a dropped connection (an attempt that receives bytes resets the
    count); the wait between them doubles from `backoff_s` up to `max_backoff_s`.
    Raises `DownloadError`.
    """
    dest = Path(dest)
    part = part_path(dest)
    if _exists(dest):
        return _keep_existing(dest, expected_size, sha256)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted at the .part's name is not written through.
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from exc
    # Unbuffered: a full disk shows up at the write that hit it, not at a later close.
    with os.fdopen(fd, "r+b", buffering=0) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"another process is already downloading {dest.name} (into {part})",
                permanent=False,
            ) from None
        try:
            try:
                if expected_size is not None:
                    _check_disk_space(part, expected_size - os.fstat(f.fileno()).st_size)
                _Transfer(
                    url,
                    f,
                    part=part,
                    expected_size=expected_size,
                    progress=progress,
                    timeout=timeout,
                    retries=retries,
                    backoff_s=backoff_s,
                    max_backoff_s=max_backoff_s,
                    chunk_size=chunk_size,
                    sleep=sleep,
                ).run()
                os.fsync(f.fileno())
                digest = _verify(f, part, expected_size, sha256)
                size = os.fstat(f.fileno()).st_size
                _publish(part, dest, digest)
            except OSError as exc:  # the transfer's network errors are handled inside it
                raise _write_error(exc, part, dest) from None
        except BaseException:
            # Keep a partial file for the next attempt to resume, but not an empty one.
            with contextlib.suppress(OSError):
                if part.exists() and os.fstat(f.fileno()).st_size == 0:
                    part.unlink()
            raise
    return Downloaded(dest, size, digest)


def _write_error(exc: OSError, part: Path, dest: Path) -> DownloadError:
    """The error for a failed write; a full disk removes the partial file (retrying cannot
    help until someone frees space, and the partial file only takes more of it)."""
    if exc.errno in _NO_SPACE:
        part.unlink(missing_ok=True)
        return DownloadError(
            f"disk full while downloading {dest.name} into {dest.parent} ({exc.strerror}); "
            "the partial file was removed: free some space and try again"
        )
    return DownloadError(f"cannot write {part}: {exc.strerror or exc}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (lowercase hex) of a file on disk."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _keep_existing(dest: Path, expected_size: int | None, sha256: str | None) -> Downloaded:
    """A file is already at `dest`: keep it if it is the expected one, else refuse (an
    existing file is never replaced, whatever the download's source)."""
    if dest.is_symlink() or not dest.is_file():
        raise DownloadError(f"{dest} already exists and is not a regular file; it is not replaced")
    size = dest.stat().st_size
    if not sha256:
        raise DownloadError(
            f"{dest} already exists and no sha256 is known to check it against; it is not "
            "replaced: move it away to download this model"
        )
    digest = file_sha256(dest) if expected_size in (None, size) else None
    if digest != sha256.lower():
        found = f"{size} bytes" + (f", sha256 {digest}" if digest else "")
        wanted = f"{expected_size} bytes, " if expected_size is not None else ""
        raise DownloadError(
            f"{dest} already exists with different contents ({found}; expected {wanted}"
            f"sha256 {sha256.lower()}); it is not replaced: move it away to download this model"
        )
    return Downloaded(dest, size, digest)


def _publish(part: Path, dest: Path, digest: str) -> None:
    """Move the finished `.part` to `dest` without replacing anything that appeared there
    meanwhile: a hard link fails if `dest` exists (a rename would silently replace it)."""
    try:
        os.link(part, dest, follow_symlinks=False)
    except FileExistsError:
        part.unlink(missing_ok=True)
        _keep_existing(dest, None, digest)  # the same file from elsewhere is fine
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if _exists(dest):  # no hard links on this file system: check, then rename
            part.unlink(missing_ok=True)
            _keep_existing(dest, None, digest)
            return
        os.replace(part, dest)
        return
    part.unlink()


def remote_size(url: str, timeout: float = 3.0) -> int | None:
    """The size a HEAD request reports for `url`, or None (no answer, no Content-Length).

    Used to learn the size of a model seeded by URL before anyone downloads it,
    so that nodes can tell whether it fits them.
    """
    request = urllib.request.Request(url, method="HEAD")
    opener = urllib.request.build_opener(_RedirectHandler)
    try:
        with opener.open(request, timeout=timeout) as response:
            return _int_header(response.headers.get("content-length"))
    except (OSError, ValueError, http.client.HTTPException, DownloadError):
        return None


def _verify(f: io.FileIO, part: Path, expected_size: int | None, sha256: str | None) -> str:
    """Check the finished `.part` and return its SHA-256; a wrong one is removed (resuming
    it could never help)."""
    size = os.fstat(f.fileno()).st_size
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"size mismatch: got {size} bytes, expected {expected_size}; the partial file was "
            "removed (the file on the server may have changed: check the catalog entry)"
        )
    f.seek(0)
    digest = hashlib.file_digest(f, "sha256").hexdigest()
    if sha256 and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"sha256 mismatch: got {digest}, expected {sha256.lower()}; the partial file "
            "was removed (corrupted transfer, or the file on the server changed)"
        )
    return digest


class _Transfer:
    """The retry loop of one download into an open, locked `.part` file."""

    def __init__(
        self,
        url: str,
        f: io.FileIO,
        *,
        part: Path,
        expected_size: int | None,
        progress: ProgressCallback | None,
        timeout: float,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        chunk_size: int,
        sleep: Callable[[float], None],
    ) -> None:
        self.url = url
        self.f = f
        self.part = part
        self.expected_size = expected_size
        self.progress = progress
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.chunk_size = chunk_size
        self.sleep = sleep
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise DownloadError(f"cannot download {url!r}: not an http(s) URL")
        self.host = split.hostname
        self.port = split.port or (443 if split.scheme == "https" else 80)
        self.opener = urllib.request.build_opener(_RedirectHandler)

    def run(self) -> None:
        # The delay doubles with each consecutive failure; a try that got bytes resets it.
        policy = Backoff(base_s=self.backoff_s, max_s=self.max_backoff_s)
        while True:
            offset = self._size_on_disk()
            if self.expected_size is not None:
                if offset == self.expected_size:
                    return
                if offset > self.expected_size:
                    log.warning("%s is larger than expected; restarting from zero", self.part)
                    self._truncate()
                    offset = 0
            before = offset
            try:
                if self._attempt(offset):
                    return
                # A restart (range refused): bounded like any other failure.
                reason = "the server refused to resume; restarting from zero"
            except _ConnectFailed as exc:
                if not policy.recent:
                    raise DownloadError(
                        f"cannot download {self.url}: {exc}", permanent=False
                    ) from None
                reason = str(exc)
            except _Transient as exc:
                reason = str(exc)
                if self._size_on_disk() > before:
                    policy.reset()
            delay = policy.failed(time.monotonic())
            failures = len(policy.recent)
            if failures > self.retries:
                kept = self._size_on_disk()
                raise DownloadError(
                    f"download of {self.url} failed after {self.retries} retries: {reason}; "
                    f"{kept} bytes are kept in {self.part}: run the same command again to resume",
                    permanent=False,
                )
            log.warning(
                "download of %s: %s; retry %d/%d in %.1fs",
                self.url,
                reason,
                failures,
                self.retries,
                delay,
            )
            self.sleep(delay)

    def _size_on_disk(self) -> int:
        return self.f.seek(0, os.SEEK_END)

    def _truncate(self, size: int = 0) -> None:
        self.f.truncate(size)
        self.f.seek(size)

    def _attempt(self, offset: int) -> bool:
        """One request; True when the file is complete, False when it must restart."""
        headers = {"User-Agent": f"meshllm/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                return self._http_error(exc, offset)
        except urllib.error.URLError as exc:
            raise self._connect_error(exc.reason) from None
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            raise _Transient(f"connection failed: {_describe(exc)}") from None
        with response:
            return self._receive(response, offset)

    def _http_error(self, exc: urllib.error.HTTPError, offset: int) -> bool:
        code = exc.code
        if code == 416 and offset:
            # Nothing left to send from `offset`: the .part may already be the whole file
            # (its size unknown to us), or the file on the server is now shorter.
            m = _CONTENT_RANGE_UNSATISFIED.match(exc.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                return True
            self._truncate()
            return False
        if code in (408, 425, 429) or code >= 500:
            raise _Transient(f"HTTP {code} {_phrase(exc.reason)}")
        if 300 <= code < 400:
            # urllib refuses some redirects itself (file://, a loop, too many) with the 3xx.
            location = urljoin(exc.url or self.url, exc.headers.get("Location") or "")
            if not _is_http_url(location):
                raise DownloadError(_not_http_redirect(self.url, location))
            raise DownloadError(
                f"cannot download {self.url}: more than {MAX_REDIRECTS} redirects (HTTP {code})"
            )
        hint = ""
        if code == 404:
            hint = ": no such file (check the repository and file name)"
        elif code in (401, 403):
            hint = ": access denied (the repository may be gated or private)"
        raise DownloadError(f"cannot download {self.url}: HTTP {code} {_phrase(exc.reason)}{hint}")

    def _connect_error(self, reason: object) -> Exception:
        where = f"{self.host}:{self.port}"
        if isinstance(reason, socket.gaierror):
            return _ConnectFailed(
                f"cannot resolve {self.host} ({reason.strerror or reason}): "
                "are you offline? Check the network and DNS, then run again"
            )
        if isinstance(reason, ConnectionRefusedError):
            return _ConnectFailed(f"connection to {where} refused: is the server up?")
        if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return _ConnectFailed(
                f"network unreachable while connecting to {where}: are you offline?"
            )
        if isinstance(reason, ssl.SSLCertVerificationError):
            return DownloadError(f"cannot download {self.url}: TLS verification failed: {reason}")
        if isinstance(reason, BaseException):
            return _Transient(f"connection to {where} failed: {_describe(reason)}")
        return _Transient(f"connection to {where} failed: {reason}")

    def _receive(self, response: http.client.HTTPResponse, offset: int) -> bool:
        status = response.status
        length = _int_header(response.headers.get("Content-Length"))
        total: int | None
        if status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m:
                raise DownloadError(f"cannot download {self.url}: bad Content-Range in reply")
            start = int(m.group(1))
            total = None if m.group(3) == "*" else int(m.group(3))
            if start != offset:
                if start > offset:
                    self._truncate()
                    return False
                self._truncate(start)  # the server resends a little: take it from there
                offset = start
        elif status == 200:
            if offset:
                log.info("server ignored the Range request for %s; restarting from zero", self.url)
                self._truncate()
                offset = 0
            total = length
        else:
            raise DownloadError(f"cannot download {self.url}: unexpected HTTP {status}")

        if total is not None and self.expected_size is not None and total != self.expected_size:
            raise DownloadError(
                f"size mismatch: the server has {total} bytes for {self.url}, expected "
                f"{self.expected_size} (the file may have changed: check the catalog entry)"
            )
        total = total if total is not None else self.expected_size
        if total is not None:
            _check_disk_space(self.part, total - offset)

        self.f.seek(offset)
        received = 0
        if self.progress:
            self.progress(offset, total)
        while True:
            try:
                chunk = response.read(self.chunk_size)
            except (TimeoutError, http.client.HTTPException, OSError) as exc:
                raise _Transient(
                    f"connection dropped after {offset + received} bytes: {_describe(exc)}"
                ) from None
            if not chunk:
                break
            if total is not None and offset + received + len(chunk) > total:
                self._truncate()  # what this server sent is not the file: keep none of it
                raise DownloadError(
                    f"size mismatch: the server sent more than the {total} bytes expected "
                    f"for {self.url}"
                )
            self._write(chunk)  # an OSError here is the disk's, not the connection's
            received += len(chunk)
            if self.progress:
                self.progress(offset + received, total)
        if length is not None and received < length:
            raise _Transient(
                f"connection closed after {offset + received} of {offset + length} bytes"
            )
        if total is not None and offset + received < total:
            raise _Transient(f"connection closed after {offset + received} of {total} bytes")
        return True

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            written = self.f.write(view)
            if not written:  # None (not for a file) or 0: no progress is a full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows at most `MAX_REDIRECTS` redirects, and only to http(s) URLs (urllib's own
    handler also follows ftp://, and its limit is 10)."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not _is_http_url(newurl):
            raise DownloadError(_not_http_redirect(req.full_url, newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _phrase(reason: object) -> str:
    """A server's reason phrase, made safe for logs and `ctl status` (the server may be a
    peer's choice: its text could hold terminal escapes)."""
    text = str(reason)[:80]
    return "".join(c if c.isprintable() else "?" for c in text)


def _is_http_url(url: str) -> bool:
    try:
        split = urlsplit(url)
    except ValueError:
        return False
    return split.scheme.lower() in ("http", "https") and bool(split.hostname)


def _not_http_redirect(url: str, location: str) -> str:
    return (
        f"cannot download {url}: the server redirects to {location[:200]!r}, which is not "
        "an http(s) URL"
    )


def _check_disk_space(part: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    if needed > free:
        raise DownloadError(
            f"not enough disk space in {part.parent}: {format_bytes(needed)} more needed, "
            f"{format_bytes(free)} free"
        )


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete read"
    return str(exc) or type(exc).__name__


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TerminalProgress:
    """A one-line progress bar (percent, bytes, rate, ETA) redrawn in place on a terminal."""

    def __init__(
        self,
        label: str,
        stream: TextIO,
        *,
        width: int = 30,
        min_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._start: tuple[float, int] | None = None
        self._last_draw = float("-inf")
        self._last: tuple[int, int | None] = (0, None)
        self._drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        now = self.clock()
        if self._start is None:
            self._start = (now, done)
        self._last = (done, total)
        if now - self._last_draw >= self.min_interval_s or (total is not None and done >= total):
            self._last_draw = now
            self._draw(done, total, now)

    def render(self, done: int, total: int | None, now: float) -> str:
        start_t, start_done = self._start or (now, done)
        elapsed = now - start_t
        rate = (done - start_done) / elapsed if elapsed > 0 else 0.0
        speed = f"{format_bytes(rate)}/s" if rate else ""
        if total:
            frac = min(done / total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = f"ETA {_format_duration((total - done) / rate)}" if rate and done < total else ""
            parts = [
                self.label,
                f"[{bar}]",
                f"{frac * 100:5.1f}%",
                f"{format_bytes(done)}/{format_bytes(total)}",
                speed,
                eta,
            ]
        else:
            parts = [self.label, format_bytes(done), speed]
        return "  ".join(p for p in parts if p)

    def _draw(self, done: int, total: int | None, now: float) -> None:
        self.stream.write("\r\x1b[2K" + self.render(done, total, now))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self._drawn or self._start is not None:
            self._draw(*self._last, self.clock())
            self.stream.write("\n")
            self.stream.flush()


def terminal_progress(label: str, stream: TextIO | None = None) -> TerminalProgress | None:
    """A progress bar on `stream` (default stdout) when it is a terminal, else None."""
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return TerminalProgress(label, stream) if isatty is not None and isatty() else None


def throttled(callback: ProgressCallback, min_interval_s: float = 1.0) -> ProgressCallback:
    """Forward at most one progress report per `min_interval_s` (and always the last one).

    For progress events sent elsewhere (an actor's status, the console), where one per chunk
    would be far too many.
    """
    last = float("-inf")

    def report(done: int, total: int | None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= min_interval_s or (total is not None and done >= total):
            last = now
            callback(done, total)

    return report


__all__ = [
    "DownloadError",
    "Downloaded",
    "ProgressCallback",
    "TerminalProgress",
    "download_file",
    "format_bytes",
    "part_path",
    "terminal_progress",
    "throttled",
]
