"""One real node end to end: `meshllm up` with a real llama-server and the demo model.

Non-destructive checks share one node (module fixture); tests that kill,
stop or misconfigure a node get their own. llama-server runs with one thread
(`-t 1`): on a 2-core machine shared with other work, llama.cpp's spinning
thread pool slows to a few tokens per second when a core is taken, while one
thread keeps the demo model at about a thousand.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from meshllm.runtime.procutil import descendants as children_of
from meshllm.testing import NodeProcess, Samples, alive, http, scrape_metrics, wait_for

pytestmark = pytest.mark.integration

MODEL = "meshllm-demo"
ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
MESSAGES = [{"role": "user", "content": "Tell me about the mesh."}]
STOP_BOUND_S = 15.0
"""How long a test waits for a node to exit after SIGTERM / `ctl stop` / `ctl drop`."""


# -- helpers -------------------------------------------------------------------


@dataclass
class Shared:
    node: NodeProcess

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def llama_port(self) -> int:
        """llama-server's own port, to ask it directly with the same body."""
        return int(server_ready(self.node)["port"])


def server_ready(node: NodeProcess, timeout: float = 30) -> dict[str, Any]:
    """llama-server's state from `ctl status`, once it says ready."""

    def ready() -> dict[str, Any] | None:
        server: dict[str, Any] = node.status()["server"]
        return server if server["state"] == "ready" and server["port"] else None

    return wait_for(ready, timeout, "ctl status to report llama-server ready")


def chat_body(max_tokens: int = 48, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def post_json(port: int, path: str, body: Any, timeout: float = 30) -> tuple[int, Any]:
    status, _, data = http(port, "POST", path, json.dumps(body).encode(), timeout=timeout)
    return status, json.loads(data)


def sse_events(
    port: int, path: str, body: dict[str, Any], timeout: float = 60
) -> list[tuple[float, Any]]:
    """POST a streaming request; (arrival time, event) per `data:` line, up to `[DONE]`."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        events: list[tuple[float, Any]] = []
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: ") :].strip()
            if payload == b"[DONE]":
                events.append((time.monotonic(), "[DONE]"))
                break
            events.append((time.monotonic(), json.loads(payload)))
        assert events and events[-1][1] == "[DONE]", f"stream ended without [DONE]: {events[-3:]}"
        return events
    finally:
        conn.close()


def stream_summary(events: list[tuple[float, Any]], field: str) -> dict[str, Any]:
    """What must match between two streams: every delta, the finish reason, the usage."""
    deltas: list[Any] = []
    finish: list[Any] = []
    usage: list[Any] = []
    for _, event in events[:-1]:
        for choice in event["choices"]:
            deltas.append(choice["delta"] if field == "delta" else choice["text"])
            finish.append(choice["finish_reason"])
        if event.get("usage"):
            usage.append(event["usage"]["completion_tokens"])
    return {"deltas": deltas, "finish": [f for f in finish if f], "usage": usage}


def joined(summary: dict[str, Any]) -> str:
    return "".join(
        (d.get("content") or "") if isinstance(d, dict) else d for d in summary["deltas"]
    )


def busy_slots(llama_port: int) -> list[int]:
    """Ids of llama-server's slots that are generating (its `/slots` endpoint)."""
    status, _, data = http(llama_port, "GET", "/slots", timeout=5)
    assert status == 200, data
    return [s["id"] for s in json.loads(data) if s["is_processing"]]


def cancelled_tasks(node: NodeProcess) -> int:
    """How many generations llama-server cancelled (it logs each; a finished one is not)."""
    log = (node.home / "logs" / "llama-server.log").read_text(errors="replace")
    return log.count("stop: cancel task")


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes and end the request side; all the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
        return reply


def open_stream(port: int, body: dict[str, Any], events: int) -> socket.socket:
    """Start a request on a raw socket and read until `events` SSE events arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
    )
    seen = b""
    while seen.count(b"data: ") < events:
        chunk = sock.recv(65536)
        assert chunk, f"stream closed early: {seen[-500:]!r}"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:300]
    return sock


def close_hard(sock: socket.socket) -> None:
    """Close like a client that goes away: RST rather than a polite FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def assert_serves(port: int) -> None:
    status, reply = post_json(port, "/v1/chat/completions", chat_body(max_tokens=4))
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "length"


def assert_openai_error(data: bytes, status: int) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    error: dict[str, Any] = json.loads(data)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["code"] and "param" in error
    return error


def meshllm_up(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshllm", "up", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def descendants(node: NodeProcess) -> list[int]:
    found = children_of(node.proc.pid)
    server_pid = node.status()["server"]["pid"]
    assert server_pid in found, f"llama-server {server_pid} is not under the node: {found}"
    return [node.proc.pid, *found]


def assert_all_gone(pids: list[int]) -> None:
    wait_for(
        lambda: not [p for p in pids if alive(p)],
        10,
        "every process of the node to be gone",
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, llama_server: str) -> Iterator[Shared]:
    node = NodeProcess(tmp_path_factory.mktemp("shared") / "home", *ONE_THREAD)
    try:
        node.start().wait_ready(MODEL)
        server_ready(node)
        yield Shared(node)
    finally:
        node.stop()


@pytest.fixture
def node(start_node: Callable[..., NodeProcess]) -> NodeProcess:
    """A node of its own, for a test that breaks or stops it."""
    node = start_node(*ONE_THREAD).wait_ready(MODEL)
    server_ready(node)
    return node


# -- the happy path: same answers as llama-server, streamed as they come ----------


def test_chat_matches_llama_server(shared: Shared) -> None:
    body = chat_body()
    status, via_node = post_json(shared.port, "/v1/chat/completions", body)
    assert status == 200, via_node
    status, direct = post_json(shared.llama_port, "/v1/chat/completions", body)
    assert status == 200, direct
    assert via_node["choices"] == direct["choices"]
    assert via_node["choices"][0]["message"]["content"]
    assert via_node["choices"][0]["finish_reason"] == "length"
    assert via_node["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 48
    assert via_node["model"] == direct["model"]
    assert via_node["object"] == "chat.completion"


def test_streaming_chat_matches_llama_server(shared: Shared) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    via_node = stream_summary(sse_events(shared.port, "/v1/chat/completions", body), "delta")
    direct = stream_summary(sse_events(shared.llama_port, "/v1/chat/completions", body), "delta")
    assert via_node == direct
    assert via_node["finish"] == ["length"]
    assert via_node["usage"] == [48]
    _, whole = post_json(shared.port, "/v1/chat/completions", chat_body())
    assert joined(via_node) == whole["choices"][0]["message"]["content"]


def test_completions_match_llama_server(shared: Shared) -> None:
    body = {"model": MODEL, "prompt": "The mesh", "max_tokens": 32, "temperature": 0}
    status, via_node = post_json(shared.port, "/v1/completions", body)
    assert status == 200, via_node
    status, direct = post_json(shared.llama_port, "/v1/completions", body)
    assert status == 200, direct
    assert via_node["choices"] == direct["choices"]
    assert via_node["choices"][0]["text"]
    assert via_node["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 32

    stream = {**body, "stream": True}
    streamed = stream_summary(sse_events(shared.port, "/v1/completions", stream), "text")
    assert streamed == stream_summary(
        sse_events(shared.llama_port, "/v1/completions", stream), "text"
    )
    assert "".join(streamed["deltas"]) == via_node["choices"][0]["text"]


def test_streaming_arrives_incrementally(shared: Shared) -> None:
    llama_port = shared.llama_port
    conn = HTTPConnection("127.0.0.1", shared.port, timeout=60)
    try:
        body = json.dumps(chat_body(3000, stream=True)).encode()
        conn.request("POST", "/v1/chat/completions", body)
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: "), first
        # The first event is in our hands while llama-server is still producing
        # the rest: nothing on the way held the stream back.
        assert busy_slots(llama_port), "generation already over when the first chunk came"
        events = 1
        while line := resp.readline():
            if line.startswith(b"data: "):
                events += 1
                if line.startswith(b"data: [DONE]"):
                    break
    finally:
        conn.close()
    assert events > 3000 and line.startswith(b"data: [DONE]")


def test_disconnect_cancels_streaming_upstream(shared: Shared) -> None:
    llama_port = shared.llama_port
    wait_for(lambda: not busy_slots(llama_port), 30, "llama-server to be idle")
    cancelled = cancelled_tasks(shared.node)
    # Run to completion, this would fill the 16k-token context: over a minute.
    sock = open_stream(shared.port, chat_body(100_000, stream=True), events=5)
    try:
        assert busy_slots(llama_port), "llama-server is not generating"
    finally:
        close_hard(sock)
    wait_for(lambda: not busy_slots(llama_port), 5, "llama-server to stop generating")
    wait_for(
        lambda: cancelled_tasks(shared.node) == cancelled + 1, 5, "llama-server to log the cancel"
    )
    assert_serves(shared.port)


def test_disconnect_cancels_non_streaming_upstream(shared: Shared) -> None:
    llama_port = shared.llama_port
    wait_for(lambda: not busy_slots(llama_port), 30, "llama-server to be idle")
    cancelled = cancelled_tasks(shared.node)
    data = json.dumps(chat_body(100_000)).encode()
    sock = socket.create_connection(("127.0.0.1", shared.port), timeout=30)
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data)
        )
        wait_for(lambda: busy_slots(llama_port), 10, "llama-server to start generating")
    finally:
        sock.close()
    # llama-server notices a closed connection only between polls (seconds) when it
    # has nothing to write; what matters is that it cancels instead of finishing.
    wait_for(lambda: cancelled_tasks(shared.node) == cancelled + 1, 30, "llama-server to cancel")
    wait_for(lambda: not busy_slots(llama_port), 5, "llama-server to stop generating")
    assert_serves(shared.port)


# -- the OpenAI surface -----------------------------------------------------------


def test_models_and_health(shared: Shared) -> None:
    status, headers, data = http(shared.port, "GET", "/v1/models")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    listing = json.loads(data)
    assert listing["object"] == "list"
    [model] = listing["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    assert isinstance(model["owned_by"], str)
    assert model["meshllm"]["status"] == "warm"

    status, _, data = http(shared.port, "GET", "/health")
    assert status == 200
    assert json.loads(data) == {"status": "ok", "models": [MODEL]}


def test_metrics_count_requests_and_tokens(shared: Shared) -> None:
    def counted(samples: Samples) -> list[float]:
        model = frozenset({("model", MODEL)})
        return [
            samples.get(("meshllm_completion_tokens_total", model), 0.0),
            samples.get(("meshllm_request_duration_seconds_count", model), 0.0),
        ]

    before = counted(scrape_metrics(shared.port))
    assert post_json(shared.port, "/v1/chat/completions", chat_body())[0] == 200
    # streamed: with usage asked for, and without (llama-server's timings then)
    usage: dict[str, Any] = {"stream_options": {"include_usage": True}}
    for extra in (usage, {}):
        body = chat_body(stream=True, **extra)
        stream_summary(sse_events(shared.port, "/v1/chat/completions", body), "delta")

    # A stream's client may see its last event before the node has the upstream's end.
    def all_three() -> Samples | None:
        samples = scrape_metrics(shared.port)
        return samples if counted(samples)[1] - before[1] >= 3 else None

    after = wait_for(all_three, 10, "the three requests in /metrics")
    assert [b - a for a, b in zip(before, counted(after), strict=True)] == [3 * 48, 3]
    assert after[("meshllm_in_flight", frozenset({("model", MODEL)}))] == 0
    assert after[("meshllm_server_state", frozenset({("model", MODEL), ("state", "ready")}))] == 1


def test_openai_sdk(shared: Shared) -> None:
    import openai
    from openai.types.chat import ChatCompletionMessageParam

    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me more."}]
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{shared.port}/v1", api_key="unused", max_retries=0
    )
    body = chat_body(24, messages=messages)
    direct = post_json(shared.llama_port, "/v1/chat/completions", body)[1]
    expected = direct["choices"][0]["message"]["content"]

    assert MODEL in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 24

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == expected

    completion = client.completions.create(
        model=MODEL, prompt="The mesh", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=123, messages=messages)  # type: ignore[call-overload]


# -- bad input: the right status, and the node keeps serving ---------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1]", "invalid_body"),
        (b'"x"', "invalid_body"),
        (b"null", "invalid_body"),
        (b"42", "invalid_body"),
        (b'{"model": 5, "messages": []}', "invalid_body"),
        (b'{"model": "x", "stream": "yes"}', "invalid_body"),
    ],
)
def test_bad_body_is_400(shared: Shared, body: bytes, code: str) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, headers, data = http(shared.port, "POST", path, body)
        assert status == 400, data
        assert headers["content-type"].startswith("application/json")
        assert assert_openai_error(data, 400)["code"] == code
    assert_serves(shared.port)


def test_upstream_errors_pass_through(shared: Shared) -> None:
    for body in (
        {"model": MODEL, "messages": "not a list"},
        {"model": MODEL, "messages": [{"role": "user", "content": "x " * 40_000}]},
    ):
        direct = http(shared.llama_port, "POST", "/v1/chat/completions", body)
        via_node = http(shared.port, "POST", "/v1/chat/completions", body)
        assert 400 <= direct[0] < 600, direct
        assert (via_node[0], via_node[2]) == (direct[0], direct[2])
    assert_serves(shared.port)


def test_concurrent_requests(shared: Shared) -> None:
    def one(i: int) -> int:
        if i % 2:
            events = sse_events(shared.port, "/v1/chat/completions", chat_body(64, stream=True))
            return sum(1 for _, e in events[:-1] for c in e["choices"] if c["delta"].get("content"))
        status, reply = post_json(shared.port, "/v1/chat/completions", chat_body(64))
        assert status == 200, reply
        return int(reply["usage"]["completion_tokens"])

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(32))) == [64] * 32


def test_unknown_model_falls_back(shared: Shared) -> None:
    status, reply = post_json(
        shared.port, "/v1/chat/completions", chat_body(8, model="no-such-model")
    )
    assert status == 200, reply
    expected = post_json(shared.port, "/v1/chat/completions", chat_body(8))[1]
    assert reply["choices"][0]["message"] == expected["choices"][0]["message"]
    status, reply = post_json(shared.port, "/v1/chat/completions", chat_body(8, model=None))
    assert status == 200, reply


def test_wrong_method_and_unknown_path(shared: Shared) -> None:
    for method, path in [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/completions"),
        ("DELETE", "/v1/models"),
        ("POST", "/health"),
    ]:
        status, _, data = http(shared.port, method, path, b"{}")
        assert status == 405, (method, path, data)
        assert_openai_error(data, 405)
    for path in ("/v2/chat/completions", "/v1/nope", "/"):
        status, _, data = http(shared.port, "POST", path, b"{}")
        assert status == 404, (path, data)
        assert_openai_error(data, 404)
    assert_serves(shared.port)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GARBAGE\x00\xff\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: abc\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: -5\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1\r\n"
        b"content-length: 2\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nbroken header line\r\n\r\n",
        b"POST /v1/chat/completions HTTP/9.9\r\nhost: 127.0.0.1\r\n\r\n",
    ],
    ids=["tls", "binary", "length-abc", "length-negative", "length-twice", "header", "version"],
)
def test_malformed_http(shared: Shared, request_bytes: bytes) -> None:
    reply = raw_exchange(shared.port, request_bytes)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert_serves(shared.port)


def test_truncated_body_and_half_requests(shared: Shared) -> None:
    # Content-Length promises more than comes, then the client goes away.
    reply = raw_exchange(
        shared.port,
        b'POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 500\r\n\r\n{"mo',
    )
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    # Headers that never end.
    reply = raw_exchange(shared.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost:")
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert_serves(shared.port)


# -- control: status, drop, a second node on the same home or port -----------------


def test_ctl_status_table(shared: Shared) -> None:
    out = shared.node.ctl("status")
    assert out.returncode == 0, out.stderr
    assert MODEL in out.stdout and "ready" in out.stdout
    assert f":{shared.port}" in out.stdout and f":{shared.llama_port}" in out.stdout
    for actor in ("server_supervisor", "router", "proxy"):
        assert actor in out.stdout


def test_drop_other_model_changes_nothing(shared: Shared) -> None:
    before = shared.node.status()
    out = shared.node.ctl("drop", "some-other-model")
    assert out.returncode != 0
    assert "some-other-model" in out.stderr and MODEL in out.stderr, out.stderr
    assert "nothing was dropped" in out.stderr
    after = shared.node.status()
    assert after["server"] == before["server"]
    assert after["actors"] == before["actors"]
    assert shared.node.proc.poll() is None
    assert_serves(shared.port)


def test_second_node_on_same_home_fails(shared: Shared) -> None:
    out = meshllm_up("--home", str(shared.node.home), "--port", "0", *ONE_THREAD)
    assert out.returncode != 0
    assert str(shared.node.home.resolve()) in out.stderr, out.stderr
    assert "already running" in out.stderr
    # The running node is untouched: control socket and API still answer.
    assert shared.node.status()["server"]["state"] == "ready"
    assert_serves(shared.port)


def test_second_node_on_same_port_fails(shared: Shared, tmp_path: Path) -> None:
    out = meshllm_up("--home", str(tmp_path / "other"), "--port", str(shared.port), *ONE_THREAD)
    assert out.returncode != 0
    assert f"port {shared.port}" in out.stderr and "in use" in out.stderr, out.stderr
    assert_serves(shared.port)


# -- limits and strict models (own node) ----------------------------------------------


def test_body_limit_and_strict_models(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("--max-body-mb", "0.01", "--strict-models", *ONE_THREAD)
    node.wait_ready(MODEL)
    big = json.dumps(chat_body(4, padding="x" * 20_000)).encode()
    status, _, data = http(node.port, "POST", "/v1/chat/completions", big)
    assert status == 413, data
    assert assert_openai_error(data, 413)["code"] == "body_too_large"

    # The same without Content-Length (chunked): the limit holds while reading.
    conn = HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=iter([big[:4000], big[4000:8000], big[8000:]]),
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413
        assert_openai_error(resp.read(), 413)
    finally:
        conn.close()
    assert_serves(node.port)

    # On one keep-alive connection: refused, served, refused, served, and a small
    # chunked body that stays under the limit.
    conn = HTTPConnection("127.0.0.1", node.port, timeout=30)
    small = json.dumps(chat_body(4)).encode()
    try:
        for body, expected in [(big, 413), (small, 200), (big, 413), (small, 200)]:
            conn.request("POST", "/v1/chat/completions", body)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == expected, data
        conn.request(
            "POST", "/v1/chat/completions", iter([small[:10], small[10:]]), encode_chunked=True
        )
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 4
    finally:
        conn.close()

    status, reply = post_json(node.port, "/v1/chat/completions", chat_body(4, model="nope"))
    assert status == 404, reply
    assert reply["error"]["code"] == "model_not_found" and "nope" in reply["error"]["message"]
    assert_serves(node.port)


def test_failed_llama_server_gives_503(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("--llama-arg=--this-flag-does-not-exist")

    def failed() -> dict[str, Any] | None:
        server = node.status()["server"]
        return server if server["state"] == "failed" else None

    server = wait_for(failed, 30, "llama-server to be reported failed")
    assert "this-flag-does-not-exist" in server["reason"], server

    # The server is restarted with backoff, so a later read may find it loading again.
    def failed_in_table() -> str | None:
        table = node.ctl("status").stdout
        return table if "\nfailed: " in table else None

    table = wait_for(failed_in_table, 30, "ctl status to show the failure")
    assert "this-flag-does-not-exist" in table, table

    status, headers, data = http(node.port, "POST", "/v1/chat/completions", chat_body(4))
    assert status == 503, data
    assert int(headers["retry-after"]) > 0
    assert assert_openai_error(data, 503)["type"] == "server_error"
    assert http(node.port, "GET", "/health")[0] == 503
    [model] = json.loads(http(node.port, "GET", "/v1/models")[2])["data"]
    assert model["id"] == MODEL and model["meshllm"]["status"] == "cold"


# -- recovery ------------------------------------------------------------------------


def read_to_end(sock: socket.socket, timeout: float) -> bytes:
    """The rest of a response: until the chunked terminator or the server closes."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while not data.endswith(b"0\r\n\r\n") and (chunk := sock.recv(65536)):
            data += chunk
    return data


def test_kill_llama_server_recovers(node: NodeProcess) -> None:
    old = server_ready(node)
    sock = open_stream(node.port, chat_body(100_000, stream=True), events=3)
    try:
        os.kill(old["pid"], signal.SIGKILL)
        # The client in the middle of a stream gets an error event and an ended
        # stream, not a hang.
        rest = read_to_end(sock, timeout=10)
    finally:
        sock.close()
    assert rest.endswith(b"0\r\n\r\n"), rest[-300:]
    last_event = rest.rsplit(b"data: ", 1)[1]
    assert b'"error"' in last_event, last_event[:300]

    def recovered() -> dict[str, Any] | None:
        server = node.status()["server"]
        return server if server["state"] == "ready" and server["pid"] != old["pid"] else None

    new = wait_for(recovered, 30, "a new llama-server to be ready")
    assert new["restarts"] >= 1
    restarts: tuple[str, frozenset[tuple[str, str]]] = (
        "meshllm_server_restarts_total",
        frozenset(),
    )
    wait_for(lambda: scrape_metrics(node.port).get(restarts, 0) >= 1, 10, "the restart in /metrics")
    wait_for(lambda: http(node.port, "GET", "/health", timeout=5)[0] == 200, 10, "health")
    assert_serves(node.port)
    assert not alive(old["pid"])


@pytest.mark.parametrize("name", ["proxy", "router", "server_supervisor"])
def test_kill_actor_recovers(node: NodeProcess, name: str) -> None:
    before = node.status()
    [actor] = [a for a in before["actors"] if a["name"] == name]
    os.kill(actor["pid"], signal.SIGKILL)

    def serves() -> bool:
        status, _, _ = http(node.port, "POST", "/v1/chat/completions", chat_body(4), timeout=5)
        return status == 200

    def restarted() -> dict[str, Any] | None:
        [new] = [a for a in node.status()["actors"] if a["name"] == name]
        return new if new["pid"] != actor["pid"] and new["alive"] else None

    wait_for(serves, 10, f"the node to answer again after kill -9 of {name}")
    assert wait_for(restarted, 10, f"a new {name}")["restarts"] == 1
    assert not alive(actor["pid"])
    if name == "server_supervisor":
        # Its llama-server died with it (no orphan) and a new one took over.
        old_pid = before["server"]["pid"]
        wait_for(lambda: not alive(old_pid), 5, "the old llama-server to die")
        # `ctl status` catches up with the new supervisor's first publication.
        wait_for(
            lambda: node.status()["server"]["pid"] not in (0, old_pid),
            10,
            "status to show the new llama-server",
        )


# -- stopping leaves nothing behind ----------------------------------------------------


def _assert_stops(node: NodeProcess, stop: Callable[[], None]) -> None:
    pids = descendants(node)
    stop()
    code = node.wait_exit(STOP_BOUND_S)
    assert code == 0, node.log()[-2000:]
    assert_all_gone(pids)
    assert not list((node.home / "run").glob("*.ipc"))


def test_sigterm_stops_everything(node: NodeProcess) -> None:
    proc = node.proc
    _assert_stops(node, lambda: proc.send_signal(signal.SIGTERM))


def test_ctrl_c_stops_everything(node: NodeProcess) -> None:
    group = node.proc.pid  # the node leads its own process group, like in a terminal
    _assert_stops(node, lambda: os.killpg(group, signal.SIGINT))


def test_kill_9_of_the_root_leaves_no_orphan(node: NodeProcess) -> None:
    pids = descendants(node)
    node.proc.kill()
    assert node.wait_exit(5) == -signal.SIGKILL
    assert_all_gone(pids)


def test_ctl_stop_stops_everything(node: NodeProcess) -> None:
    # A stream that would run for minutes must not hold the node up.
    sock = open_stream(node.port, chat_body(100_000, stream=True), events=3)

    def stop() -> None:
        out = node.ctl("stop")
        assert out.returncode == 0, out.stderr

    try:
        _assert_stops(node, stop)
        read_to_end(sock, timeout=5)  # the client sees its stream end
    finally:
        sock.close()


def test_ctl_drop_leaves_no_process(node: NodeProcess) -> None:
    def drop() -> None:
        out = node.ctl("drop", MODEL)
        assert out.returncode == 0, out.stderr
        assert MODEL in out.stdout

    _assert_stops(node, drop)
    assert f"dropped {MODEL}" in node.log()
