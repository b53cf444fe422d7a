"""The one OpenAI-shaped error: its JSON body, and the same as a raw HTTP/1.1 response.

The Proxy sends the body through ASGI; the Tunnel, which speaks HTTP/1.1 on
its sockets itself, sends `error_response`.
"""

from __future__ import annotations

from http import HTTPStatus

import msgspec

RETRY_AFTER_S = 2
"""What a 503 asks the client to wait before it tries again."""

_json = msgspec.json.Encoder()


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """`{"error": {...}}` as OpenAI's API answers it; `code` defaults to the status."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json.encode(
        {"error": {"message": message, "type": kind, "param": None, "code": code or str(status)}}
    )


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    retry_after: bool = False,
    close: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response carrying `error_body`; `close`: the connection ends."""
    body = error_body(status, message, code)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    if retry_after:
        head.append(f"retry-after: {RETRY_AFTER_S}")
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
