"""API keys on the node's OpenAI endpoint (`meshllm up --api-key`), without I/O.

A key is given as `KEY`, `NAME:KEY` or `NAME:KEY:rpm=N,tpm=M` (on the command line,
in `MESHLLM_API_KEYS`, or one a line in a file named `@FILE`). Only its SHA-256
is kept: `KeyRing.check` hashes what a request presents (`Authorization: Bearer
KEY` or `x-api-key: KEY`) and compares it with every known digest by
`hmac.compare_digest`, so neither the comparison nor the number of keys tried
depends on how much of a key was right. A key's requests per minute are bounded
by a token bucket (`TokenBucket`); past it the request is `Limited`, with the
seconds until one more is allowed (the Proxy's 429 and Retry-After). Its tokens
per minute are a bucket too, which each answer's tokens are spent from once it
has gone out (`UsageScanner` reads them from the answer's end: `usage`, else
llama-server's `timings`), so an answer may take the bucket below zero; no new
request of that key goes on until it has refilled to one token.

Nothing here logs, and no error message carries a key: messages name the key's
place (`--api-key #2`, `FILE line 3`) or its name.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec

OPEN_PATHS = frozenset({"/health", "/v1/health"})
"""What answers without a key: a load balancer's or a watchdog's health check."""
MIN_KEY_CHARS = 8
"""Shorter keys are refused: they could be guessed."""
MAX_KEY_CHARS = 512
_KEY = re.compile(r"^[\x21-\x7e]+$")
"""Printable ASCII without spaces (what fits in a header as it is)."""
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeySpecError(ValueError):
    """A key given wrongly; the message says where, never what the key is."""


class ApiKey(msgspec.Struct, frozen=True):
    """One key the endpoint accepts (handed to the Proxy in `NodeConfig.api_keys`)."""

    name: str
    """Names the key in logs, errors and metrics (given, or `key-` and 8 hex digits of
    its digest)."""
    digest: bytes
    """SHA-256 of the key: the key itself is kept nowhere."""
    rpm: int = 0
    """Requests per minute allowed with this key; 0: no limit."""
    tpm: int = 0
    """Tokens (prompt and completion) per minute allowed with this key; 0: no limit."""


def digest_of(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def parse_key(text: str, where: str, rpm: int = 0, tpm: int = 0) -> ApiKey:
    """One key as written (`KEY`, `NAME:KEY`, `NAME:KEY:rpm=N,tpm=M`); `rpm` and `tpm`
    are the limits of a key that sets none (`--key-rpm`, `--key-tpm`)."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        name, key, options = None, parts[0], []
    else:
        name, key, *options = parts
        if not _NAME.match(name):
            raise KeySpecError(
                f"{where}: a key's name is 1 to 64 letters, digits, '_', '.' or '-' "
                "(write NAME:KEY, or the key alone)"
            )
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not _KEY.match(key):
        raise KeySpecError(
            f"{where}: a key is {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII characters, "
            "without spaces or ':'"
        )
    limits = {"rpm": rpm, "tpm": tpm}
    for option in (o for part in options for o in part.split(",")):
        field, _, value = option.partition("=")
        if field not in limits or not value.isascii() or not value.isdigit():
            raise KeySpecError(
                # Not quoted: it may be the rest of a key that holds a ':'.
                f"{where}: after NAME:KEY: come limits, rpm=N (requests per minute) and "
                "tpm=N (tokens per minute), and a key holds no ':'"
            )
        limits[field] = int(value)
    digest = digest_of(key)
    return ApiKey(name or f"key-{digest.hex()[:8]}", digest, limits["rpm"], limits["tpm"])


def load_keys(values: Iterable[str], rpm: int = 0, tpm: int = 0) -> tuple[ApiKey, ...]:
    """The keys of `--api-key` values: each a key, or `@FILE` with a key a line (blank
    lines and lines starting with `#` skipped). Raises `KeySpecError`."""
    keys: list[ApiKey] = []
    for number, value in enumerate(values, 1):
        if value.startswith("@"):
            path = Path(value[1:]).expanduser()
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise KeySpecError(f"--api-key @{path}: cannot read it ({why})") from None
            found = [
                parse_key(line, f"{path} line {n}", rpm, tpm)
                for n, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
            if not found:
                raise KeySpecError(f"--api-key @{path}: the file holds no key")
            keys += found
        else:
            keys.append(parse_key(value, f"--api-key #{number}", rpm, tpm))
    names: set[str] = set()
    digests: set[bytes] = set()
    for key in keys:
        if key.name in names:
            raise KeySpecError(f"--api-key: two keys are named {key.name!r}")
        if key.digest in digests:
            raise KeySpecError(f"--api-key: key {key.name!r} is given twice")
        names.add(key.name)
        digests.add(key.digest)
    return tuple(keys)


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: `Authorization: Bearer KEY`, else `x-api-key: KEY`."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and api_key is None and value.strip():
            api_key = value.strip()
    return bearer if bearer is not None else api_key


class TokenBucket:
    """`capacity` at once, refilled at `capacity` per `period_s`."""

    __slots__ = ("at", "capacity", "per_s", "tokens")

    def __init__(self, capacity: int, period_s: float, now: float) -> None:
        self.capacity = float(capacity)
        self.per_s = capacity / period_s
        self.tokens = self.capacity
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.at) * self.per_s)
        self.at = max(self.at, now)

    def wait_s(self, now: float) -> float:
        """Seconds until at least one is there (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.per_s

    def take(self, now: float) -> float:
        """Take one: 0 when taken, else the seconds until one is there (nothing taken)."""
        wait = self.wait_s(now)
        if wait == 0:
            self.tokens -= 1
        return wait

    def spend(self, now: float, amount: int) -> None:
        """Spend what was used, however much is left (the bucket may go below zero)."""
        self._refill(now)
        self.tokens -= amount


USAGE_TAIL_BYTES = 4096
"""How much of an answer's end `UsageScanner` keeps: its usage or timings are there."""
_TOTAL = re.compile(rb'"total_tokens"\s*:\s*(\d{1,12})')
_TIMINGS = {
    field: re.compile(rb'"' + field + rb'"\s*:\s*(\d{1,12})')
    for field in (b"cache_n", b"prompt_n", b"predicted_n")
}


class UsageScanner:
    """The tokens an answer used, read from its end: OpenAI's `usage.total_tokens` (an
    answer, or a stream's last event with `stream_options.include_usage`), else
    llama-server's `timings` (cached, evaluated and predicted tokens), which its streams
    end with. A quote inside generated text is escaped (`\\"`), so text cannot pose as
    these fields. 0 when the end holds neither (an embedding lists its usage first)."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk[-USAGE_TAIL_BYTES:])[-USAGE_TAIL_BYTES:]

    def tokens(self) -> int:
        totals = _TOTAL.findall(self.tail)
        if totals:
            return int(totals[-1])
        found = [regex.findall(self.tail) for regex in _TIMINGS.values()]
        return sum(int(values[-1]) for values in found if values)


class Allowed(NamedTuple):
    name: str
    """The key's name."""


class Unauthorized(NamedTuple):
    message: str
    code: str


class Limited(NamedTuple):
    name: str
    retry_after_s: int
    message: str


def _limited(key: ApiKey, wait_s: float, what: str) -> Limited:
    retry = max(1, math.ceil(wait_s))
    message = f"rate limit of key {key.name!r} reached ({what} per minute); retry in {retry} s"
    return Limited(key.name, retry, message)


Verdict = Allowed | Unauthorized | Limited


class KeyRing:
    """The keys the endpoint accepts and their request budgets."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = tuple(keys)
        self.buckets: dict[str, TokenBucket] = {}
        """Requests per minute, by key name."""
        self.token_buckets: dict[str, TokenBucket] = {}
        """Tokens per minute, by key name."""

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: bytes) -> ApiKey | None:
        """The key whose digest is `presented`'s; every digest is compared in full."""
        digest = digest_of(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest) and found is None:
                found = key
        return found

    def check(self, headers: Sequence[tuple[bytes, bytes]], now: float) -> Verdict:
        """Whether a request with these headers may go on (one request of its key's
        budget is spent when it may)."""
        presented = presented_key(headers)
        if presented is None:
            return Unauthorized(
                "this endpoint needs an API key: send 'Authorization: Bearer KEY' "
                "(or 'x-api-key: KEY')",
                "missing_api_key",
            )
        key = self.find(presented)
        if key is None:
            return Unauthorized("incorrect API key provided", "invalid_api_key")
        if key.tpm > 0 and (wait := self._token_bucket(key, now).wait_s(now)) > 0:
            return _limited(key, wait, f"{key.tpm} tokens")
        if key.rpm > 0:
            bucket = self.buckets.get(key.name)
            if bucket is None:
                bucket = self.buckets[key.name] = TokenBucket(key.rpm, 60.0, now)
            if (wait := bucket.take(now)) > 0:
                return _limited(key, wait, f"{key.rpm} requests")
        return Allowed(key.name)

    def counts_tokens(self, name: str) -> bool:
        """Whether the key's answers are to be scanned for the tokens they used."""
        return name in self.token_buckets

    def spent(self, name: str, tokens: int, now: float) -> None:
        """An answer with key `name` used `tokens`."""
        bucket = self.token_buckets.get(name)
        if bucket is not None and tokens > 0:
            bucket.spend(now, tokens)

    def _token_bucket(self, key: ApiKey, now: float) -> TokenBucket:
        bucket = self.token_buckets.get(key.name)
        if bucket is None:
            bucket = self.token_buckets[key.name] = TokenBucket(key.tpm, 60.0, now)
        return bucket
