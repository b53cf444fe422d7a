"""`meshllm ctl pause` / `resume` with real processes on loopback.

A and B both serve the demo model M (`--model M`). Two streams run on A's
llama-server: one sent to A's own endpoint (the Proxy's local path) and one sent to
B's, which its prompt's affinity sends to A (the tunnel path). `ctl pause` on A:
both streams end complete, A is no target anywhere at once (new requests go to B),
then A's llama-server stops; `ctl resume`: A serves again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshllm.http.balance import _weight, affinity_key, target_id
from meshllm.runtime.messages import RouteTarget
from meshllm.testing import (
    ChatStream,
    NodeProcess,
    alive,
    chat,
    http,
    mesh_models,
    served_count,
    token_of,
    wait_for,
)

pytestmark = pytest.mark.integration

ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
SERVING = ("--bind", "127.0.0.1:0", *ONE_THREAD)
M = "meshllm-demo"
STREAM_TOKENS = 1200
"""Long enough to be in flight when the pause arrives (the tiny model makes tens of
tokens per second on one thread of a busy machine), short enough to end soon."""


def body_preferring(node_id: str, other_id: str) -> bytes:
    """A streaming chat body whose affinity key prefers `node_id`'s server of M over
    `other_id`'s, so that a node serving M itself still sends it to `node_id`."""
    want, other = RouteTarget(node_id, False, 1, M), RouteTarget(other_id, False, 1, M)
    assert target_id(want) != target_id(other)
    for i in range(1000):
        body = json.dumps(
            {
                "model": M,
                "messages": [{"role": "user", "content": f"tell me a story, {i}"}],
                "max_tokens": STREAM_TOKENS,
                "temperature": 0,
                "stream": True,
            }
        ).encode()
        key = affinity_key(body)
        assert key is not None
        if _weight(key, want) > _weight(key, other):
            return body
    raise AssertionError("no prompt prefers the wanted node")


def processing_slots(llama_port: int) -> int:
    status, _, data = http(llama_port, "GET", "/slots", timeout=5)
    assert status == 200, data
    return sum(1 for slot in json.loads(data) if slot["is_processing"])


def test_pause_finishes_requests_in_flight_then_gives_the_model_back(
    start_node: Callable[..., NodeProcess], demo_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "no-models").mkdir()
    env = {"MESHLLM_MODELS_DIR": str(tmp_path / "no-models")}
    a = start_node("--model", str(demo_model), *SERVING, name="A", env=env)
    b = start_node("--model", str(demo_model), "--join", token_of(a), *SERVING, name="B", env=env)
    a_id, b_id = a.status()["node_id"], b.status()["node_id"]

    def served_by(*nodes: NodeProcess, ids: set[str]) -> bool:
        for node in nodes:
            seen = mesh_models(node.port, timeout=2).get(M)
            if seen is None or set(seen["nodes"]) != ids:
                raise AssertionError(f"{node.home.name} lists {M} as {seen} (want {ids})")
        return True

    wait_for(lambda: served_by(a, b, ids={a_id, b_id}), 60, "M served by A and B", interval=0.2)
    a_llama = a.status()["server"]
    body = body_preferring(a_id, b_id)
    local = ChatStream(a.port, body).start()  # A's Proxy -> A's llama-server
    tunnelled = ChatStream(b.port, body).start()  # B's Proxy -> tunnel -> A's llama-server
    wait_for(lambda: local.started() and tunnelled.started(), 60, "both streams to start")
    assert processing_slots(a_llama["port"]) == 2, "both streams should run on A"

    asked = time.monotonic()
    out = a.ctl("pause")
    assert out.returncode == 0, out.stderr
    assert "pausing" in out.stdout, out.stdout
    # The requests in flight go on: A's llama-server still runs them.
    assert not local.ended and not tunnelled.ended, "streams ended too soon"
    assert alive(a_llama["pid"])
    # A is no target anywhere any more: new requests go to B, from either endpoint.
    wait_for(lambda: served_by(a, b, ids={b_id}), 30, "A to leave M's servers everywhere")
    left_at = time.monotonic()
    before = served_count(b)
    for node in (a, b):
        assert chat(node.port, M, max_tokens=4)["choices"]
    # (llama-server logs a request's timings just after answering it)
    wait_for(lambda: served_count(b) >= before + 2, 10, "B's llama-server to log both")
    status = a.ctl("status")
    assert "paused" in status.stdout.splitlines()[1], status.stdout
    # Both streams end complete, and only then does A's llama-server stop.
    for stream in (local, tunnelled):
        assert stream.join(120), "a stream did not end"
        assert stream.ok, f"{stream}; last events: {list(stream.tail)[-2:]}"
    streams_done = max(s.ended_at or 0 for s in (local, tunnelled))

    def stopped() -> dict[str, Any] | None:
        server: dict[str, Any] = a.status()["server"]
        return server if server["state"] == "stopped" and server["paused"] else None

    wait_for(stopped, 30, "A's llama-server to stop")
    wait_for(lambda: not alive(a_llama["pid"]), 15, "A's llama-server process to end")
    stopped_at = time.monotonic()
    log = a.log()
    assert "paused: llama-server stopped" in log
    assert "stopping anyway" not in log  # the streams ended before the drain deadline
    peers = {p["node_id"]: p for p in b.status()["peers"]}
    assert peers[a_id]["paused"], peers[a_id]
    print(
        f"\nctl pause: A left M's servers everywhere {left_at - asked:.2f}s after the command "
        f"ran; streams ended {streams_done - asked:.2f}s, llama-server stopped "
        f"{stopped_at - asked:.2f}s after it"
    )

    out = a.ctl("pause")
    assert out.returncode == 0 and "already paused" in out.stdout, out
    out = a.ctl("resume")
    assert out.returncode == 0 and "resumed" in out.stdout, out
    wait_for(lambda: served_by(a, b, ids={a_id, b_id}), 60, "A to serve M again")
    server = a.status()["server"]
    assert server["state"] == "ready" and not server["paused"]
    assert server["pid"] != a_llama["pid"]
    assert chat(a.port, M, max_tokens=4)["choices"]
    out = a.ctl("resume")
    assert out.returncode == 0 and "not paused" in out.stdout, out
