"""API keys on the node's OpenAI endpoint (`meshllm up --api-key`), without I/O.

A key is given as `KEY`, `NAME:KEY` or `NAME:KEY:rpm=N,tpm=M` (on the command line,
in `MESHLLM_API_KEYS`, or one a line in a file named `@FILE`). Only its SHA-256
is kept: `KeyRing.check` hashes what a request presents (`Authorization: Bearer
KEY` or `x-api-key: KEY`) and compares it with every known digest by
`hmac.compare_digest`, so neither the comparison nor the number of keys tried
depends on how much of a key was right. A key's requests per minute are bounded
by a token bucket (`TokenBucket`); past it the request is `Limited`, with the
seconds until one more is allowed (the Proxy's 429 and Retry-After).

Its tokens per minute are a bucket too. A request goes on while that bucket holds
one token, and at once reserves what it may cost (`TokenCharge`: at most one
minute's worth), so concurrent requests of one key cannot all pass on a full
bucket and overdraw it; once its body is read the reservation becomes its own
estimate (`estimate_tokens`: `max_tokens`, else `DEFAULT_ANSWER_TOKENS`, plus the
prompt's bytes / 4). When its answer ends the reservation is settled with what
the answer says it used (`UsageScanner` reads it from the answer's end: `usage`,
else llama-server's `timings`): the difference is refunded or charged, so an
answer may take the bucket below zero and no new request of that key goes on
until it has refilled to one token. An answer its client leaves costs its
reservation, or the events it streamed if more (the server may have done the
work); one that fails without an end keeps its reservation.

Wrong keys are limited by client address (`FailureLimit`): past a burst of them,
that address gets 429 until its budget refills, whatever key it sends.

Nothing here logs, and no error message carries a key: messages name the key's
place (`--api-key #2`, `FILE line 3`) or its name.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
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


def load_keys(
    values: Iterable[str],
    rpm: int = 0,
    tpm: int = 0,
    source: str = "--api-key",
    warn: Callable[[str], None] | None = None,
) -> tuple[ApiKey, ...]:
    """The keys of `--api-key` values: each a key, or `@FILE` with a key a line (blank
    lines and lines starting with `#` skipped). Raises `KeySpecError`.

    `source` is where the values came from, for messages (`MESHLLM_API_KEYS #2`, not
    a flag the user never gave). A key file that other users may read or write is
    still loaded, but `warn` is told (as ssh does for a key, minus the refusal: a
    node that will not start over a mode bit helps nobody who shares the machine)."""
    keys: list[ApiKey] = []
    for number, value in enumerate(values, 1):
        if value.startswith("@"):
            path = Path(value[1:]).expanduser()
            try:
                lines = path.read_text().splitlines()
                mode = path.stat().st_mode
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise KeySpecError(f"{source} @{path}: cannot read it ({why})") from None
            found = [
                parse_key(line, f"{path} line {n}", rpm, tpm)
                for n, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
            if not found:
                raise KeySpecError(f"{source} @{path}: the file holds no key")
            if warn is not None and mode & OPEN_FILE_BITS:
                warn(
                    f"{source} @{path}: other users of this machine may read or change the "
                    f"keys (mode {stat.S_IMODE(mode):04o}): chmod 600 {path}"
                )
            keys += found
        else:
            keys.append(parse_key(value, f"{source} #{number}", rpm, tpm))
    names: set[str] = set()
    digests: set[bytes] = set()
    for key in keys:
        if key.name in names:
            raise KeySpecError(f"{source}: two keys are named {key.name!r}")
        if key.digest in digests:
            raise KeySpecError(f"{source}: key {key.name!r} is given twice")
        names.add(key.name)
        digests.add(key.digest)
    return tuple(keys)


OPEN_FILE_BITS = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH
"""A key file with any of these gets a warning (`load_keys`)."""


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


DEFAULT_ANSWER_TOKENS = 512
"""What a request that sets no `max_tokens` is expected to generate (llama-server's own
default is the rest of the context): enough that a few such requests of a small key
cannot run at once."""
_PROMPT_BYTES_PER_TOKEN = 4
"""A prompt's bytes per token, roughly (English text; JSON around it makes it more)."""


class _AnswerLimit(msgspec.Struct):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


_answer_limit = msgspec.json.Decoder(_AnswerLimit)


def estimate_tokens(body: bytes) -> int:
    """What a request with this body may cost: its answer's limit (`max_completion_tokens`,
    else `max_tokens`; `DEFAULT_ANSWER_TOKENS` without one, or when the body is not
    JSON with integer limits) plus its prompt, as bytes / 4. Only a reservation:
    `TokenCharge.settle` charges what the answer says it used."""
    try:
        limits = _answer_limit.decode(body)
        answer = limits.max_completion_tokens or limits.max_tokens
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        answer = None
    if answer is None or answer <= 0:
        answer = DEFAULT_ANSWER_TOKENS
    return answer + len(body) // _PROMPT_BYTES_PER_TOKEN


class TokenCharge:
    """One request's tokens against its key's tokens-per-minute bucket: reserved when it
    is let on (before any other request of the key can be), re-estimated once its body
    is known, settled once when its answer ends or is abandoned. A reservation is at
    most the bucket's capacity (one minute's worth), so a request with a huge
    `max_tokens` that its client leaves costs at most a minute."""

    __slots__ = ("bucket", "events", "reserved", "scanner", "settled")

    def __init__(self, bucket: TokenBucket, tokens: int, now: float) -> None:
        self.bucket = bucket
        self.reserved = 0
        self.scanner = UsageScanner()
        self.events = 0
        """Server-sent events the answer has carried so far (about a token each)."""
        self.settled = False
        self.reserve(tokens, now)

    def reserve(self, tokens: int, now: float) -> None:
        """Make the reservation `tokens` (capped): the difference is spent or refunded."""
        if self.settled:
            return
        tokens = max(0, min(tokens, int(self.bucket.capacity)))
        self.bucket.spend(now, tokens - self.reserved)
        self.reserved = tokens

    def feed(self, chunk: bytes) -> None:
        """A piece of the answer, as it goes out."""
        self.scanner.feed(chunk)
        self.events += chunk.count(b"data:")

    def settle(self, now: float, *, ended: bool) -> None:
        """Charge what the request used instead of its reservation (once; later calls do
        nothing). `ended`: its answer went out to its end, whose usage or timings say
        what it used (else its events; an answer with neither, such as a model list,
        costs nothing). Otherwise (the client left, or it failed) it costs what it
        reserved, or what it streamed if more: leaving early refunds nothing."""
        if self.settled:
            return
        used = self.scanner.tokens()
        if not ended:
            used = used or max(self.reserved, self.events)
        elif not used:
            used = self.events
        self.bucket.spend(now, used - self.reserved)
        self.reserved = 0
        self.settled = True


FAILURE_BURST = 20
"""Wrong keys one client address may send at once before `FailureLimit` refuses it."""
FAILURES_PER_MINUTE = 20
MAX_FAILING_CLIENTS = 4096
"""Client addresses `FailureLimit` remembers; the one heard from least recently goes."""


def client_key(address: str) -> str:
    """Whom a wrong-key budget belongs to: an IPv4 address (also when it arrives as
    `::ffff:a.b.c.d`), an IPv6 host's /64 (a host holds a whole one), else the text."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimit:
    """Wrong keys by client address: a token bucket each (`FAILURE_BURST`, refilled at
    `FAILURES_PER_MINUTE`); an address whose bucket is empty is refused (429) whatever
    key it sends, the right one included. Checking its keys anyway would make the 429
    a 401 that still tells a right guess from a wrong one: nothing slowed. The cost:
    clients that share an address with a guesser (one NAT, a reverse proxy on the same
    machine) wait with it, for the few seconds until its next guess is allowed.
    Memory stays bounded: at most `MAX_FAILING_CLIENTS` addresses (a guesser with many
    addresses can make it forget some, each still limited to a burst at a time)."""

    def __init__(
        self,
        burst: int = FAILURE_BURST,
        per_minute: int = FAILURES_PER_MINUTE,
        max_clients: int = MAX_FAILING_CLIENTS,
    ) -> None:
        self.burst = burst
        self.per_s = per_minute / 60.0
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait_s(self, client: str, now: float) -> float:
        """Seconds until `client` may try a key again (0: now)."""
        bucket = self.buckets.get(client_key(client))
        return 0.0 if bucket is None else bucket.wait_s(now)

    def failed(self, client: str, now: float) -> None:
        """`client` sent a wrong key."""
        client = client_key(client)
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = self.buckets[client] = TokenBucket(self.burst, self.burst / self.per_s, now)
            while len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(client)
        bucket.spend(now, 1)


class Allowed(NamedTuple):
    name: str
    """The key's name."""
    charge: TokenCharge | None = None
    """Its tokens-per-minute reservation, for a key with such a limit: settled by the
    caller when the answer ends (`TokenCharge.settle`)."""


class Unauthorized(NamedTuple):
    message: str
    code: str


class Limited(NamedTuple):
    name: str
    """The key's name; empty when its client address sent too many wrong keys."""
    retry_after_s: int
    message: str


def _limited(key: ApiKey, wait_s: float, what: str) -> Limited:
    retry = max(1, math.ceil(wait_s))
    message = f"rate limit of key {key.name!r} reached ({what} per minute); retry in {retry} s"
    return Limited(key.name, retry, message)


Verdict = Allowed | Unauthorized | Limited


class KeyRing:
    """The keys the endpoint accepts and their request budgets."""

    def __init__(self, keys: Sequence[ApiKey], failures: FailureLimit | None = None) -> None:
        self.keys = tuple(keys)
        self.buckets: dict[str, TokenBucket] = {}
        """Requests per minute, by key name."""
        self.token_buckets: dict[str, TokenBucket] = {}
        """Tokens per minute, by key name."""
        self.failures = FailureLimit() if failures is None else failures

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

    def check(
        self, headers: Sequence[tuple[bytes, bytes]], now: float, client: str | None = None
    ) -> Verdict:
        """Whether a request with these headers, from address `client` (None: unknown),
        may go on. When it may, one request of its key's budget is spent and, for a key
        with a tokens-per-minute limit, `DEFAULT_ANSWER_TOKENS` reserved (`Allowed.charge`)."""
        presented = presented_key(headers)
        if presented is None:
            return Unauthorized(
                "this endpoint needs an API key: send 'Authorization: Bearer KEY' "
                "(or 'x-api-key: KEY')",
                "missing_api_key",
            )
        if client is not None and (wait := self.failures.wait_s(client, now)) > 0:
            retry = max(1, math.ceil(wait))
            why = f"too many wrong API keys from this address; retry in {retry} s"
            return Limited("", retry, why)
        key = self.find(presented)
        if key is None:
            if client is not None:
                self.failures.failed(client, now)
            return Unauthorized("incorrect API key provided", "invalid_api_key")
        if key.tpm > 0 and (wait := self._token_bucket(key, now).wait_s(now)) > 0:
            return _limited(key, wait, f"{key.tpm} tokens")
        if key.rpm > 0:
            bucket = self.buckets.get(key.name)
            if bucket is None:
                bucket = self.buckets[key.name] = TokenBucket(key.rpm, 60.0, now)
            if (wait := bucket.take(now)) > 0:
                return _limited(key, wait, f"{key.rpm} requests")
        if key.tpm > 0:
            bucket = self._token_bucket(key, now)
            return Allowed(key.name, TokenCharge(bucket, DEFAULT_ANSWER_TOKENS, now))
        return Allowed(key.name)

    def _token_bucket(self, key: ApiKey, now: float) -> TokenBucket:
        bucket = self.token_buckets.get(key.name)
        if bucket is None:
            bucket = self.token_buckets[key.name] = TokenBucket(key.tpm, 60.0, now)
        return bucket
