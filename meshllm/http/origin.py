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
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

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
        if problem := check_origins(given):
            raise ValueError(f"--cors-origin: {problem}")
        self.any = ANY in given
        self.origins = frozenset(normalise(o.encode("ascii")) for o in given if o != ANY)

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
    """What is wrong with `--cors-origin` values, or None.

    Browsers send an internationalised host name in its ASCII (punycode) form, so
    that is the form asked for; the message spells it out when it can."""
    for value in values:
        if value == ANY:
            continue
        if not value.isascii():
            return f"{value!r} is not ASCII: {_ascii_hint(value)}"
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest:
            return f"{value!r} is not an origin like https://app.example.com or '*'"
        if "/" in rest.rstrip("/") or "?" in rest or "#" in rest or "@" in rest:
            return f"{value!r} is not an origin (scheme://host[:port], no path)"
        if "*" in rest:
            return f"{value!r} has a wildcard: give '*' alone (any origin) or exact origins"
        try:
            _ = urlsplit(value).port  # raises on a port that is not a number in range
        except ValueError:
            return f"{value!r} is not an origin: its port is not a number from 0 to 65535"
    return None


def _ascii_hint(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    host, colon, port = rest.rstrip("/").rpartition(":") if ":" in rest else (rest, "", "")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return "write the host name in its punycode (xn--) form"
    return f"write it as browsers send it, {scheme}{sep}{ascii_host}{colon}{port}"


FORM_CONTENT_TYPES = frozenset(
    {b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data"}
)
"""What a page on any site may POST without a preflight, from a plain HTML form too,
which old browsers send with neither `Origin` nor `Sec-Fetch-Site`."""


def form_content_type(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request's `Content-Type` is one a cross-site form can send.

    The OpenAI endpoints take JSON; refusing these types closes the one cross-site
    request a browser may send without saying where it comes from. No
    `Content-Type` at all is not a form's (forms always send one), and curl and the
    SDKs that omit it keep working."""
    for key, value in headers:
        if key == b"content-type":
            return value.partition(b";")[0].strip().lower() in FORM_CONTENT_TYPES
    return False


LOCAL_NAMES = frozenset({b"localhost"})


def rebinding_safe_host(host: bytes | None, own_names: Iterable[bytes] = LOCAL_NAMES) -> bool:
    """True when a `Host` header cannot be a name a web page rebound to this machine.

    DNS rebinding points a site's own name at a node's address: the page is then
    "same-origin" with the node, so the origin check lets it through. The `Host`
    it sends is still the site's name. An IP literal, or one of `own_names` (the
    machine's names, lower case), is safe; any other name is not."""
    if host is None:
        return False
    value = host.strip().lower()
    if value.startswith(b"["):
        name = value[1 : value.find(b"]")] if b"]" in value else b""
        return _is_ip(name)
    name = value.rsplit(b":", 1)[0] if value.count(b":") == 1 else value
    name = name.rstrip(b".")
    return _is_ip(name) or name in own_names


def _is_ip(name: bytes) -> bool:
    try:
        ipaddress.ip_address(name.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


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
