"""Who may call a node's HTTP endpoints from a web page (sans-I/O).

A browser names the page behind a request with `Origin` and, for every fetch,
`Sec-Fetch-Site`. A request from another site is refused unless its origin was
allowed with `--cors-origin`; a request that carries neither header (curl, the
SDKs) is not a browser's and is not judged at all. The Proxy and the console
both decide with `judge`; `from_browser` is the cheap test that lets every other
request skip it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

ANY = "*"
"""`--cors-origin '*'`: every origin is allowed."""

_BROWSER_HEADERS = (b"origin", b"sec-fetch-site")
_OTHER_SITE = frozenset({b"cross-site", b"same-site"})
_DEFAULT_PORTS = {"http": b":80", "https": b":443", "ws": b":80", "wss": b":443"}


class Verdict(enum.Enum):
    SAME_ORIGIN = "same-origin"
    """Answer as usual, with no CORS headers."""
    ALLOWED = "allowed"
    """Another origin that `--cors-origin` allows: answer with CORS headers."""
    REFUSED = "refused"
    """Another site, not allowed: 403."""


class Policy:
    """The origins allowed by `--cors-origin`, normalised for comparison."""

    __slots__ = ("any", "origins")

    def __init__(self, origins: Iterable[str] = ()) -> None:
        given = [o.strip() for o in origins]
        self.any = ANY in given
        self.origins = frozenset(normalise(o.encode("latin-1")) for o in given if o != ANY)

    def allows(self, origin: bytes | None) -> bool:
        if self.any:
            return True
        return origin is not None and normalise(origin) in self.origins


def from_browser(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request carries `Origin` or `Sec-Fetch-Site` (no allocation)."""
    for key, _ in headers:  # noqa: SIM110 (any() would allocate a generator per request)
        if key in _BROWSER_HEADERS:
            return True
    return False


def browser_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """The request's `Host`, `Origin` and `Sec-Fetch-Site` (the first of each)."""
    host = origin = site = None
    for key, value in headers:
        if key == b"host":
            host = host if host is not None else value
        elif key == b"origin":
            origin = origin if origin is not None else value
        elif key == b"sec-fetch-site":
            site = site if site is not None else value
    return host, origin, site


def normalise(origin: bytes) -> bytes:
    """`scheme://host[:port]` in lower case, without a default port or a trailing slash."""
    value = origin.strip().lower().rstrip(b"/")
    scheme, sep, _ = value.partition(b"://")
    default = _DEFAULT_PORTS.get(scheme.decode("latin-1")) if sep else None
    if default is not None and value.endswith(default):
        value = value[: -len(default)]
    return value


def own_origin(scheme: str, host: bytes) -> bytes:
    """The origin of the endpoint itself, as the request's `Host` names it."""
    return normalise(scheme.encode("latin-1") + b"://" + host)


def judge(
    scheme: str,
    host: bytes | None,
    origin: bytes | None,
    site: bytes | None,
    policy: Policy,
) -> Verdict:
    """What to do with a request, from its scheme, `Host`, `Origin` and `Sec-Fetch-Site`.

    Another site is an `Origin` that is not this endpoint's own scheme://host:port,
    or a `Sec-Fetch-Site` of `cross-site` or `same-site` (another port or
    subdomain of the same site is still another program on this machine)."""
    same = origin is None or (host is not None and normalise(origin) == own_origin(scheme, host))
    if same and (site is None or site.lower() not in _OTHER_SITE):
        return Verdict.SAME_ORIGIN
    if policy.allows(origin):
        return Verdict.ALLOWED if origin is not None else Verdict.SAME_ORIGIN
    return Verdict.REFUSED


def check_origins(values: Iterable[str]) -> str | None:
    """What is wrong with `--cors-origin` values, or None."""
    for value in values:
        if value == ANY:
            continue
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest:
            return f"{value!r} is not an origin like https://app.example.com or '*'"
        if "/" in rest.rstrip("/") or "?" in rest or "#" in rest or "@" in rest:
            return f"{value!r} is not an origin (scheme://host[:port], no path)"
    return None


PREFLIGHT_METHODS = b"GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE = b"600"


def preflight_headers(origin: bytes, requested: bytes | None) -> list[tuple[bytes, bytes]]:
    """The answer to an allowed origin's `OPTIONS` preflight."""
    headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", PREFLIGHT_METHODS),
        (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        (b"vary", b"Origin"),
    ]
    if requested:
        headers.append((b"access-control-allow-headers", requested))
    return headers


def with_cors(headers: Iterable[tuple[bytes, bytes]], origin: bytes) -> list[tuple[bytes, bytes]]:
    """Response headers for an allowed origin: the upstream's own CORS headers replaced."""
    out = [(k, v) for k, v in headers if not k.lower().startswith(b"access-control-")]
    out.append((b"access-control-allow-origin", origin))
    out.append((b"vary", b"Origin"))
    return out
