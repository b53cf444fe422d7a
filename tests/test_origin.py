"""Who may call a node from a web page (meshllm.http.origin), decided sans-I/O."""

from __future__ import annotations

import pytest

from meshllm.http.origin import (
    Policy,
    Verdict,
    browser_headers,
    check_origins,
    form_content_type,
    from_browser,
    judge,
    normalise,
    preflight_headers,
    rebinding_safe_host,
    with_cors,
)

SAME = Verdict.SAME_ORIGIN
ALLOWED = Verdict.ALLOWED
REFUSED = Verdict.REFUSED
APP = ["https://app.example.com", "http://localhost:5173"]


@pytest.mark.parametrize(
    ("scheme", "host", "origin", "site", "allowed", "verdict"),
    [
        # No browser headers at all: curl, SDKs.
        ("http", b"127.0.0.1:9337", None, None, [], SAME),
        ("http", None, None, None, [], SAME),
        # Same origin, however the Host and Origin are spelled.
        ("http", b"127.0.0.1:9337", b"http://127.0.0.1:9337", None, [], SAME),
        ("http", b"127.0.0.1:9337", b"http://127.0.0.1:9337", b"same-origin", [], SAME),
        ("http", b"localhost:9337", b"http://LOCALHOST:9337", b"same-origin", [], SAME),
        ("http", b"[::1]:9337", b"http://[::1]:9337", None, [], SAME),
        ("http", b"localhost", b"http://localhost", None, [], SAME),
        ("http", b"localhost:80", b"http://localhost", None, [], SAME),
        ("https", b"node.lan:443", b"https://node.lan", None, [], SAME),
        ("https", b"node.lan", b"https://node.lan:443", None, [], SAME),
        # Typed into the address bar, a bookmark: Sec-Fetch-Site none.
        ("http", b"127.0.0.1:3131", None, b"none", [], SAME),
        ("http", b"127.0.0.1:3131", None, b"same-origin", [], SAME),
        # Another site.
        ("http", b"127.0.0.1:9337", b"https://evil.example", None, [], REFUSED),
        ("http", b"127.0.0.1:9337", b"https://evil.example", b"cross-site", [], REFUSED),
        ("http", b"127.0.0.1:9337", None, b"cross-site", [], REFUSED),
        ("http", b"127.0.0.1:9337", None, b"Cross-Site", [], REFUSED),
        # Same site, another port: still another program.
        ("http", b"127.0.0.1:9337", b"http://127.0.0.1:3131", b"same-site", [], REFUSED),
        ("http", b"127.0.0.1:9337", None, b"same-site", [], REFUSED),
        ("http", b"localhost:9337", b"http://127.0.0.1:9337", None, [], REFUSED),
        # Scheme differs.
        ("http", b"127.0.0.1:9337", b"https://127.0.0.1:9337", None, [], REFUSED),
        ("http", b"localhost:8080", b"http://localhost:80", None, [], REFUSED),
        ("http", b"localhost:8080", b"http://localhost", None, [], REFUSED),
        # Opaque origins (sandboxed frames, file://) and no Host.
        ("http", b"127.0.0.1:9337", b"null", b"cross-site", [], REFUSED),
        ("http", None, b"http://127.0.0.1:9337", None, [], REFUSED),
        # An Origin that matches but a Sec-Fetch-Site that says otherwise.
        ("http", b"127.0.0.1:9337", b"http://127.0.0.1:9337", b"cross-site", [], REFUSED),
        # Allowed with --cors-origin.
        ("http", b"127.0.0.1:9337", b"https://app.example.com", b"cross-site", APP, ALLOWED),
        ("http", b"127.0.0.1:9337", b"https://APP.example.com", None, APP, ALLOWED),
        ("http", b"127.0.0.1:9337", b"https://app.example.com:443", None, APP, ALLOWED),
        ("http", b"127.0.0.1:9337", b"http://localhost:5173", b"same-site", APP, ALLOWED),
        ("http", b"127.0.0.1:9337", b"http://app.example.com", None, APP, REFUSED),
        ("http", b"127.0.0.1:9337", b"https://app.example.com:8443", None, APP, REFUSED),
        ("http", b"127.0.0.1:9337", b"https://evil.app.example.com", None, APP, REFUSED),
        ("http", b"127.0.0.1:9337", b"https://app.example.com.evil", None, APP, REFUSED),
        ("http", b"127.0.0.1:9337", b"http://localhost:5174", None, APP, REFUSED),
        ("http", b"127.0.0.1:9337", None, b"cross-site", APP, REFUSED),
        # '*' allows any origin, even an opaque one or none.
        ("http", b"127.0.0.1:9337", b"https://evil.example", b"cross-site", ["*"], ALLOWED),
        ("http", b"127.0.0.1:9337", b"null", b"cross-site", ["*"], ALLOWED),
        ("http", b"127.0.0.1:9337", None, b"cross-site", ["*"], SAME),
        ("http", b"127.0.0.1:9337", b"http://127.0.0.1:9337", None, ["*"], SAME),
    ],
)
def test_judge(
    scheme: str,
    host: bytes | None,
    origin: bytes | None,
    site: bytes | None,
    allowed: list[str],
    verdict: Verdict,
) -> None:
    assert judge(scheme, host, origin, site, Policy(allowed)) is verdict


@pytest.mark.parametrize(
    ("headers", "browser"),
    [
        ([], False),
        ([(b"host", b"127.0.0.1:9337"), (b"content-type", b"application/json")], False),
        ([(b"host", b"x"), (b"origin", b"http://x")], True),
        ([(b"sec-fetch-site", b"none")], True),
        ([(b"x-origin", b"http://x"), (b"sec-fetch-mode", b"cors")], False),
    ],
)
def test_from_browser(headers: list[tuple[bytes, bytes]], browser: bool) -> None:
    assert from_browser(headers) is browser


def test_browser_headers_takes_the_first_of_each() -> None:
    headers = [
        (b"origin", b"http://a"),
        (b"host", b"h:1"),
        (b"origin", b"http://b"),
        (b"sec-fetch-site", b"cross-site"),
        (b"host", b"h:2"),
    ]
    assert browser_headers(headers) == (b"h:1", b"http://a", b"cross-site")
    assert browser_headers([]) == (None, None, None)


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        (b"HTTPS://App.Example.com/", b"https://app.example.com"),
        (b"http://localhost:80", b"http://localhost"),
        (b"http://localhost:8080", b"http://localhost:8080"),
        (b"https://x:443", b"https://x"),
        (b"http://x:443", b"http://x:443"),
        (b"http://[::1]:80", b"http://[::1]"),
        (b"null", b"null"),
    ],
)
def test_normalise(given: bytes, normal: bytes) -> None:
    assert normalise(given) == normal


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        ([], True),
        (["*"], True),
        (["https://app.example.com"], True),
        (["http://localhost:5173", "https://a.b/"], True),
        (("https://app.example.com",), True),
        (["app.example.com"], False),
        (["ftp://app.example.com"], False),
        (["https://"], False),
        (["https://app.example.com/path"], False),
        (["https://app.example.com?x=1"], False),
        (["https://user@app.example.com"], False),
        (["*", "nope"], False),
        (["http://[::1]:8080", "http://[::1]"], True),
        (["http://localhost:*"], False),
        (["https://*.example.com"], False),
        (["http://localhost:port"], False),
        (["http://localhost:99999"], False),
    ],
)
def test_check_origins(values: list[str], ok: bool) -> None:
    problem = check_origins(values)
    assert (problem is None) is ok
    if not ok:
        assert problem is not None and "origin" in problem


def test_preflight_echoes_the_origin_and_the_requested_headers() -> None:
    headers = dict(preflight_headers(b"https://app.example.com", b"content-type, authorization"))
    assert headers[b"access-control-allow-origin"] == b"https://app.example.com"
    assert headers[b"access-control-allow-headers"] == b"content-type, authorization"
    assert b"POST" in headers[b"access-control-allow-methods"]
    assert headers[b"vary"] == b"Origin"
    assert b"access-control-allow-headers" not in dict(preflight_headers(b"https://a", None))


def test_with_cors_replaces_upstream_cors_headers() -> None:
    upstream = [
        (b"content-type", b"text/event-stream"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"vary", b"Accept-Encoding"),
    ]
    out = with_cors(upstream, b"https://app.example.com")
    assert [v for k, v in out if k.lower() == b"access-control-allow-origin"] == [
        b"https://app.example.com"
    ]
    assert (b"vary", b"Origin") in out
    assert (b"vary", b"Accept-Encoding") in out
    assert (b"content-type", b"text/event-stream") in out


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("https://bücher.example", "https://xn--bcher-kva.example"),
        ("https://bücher.example:8443/", "https://xn--bcher-kva.example:8443"),
        ("https://" + "ü" * 70 + ".example", None),  # no punycode form: a label too long
    ],
)
def test_non_ascii_origin_is_a_clear_error_not_a_crash(value: str, hint: str | None) -> None:
    problem = check_origins([value])
    assert problem is not None and "is not ASCII" in problem
    if hint:
        assert hint in problem
    with pytest.raises(ValueError, match=r"--cors-origin: .*not ASCII"):
        Policy([value])


def test_punycode_origin_is_allowed_as_browsers_send_it() -> None:
    policy = Policy(["https://xn--bcher-kva.example"])
    assert policy.allows(b"https://xn--bcher-kva.example")


@pytest.mark.parametrize(
    ("headers", "form"),
    [
        ([(b"content-type", b"text/plain")], True),
        ([(b"content-type", b"text/plain;charset=UTF-8")], True),
        ([(b"content-type", b" Application/X-WWW-Form-Urlencoded ")], True),
        ([(b"content-type", b"multipart/form-data; boundary=x")], True),
        ([(b"content-type", b"application/json")], False),
        ([(b"content-type", b"application/json; charset=utf-8")], False),
        ([], False),
    ],
)
def test_form_content_type(headers: list[tuple[bytes, bytes]], form: bool) -> None:
    assert form_content_type(headers) is form


OWN = frozenset({b"localhost", b"gpu-box", b"gpu-box.local"})


@pytest.mark.parametrize(
    ("host", "safe"),
    [
        (b"192.168.1.5:9337", True),
        (b"192.168.1.5", True),
        (b"[fe80::1]:9337", True),
        (b"[::1]", True),
        (b"localhost:9337", True),
        (b"GPU-BOX:9337", True),
        (b"gpu-box.local.:9337", True),
        (b"evil.example:9337", False),
        (b"192.168.1.5.evil.example", False),
        (b"gpu-box.evil.example", False),
        (b"[evil.example]", False),
        (b"999.1.1.1", False),
        (b"", False),
        (None, False),
    ],
)
def test_rebinding_safe_host(host: bytes | None, safe: bool) -> None:
    assert rebinding_safe_host(host, OWN) is safe
