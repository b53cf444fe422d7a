"""External backends with real processes: a plain llama-server that no node runs,
joined into a mesh with `--backend-url` (the logic is in tests/test_backends.py).

Node A fronts the backend and serves no model of its own; lite client B joins A
and reaches the backend's model through the tunnel to A. Killed, the backend
stops being a target on both nodes (503 with Retry-After, never a hang);
started again, it is served again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshllm.testing import (
    NodeProcess,
    PlainLlamaServer,
    chat,
    http,
    mesh_models,
    token_of,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "external-demo"
LOOPBACK = ("--bind", "127.0.0.1:0")
REQUEST = {
    "model": NAME,
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture
def backend(llama_server: str, demo_model: Path, tmp_path: Path) -> Iterator[PlainLlamaServer]:
    server = PlainLlamaServer(llama_server, demo_model, tmp_path / "backend.log")
    try:
        yield server.start()
    finally:
        server.stop()


def refused_for_now(node: NodeProcess) -> bool:
    """One request for NAME to `node`: an error at once (502 through the tunnel while the
    mesh has not yet seen the backend die, else 503); True once it is 503 with
    Retry-After."""
    status, headers, body = http(node.port, "POST", "/v1/chat/completions", REQUEST, timeout=10)
    assert status in (502, 503), (status, body)
    return status == 503 and int(headers.get("retry-after", "0")) >= 1


def refused_and_cold(node: NodeProcess) -> bool:
    return refused_for_now(node) and NAME not in node.warm_models()


def test_a_backend_is_routed_through_the_tunnel_and_follows_its_health(
    backend: PlainLlamaServer, start_node: Callable[..., NodeProcess]
) -> None:
    url = f"http://127.0.0.1:{backend.port}"
    a = start_node("--backend-url", url, "--model", NAME, *LOOPBACK, name="a")
    a.wait_ready(NAME, timeout=30)
    b = start_node("--client", "--join", token_of(a), *LOOPBACK, name="b")
    b.wait_ready(NAME, timeout=30)

    expected = chat(backend.port, NAME, max_tokens=8)["choices"][0]["message"]["content"]
    for node in (a, b):
        assert chat(node.port, NAME, max_tokens=8)["choices"][0]["message"]["content"] == expected
    a_id = a.status()["node_id"]
    for node in (a, b):
        info = mesh_models(node.port)[NAME]
        assert info["status"] == "warm" and info["nodes"] == [a_id] and info["backends"] == [a_id]
    (state,) = a.status()["backends"]
    assert state["url"] == url and state["up"] and state["models"] == [NAME]
    actors = {actor["name"] for actor in a.status()["actors"]}
    assert "backends" in actors and "server_supervisor" not in actors  # no llama-server of A's
    shown = a.ctl("status").stdout
    assert f"{url}  up" in shown and f"{a_id} (backend 127.0.0.1:{backend.port})" in shown

    backend.stop()
    for node in (b, a):
        # At once 503 with Retry-After (the servers refuse); and within a poll or two the
        # backend is down everywhere: no target any more.
        wait_for(
            functools.partial(refused_and_cold, node),
            30,
            f"503 for {NAME} and {NAME} cold on :{node.port}",
        )
    (state,) = a.status()["backends"]
    assert not state["up"] and state["reason"]

    backend.start()
    b.wait_ready(NAME, timeout=30)
    assert chat(b.port, NAME, max_tokens=8)["choices"][0]["message"]["content"] == expected


def launched(server: PlainLlamaServer) -> int:
    """Requests the llama-server has started (one log line per task)."""
    return server.log_path.read_text(errors="replace").count("launch_slot_")


def test_two_backends_of_one_model_share_its_requests(
    llama_server: str,
    demo_model: Path,
    tmp_path: Path,
    start_node: Callable[..., NodeProcess],
) -> None:
    servers = [
        PlainLlamaServer(llama_server, demo_model, tmp_path / f"backend{i}.log") for i in (0, 1)
    ]
    try:
        for server in servers:
            server.start()
        urls = [arg for s in servers for arg in ("--backend-url", f"http://127.0.0.1:{s.port}")]
        a = start_node(*urls, "--model", NAME, *LOOPBACK, name="a")
        a.wait_ready(NAME, timeout=30)
        b = start_node("--client", "--join", token_of(a), *LOOPBACK, name="b")
        b.wait_ready(NAME, timeout=30)
        (route,) = [r for r in a.status()["routes"]["models"] if r["name"] == NAME]
        assert sorted(t["port"] for t in route["targets"]) == sorted(s.port for s in servers)

        # Through the tunnel, A hands its backends B's requests in turn.
        before = [launched(s) for s in servers]
        for _ in range(4):
            chat(b.port, NAME, max_tokens=4)
        assert [launched(s) - n for s, n in zip(servers, before, strict=True)] == [2, 2]

        # On A, requests in flight at once go to the backend with fewer of them.
        before = [launched(s) for s in servers]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: chat(a.port, NAME, max_tokens=400), range(4)))
        assert all(launched(s) > n for s, n in zip(servers, before, strict=True))
    finally:
        for server in servers:
            server.stop()
