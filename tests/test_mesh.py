"""The mesh with real processes on loopback.

Three serving nodes and a lite client share one mesh (a module fixture):

- A seeds the catalog with both models (`--model M1 --model M2`) and serves M1;
- B joins through A's token and serves M2;
- C joins through *B's* token and serves M1 again (a second, independent server);
- the lite client joins through A's token.

Tests that stop or kill a node bring it back afterwards (`Mesh.restore`, run at
the start of every test), so they do not depend on their order. llama-server
runs with one thread (see tests/test_node.py for why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshllm.mesh.token import InviteToken, decode_token, encode_token, mesh_id_of, new_secret
from meshllm.runtime.procutil import kill_tree
from meshllm.testing import (
    ChatStream,
    NodeProcess,
    http,
    mesh_models,
    scrape_metrics,
    served_count,
    token_of,
    wait_for,
)

pytestmark = pytest.mark.integration

ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
LOOPBACK = ("--bind", "127.0.0.1:0")
SERVING = (*LOOPBACK, *ONE_THREAD)
M1 = "meshllm-demo"
M2 = "meshllm-demo-b"
MESSAGES = [{"role": "user", "content": "Tell me about the mesh."}]
MAX_TOKENS = 24
STREAM_END_WAIT_S = 10.0
"""How long a test waits for a stream whose host died to end (with an error event)."""
DECLARED_DEAD = "peer {} is not answering: declaring it dead"
"""What a HealthProber logs when failure detection (not a leave notice) removes a peer."""


# -- the mesh --------------------------------------------------------------------


@dataclass
class Mesh:
    root: Path
    env: dict[str, str]
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> NodeProcess:
        node = NodeProcess(self.root / name, *args, env=self.env)
        self.nodes[name] = node
        return node.start()

    def restart(self, name: str) -> NodeProcess:
        """Start `name` again with the same home and arguments (so the same key and token)."""
        return self.nodes[name].restart()

    def port(self, name: str) -> int:
        return self.nodes[name].port

    def others(self, name: str) -> list[str]:
        return [n for n in self.nodes if n != name]

    def expected(self) -> dict[str, set[str]]:
        return {M1: {self.ids["A"], self.ids["C"]}, M2: {self.ids["B"]}}

    def converged(self) -> bool:
        """Every node lists both models warm, served by exactly the expected nodes."""
        want = self.expected()
        for name in self.nodes:
            models = mesh_models(self.port(name), timeout=2)
            for model, nodes in want.items():
                seen = models.get(model)
                if seen is None or seen["status"] != "warm" or set(seen["nodes"]) != nodes:
                    raise AssertionError(f"{name} lists {model} as {seen} (want {nodes})")
        return True

    def restore(self) -> None:
        """Bring back every node a test stopped, and wait until the mesh is whole again."""
        for name, node in self.nodes.items():
            if node.proc.poll() is not None:
                self.restart(name)
        wait_for(self.converged, 60, "the mesh to converge", interval=0.2)


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory,
    llama_server: str,
    demo_model: Path,
    second_model: Path,
) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    # An empty models directory: nothing on this machine's disk joins the catalog.
    (root / "no-models").mkdir()
    mesh = Mesh(root, {"MESHLLM_MODELS_DIR": str(root / "no-models")})
    try:
        a = mesh.start("A", "--model", str(demo_model), "--model", str(second_model), *SERVING)
        token_a = token_of(a)
        b = mesh.start("B", "--model", str(second_model), "--join", token_a, *SERVING)
        token_b = token_of(b)
        assert token_b != token_a and decode_token(token_b).secret == decode_token(token_a).secret
        mesh.start("C", "--model", str(demo_model), "--join", token_b, *SERVING)
        mesh.start("client", "--client", "--join", token_a, *LOOPBACK)
        for name in ("A", "B", "C"):
            mesh.ids[name] = mesh.nodes[name].status()["node_id"]
        mesh.restore()
        # C was given B's address only (checked here, before any test restarts a node).
        c_log = mesh.nodes["C"].log()
        assert f"joined the mesh via {decode_token(token_b).addresses[0]}" in c_log
        assert f"via {decode_token(token_a).addresses[0]}" not in c_log
        yield mesh
    finally:
        for node in mesh.nodes.values():
            node.stop()


# -- requests ----------------------------------------------------------------------


def chat_body(model: str, max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def post_chat(port: int, body: dict[str, Any]) -> dict[str, Any]:
    status, _, data = http(port, "POST", "/v1/chat/completions", body, timeout=60)
    assert status == 200, data
    reply: dict[str, Any] = json.loads(data)
    return reply


def stream_chat(port: int, body: dict[str, Any]) -> tuple[str, int | None]:
    """A streaming chat: (the deltas concatenated, completion tokens from the usage chunk)."""
    stream = ChatStream(port, body).read()
    assert stream.status == 200, stream.error
    assert stream.content_type.startswith("text/event-stream"), stream.content_type
    assert stream.ok, f"{stream}; got {stream.text!r}"
    return stream.text, stream.usage["completion_tokens"] if stream.usage else None


def llama_port(node: NodeProcess) -> int:
    server: dict[str, Any] = wait_for(
        lambda: (s := node.status()["server"])["state"] == "ready" and s,
        30,
        f"llama-server of {node.home.name} to be ready",
    )
    return int(server["port"])


def gone_everywhere(
    mesh: Mesh, node_id: str, watchers: list[str], since: float, timeout: float
) -> dict[str, float]:
    """Seconds after `since` at which each watcher stopped listing `node_id` in `/v1/models`."""
    seen_gone: dict[str, float] = {}

    def check() -> bool:
        for name in watchers:
            if name in seen_gone:
                continue
            models = mesh_models(mesh.port(name), timeout=2)
            if not any(node_id in m["nodes"] for m in models.values()):
                seen_gone[name] = time.monotonic() - since
        return len(seen_gone) == len(watchers)

    wait_for(check, timeout, f"{node_id} to leave every /v1/models", interval=0.02)
    return seen_gone


# -- listing and chatting -------------------------------------------------------------


def test_every_node_lists_both_models_warm(mesh: Mesh) -> None:
    mesh.restore()
    for name in mesh.nodes:
        models = mesh_models(mesh.port(name))
        assert set(models) == {M1, M2}, (name, models)
        assert models[M1]["status"] == models[M2]["status"] == "warm", (name, models)
        assert set(models[M1]["nodes"]) == {mesh.ids["A"], mesh.ids["C"]}, (name, models)
        assert models[M2]["nodes"] == [mesh.ids["B"]], (name, models)
        # A node lists its own server first (it answers locally), the others by node id.
        if name in ("A", "C"):
            assert models[M1]["nodes"][0] == mesh.ids[name]


def test_membership_is_transitive(mesh: Mesh) -> None:
    mesh.restore()
    # C joined through B only (see the fixture), yet A and C know each other, and the
    # client: every node knows every other.
    client_id = mesh.nodes["client"].status()["node_id"]
    everyone = {**mesh.ids, "client": client_id}

    def everyone_knows_everyone() -> dict[str, Any]:
        # Gossip is eventually consistent: the models listing (what `restore` waits
        # for) can agree a moment before every peer list does.
        status = {name: node.status() for name, node in mesh.nodes.items()}
        for name, st in status.items():
            peers = {p["node_id"] for p in st["peers"]}
            assert peers == {i for n, i in everyone.items() if n != name}, (name, peers)
        return status

    status = wait_for(everyone_knows_everyone, 10, "every node to list every other as a peer")

    # /metrics counts the same peers (its Proxy hears the gossiper's view too).
    def metrics_agree() -> bool:
        alive = ("meshllm_peers_alive", frozenset[tuple[str, str]]())
        counts = [scrape_metrics(mesh.port(name)).get(alive) for name in mesh.nodes]
        return counts == [len(everyone) - 1] * len(mesh.nodes)

    wait_for(metrics_agree, 10, "every node's /metrics to count its peers")
    roles = {p["node_id"]: p["role"] for p in status["A"]["peers"]}
    assert roles[client_id] == "client" and roles[mesh.ids["C"]] == "host"


@pytest.mark.parametrize("model", [M1, M2])
def test_chat_through_every_node_equals_llama_server(mesh: Mesh, model: str) -> None:
    mesh.restore()
    hosts = ["A", "C"] if model == M1 else ["B"]
    direct = [post_chat(llama_port(mesh.nodes[h]), chat_body(model)) for h in hosts]
    expected = direct[0]["choices"][0]["message"]["content"]
    tokens = direct[0]["usage"]["completion_tokens"]
    assert expected and tokens == MAX_TOKENS
    # Two servers of one model are two independent copies of the same file: same answer.
    assert all(d["choices"][0]["message"]["content"] == expected for d in direct)
    for name in mesh.nodes:
        reply = post_chat(mesh.port(name), chat_body(model))
        assert reply["choices"][0]["message"]["content"] == expected, name
        assert reply["usage"]["completion_tokens"] == tokens, name
        text, streamed_tokens = stream_chat(
            mesh.port(name), chat_body(model, stream_options={"include_usage": True})
        )
        assert text == expected, name
        assert streamed_tokens == tokens, name


# -- leaving, dying, dropping ------------------------------------------------------------


def test_graceful_stop_is_a_leave_not_a_death(mesh: Mesh) -> None:
    mesh.restore()
    c = mesh.nodes["C"]
    logs_before = {name: len(mesh.nodes[name].log()) for name in mesh.others("C")}
    asked = time.monotonic()
    out = c.ctl("stop")
    assert out.returncode == 0, out.stderr
    gone = gone_everywhere(mesh, mesh.ids["C"], mesh.others("C"), asked, timeout=10)
    print(f"\ngraceful stop: gone from every other node after {max(gone.values()):.3f}s: {gone}")
    assert c.wait_exit(15) == 0
    # Every other node learnt it from C's leave notice: none had to detect its death.
    for name, offset in logs_before.items():
        assert DECLARED_DEAD.format(mesh.ids["C"]) not in mesh.nodes[name].log()[offset:], name
    # M1 keeps its other server; nothing went cold.
    for name in mesh.others("C"):
        assert mesh_models(mesh.port(name))[M1] == {"status": "warm", "nodes": [mesh.ids["A"]]}
    mesh.restore()


def test_kill_9_of_a_host_mid_stream(mesh: Mesh) -> None:
    """B (M2's only server) loses power while the client streams from it through the tunnel."""
    mesh.restore()
    b = mesh.nodes["B"]
    # A streaming request that would run for minutes.
    body = chat_body(M2, max_tokens=100_000, stream=True)
    stream = ChatStream(mesh.port("client"), body, timeout=30).start()
    wait_for(stream.started, 30, "the remote stream to start")
    logs_before = {name: len(mesh.nodes[name].log()) for name in mesh.others("B")}
    killed_at = time.monotonic()
    pids = kill_tree(b.proc.pid)
    assert len(pids) >= 8, pids  # the root, its actors and llama-server
    gone = gone_everywhere(mesh, mesh.ids["B"], mesh.others("B"), killed_at, timeout=30)
    assert stream.join(STREAM_END_WAIT_S), "the client's stream hangs after its host died"
    print(
        f"\nkill -9: gone from every other node after {max(gone.values()):.3f}s: {gone}; "
        f"the remote stream ended after {stream.ended_at - killed_at:.3f}s"
    )
    # Nothing could say goodbye: failure detection found it (timings: `python -m bench
    # convergence`).
    detected = [
        name
        for name, offset in logs_before.items()
        if DECLARED_DEAD.format(mesh.ids["B"]) in mesh.nodes[name].log()[offset:]
    ]
    assert detected, "no node declared B dead"
    # The stream ended with an error event (and its message), not a cut or a hang.
    assert stream.status == 200 and stream.error_event and stream.error, stream
    # M2 had no other server: cold everywhere, still in the catalog (A seeded it).
    for name in mesh.others("B"):
        assert mesh_models(mesh.port(name))[M2] == {"status": "cold", "nodes": []}
    # Restarted with the same home and token, B is back everywhere.
    started = time.monotonic()
    mesh.restore()
    print(f"B rejoined and serves again after {time.monotonic() - started:.1f}s")
    assert {p["node_id"] for p in mesh.nodes["A"].status()["peers"]} >= {mesh.ids["B"]}


def test_a_replica_killed_under_load_costs_no_request(mesh: Mesh) -> None:
    """M1 has two servers (A and C). Requests flow from the lite client, spread over both
    by their prompts; C's llama-server is killed with kill -9 among them. A request whose
    replica died before answering fails over to the other replica: the client sees none
    of it. C's server comes back (its supervisor restarts it) and is routed to again."""
    mesh.restore()
    c = mesh.nodes["C"]
    victim = int(c.status()["server"]["pid"])
    served_by_c = served_count(c)
    statuses: list[int] = []

    def load(first: int = 0) -> None:
        for i in range(first, first + 40):
            body = chat_body(M1, max_tokens=8)
            body["messages"] = [{"role": "user", "content": f"question {i}"}]
            status, _, data = http(mesh.port("client"), "POST", "/v1/chat/completions", body)
            statuses.append(status if status == 200 else -status)
            if status != 200:
                print(f"request {i}: {status} {data[:200]!r}")

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    # Spread over both replicas: C answers some of them before it is killed.
    wait_for(lambda: served_count(c) > served_by_c, 60, "C to answer some of the load")
    os.kill(victim, 9)
    thread.join(120)
    assert not thread.is_alive(), "the load did not finish"
    assert statuses == [200] * 40, statuses
    # C's llama-server is restarted and C is a target of M1 again.
    server = wait_for(
        lambda: (s := c.status()["server"])["state"] == "ready" and s["pid"] != victim and s,
        60,
        "C's llama-server to be back",
    )
    assert server["pid"] != victim
    wait_for(mesh.converged, 30, "M1 to be served by A and C again", interval=0.2)
    before = served_count(c)
    statuses.clear()
    load(first=100)
    assert statuses == [200] * 40, statuses
    assert served_count(c) > before  # used again once it came back


def test_drop_of_the_only_server_makes_the_model_cold_everywhere(mesh: Mesh) -> None:
    mesh.restore()
    b = mesh.nodes["B"]
    asked = time.monotonic()
    out = b.ctl("drop", M2)
    assert out.returncode == 0, out.stderr
    gone = gone_everywhere(mesh, mesh.ids["B"], mesh.others("B"), asked, timeout=10)
    print(f"\nctl drop: {M2} cold everywhere {max(gone.values()):.3f}s after the command ran")
    assert b.wait_exit(15) == 0
    for name in mesh.others("B"):
        models = mesh_models(mesh.port(name))
        assert models[M2] == {"status": "cold", "nodes": []}, name
        assert models[M1]["status"] == "warm", name
        # The other nodes keep serving; the dropped model answers 503, not a hang.
        assert post_chat(mesh.port(name), chat_body(M1, max_tokens=4))["choices"]
        status, _, data = http(mesh.port(name), "POST", "/v1/chat/completions", chat_body(M2))
        assert status == 503, data
    mesh.restore()


# -- admission and the command line -----------------------------------------------------


def test_wrong_token_cannot_join(mesh: Mesh, tmp_path: Path) -> None:
    mesh.restore()
    real = decode_token(token_of(mesh.nodes["A"]))
    secret = new_secret()
    wrong = encode_token(InviteToken(secret, real.addresses, mesh_id_of(secret)))
    intruder = NodeProcess(tmp_path / "intruder", "--client", "--join", wrong, *LOOPBACK)
    try:
        intruder.start()
        intruder_id = intruder.status()["node_id"]
        # The intruder checks A's proof of the secret first, and gives up on it.
        wait_for(
            lambda: "does not hold this mesh's secret" in intruder.log(),
            15,
            "the intruder's log to say A does not hold its secret",
        )
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # never listed, not even for a moment
            for name, node in mesh.nodes.items():
                peers = {p["node_id"] for p in node.status()["peers"]}
                assert intruder_id not in peers, name
        assert intruder.status()["peers"] == []
        assert mesh_models(intruder.port) == {}
    finally:
        intruder.stop()


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("hello", "an invite token starts with"),
        ("meshllm1.!!!not-base64!!!", "damaged"),
        ("meshllm1.AAAA", "damaged"),
    ],
)
def test_malformed_token_is_a_clear_cli_error(tmp_path: Path, token: str, says: str) -> None:
    home = str(tmp_path / "home")
    out = subprocess.run(
        [sys.executable, "-m", "meshllm", "up", "--home", home, "--join", token, *LOOPBACK],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MESHLLM_MODELS_DIR": str(tmp_path / "models")},
    )
    assert out.returncode != 0
    assert says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_a_client_joins_with_the_token_in_a_file(mesh: Mesh, tmp_path: Path) -> None:
    mesh.restore()
    path = tmp_path / "token"
    out = mesh.nodes["A"].ctl("token", "--out", str(path))
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    client = NodeProcess(tmp_path / "c2", "--client", "--join", f"@{path}", *LOOPBACK)
    try:
        client.start()
        cmdline = Path(f"/proc/{client.proc.pid}/cmdline").read_bytes()
        assert f"@{path}".encode() in cmdline and token.encode() not in cmdline
        wait_for(lambda: set(mesh_models(client.port)) == {M1, M2}, 30, "the mesh's models")
        client_id = client.status()["node_id"]
        peers = {p["node_id"] for p in mesh.nodes["A"].status()["peers"]}
        assert client_id in peers
    finally:
        client.stop()
