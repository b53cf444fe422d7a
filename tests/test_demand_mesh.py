"""`--models-dir` and usage-aware placement with real processes on loopback.

- A node with `--models-dir` serves every model in it, each with its own llama-server,
  and a lite client reaches each of them through the tunnel.
- Demand: B (joined with `--join` alone) serves a model nobody asks for; a request for
  a cold model through A makes B switch to it while the request waits. Asked for again
  within B's `--idle-unload`, the model B left is not loaded (503 with Retry-After: the
  one B serves now is in use); once that one is idle, the next request brings it back.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.models.demo import ensure_demo_model
from meshllm.testing import (
    ChatStream,
    NodeProcess,
    chat,
    group_pids,
    http,
    mesh_models,
    token_of,
    wait_for,
)

pytestmark = pytest.mark.integration

SMALL = {"MESHLLM_MIN_MODEL_BYTES": "0"}
SERVING = ("--bind", "127.0.0.1:0", "--llama-arg=-t", "--llama-arg=1", "--max-vram", "4")


def models_in(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        ensure_demo_model(directory, seed=seed, name=name)
    return directory


def warm(node: NodeProcess, model: str) -> bool:
    return bool(mesh_models(node.port).get(model, {}).get("nodes"))


def llama_servers(node: NodeProcess) -> int:
    names = []
    for pid in group_pids(node):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names.count("llama-server")


def test_a_models_dir_node_serves_every_model_on_its_disk(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    names = ("dir-a", "dir-b", "dir-c")
    directory = models_in(tmp_path / "models", *names)
    a = start_node("--models-dir", str(directory), "--min-size-mb", "0", *SERVING, name="A")
    wait_for(lambda: all(warm(a, n) for n in names), 60, "every model of the directory warm")
    answers = {n: chat(a.port, n)["choices"][0]["message"]["content"] for n in names}
    assert len(set(answers.values())) == 3  # three models, three sets of weights
    assert llama_servers(a) == 3
    status = a.ctl("status").stdout
    for n in names:
        assert n in status
    # A lite client sees them as A's and reaches each one through the tunnel.
    c = start_node("--client", "--join", token_of(a), name="C", env=SMALL)
    wait_for(lambda: all(warm(c, n) for n in names), 30, "the client's routes")
    for n in names:
        assert chat(c.port, n)["choices"][0]["message"]["content"] == answers[n]
        assert mesh_models(c.port)[n]["nodes"] == [a.status()["node_id"]]


def test_a_models_dir_without_models_or_missing_is_refused_clearly(
    tmp_path: Path,
) -> None:
    from tests.test_node import meshllm_up

    (tmp_path / "empty").mkdir()
    home = tmp_path / "home"
    out = meshllm_up("--home", str(home), "--models-dir", str(tmp_path / "empty"), "--port", "0")
    assert out.returncode != 0
    assert "no GGUF model of at least 500 MB there" in out.stderr, out.stderr
    assert "--min-size-mb 0" in out.stderr
    other = tmp_path / "other-home"
    out = meshllm_up("--home", str(other), "--models-dir", str(tmp_path / "none"), "--port", "0")
    assert out.returncode != 0 and "no such directory" in out.stderr, out.stderr
    assert not other.exists() and not (tmp_path / "none").exists()  # nothing written


def entry_and_switcher(
    start_node: Callable[..., NodeProcess], tmp_path: Path, load_wait: float, idle_unload: float
) -> tuple[NodeProcess, NodeProcess, str, str]:
    """A (`--model dm-a`, the entry node) and B (`--join` alone, dm-b and dm-c on its disk,
    one llama-server: no --models-dir): (A, B, the model B serves, the cold one)."""
    a_dir = models_in(tmp_path / "a-models", "dm-a")
    b_dir = models_in(tmp_path / "b-models", "dm-b", "dm-c")
    a = start_node(
        "--models-dir", str(a_dir), "--model", "dm-a", "--load-wait", f"{load_wait:g}",
        *SERVING, name="A", env=SMALL,
    )  # fmt: skip
    b = start_node(
        "--join", token_of(a), "--idle-unload", f"{idle_unload:g}", *SERVING,
        name="B", env={**SMALL, "MESHLLM_MODELS_DIR": str(b_dir)},
    )  # fmt: skip
    first = wait_for(lambda: serving(b), 60, "B serving")
    other = "dm-c" if first == "dm-b" else "dm-b"
    wait_for(lambda: other in mesh_models(a.port) and not warm(a, other), 30, f"{other} cold")
    return a, b, first, other


def test_an_idle_server_switches_to_a_model_asked_for_and_back_once_idle(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    idle_unload = 20.0
    a, b, first, other = entry_and_switcher(start_node, tmp_path, 5, idle_unload)

    # Asked for through A: B's model was never asked for, so B switches; the request waits.
    started = time.monotonic()
    chat(a.port, other)
    waited = time.monotonic() - started
    assert serving(b) == other
    assert "moved from " + first in b.log()
    assert waited < 5

    # Asked for again at once: what B serves now is in use, so `first` stays cold.
    status, headers, body = http(a.port, "POST", "/v1/chat/completions", request(first))
    assert status == 503, body
    assert int(headers["retry-after"]) >= 1
    assert "waited 5 s for a node to load it" in json.loads(body)["error"]["message"]
    assert serving(b) == other

    # Once `other` is idle for B's --idle-unload, the next request for `first` loads it.
    time.sleep(max(0.0, started + idle_unload - time.monotonic()))
    wait_for(
        lambda: http(a.port, "POST", "/v1/chat/completions", request(first))[0] == 200,
        30,
        f"{first} loaded again",
        interval=1.0,
    )
    assert serving(b) == first


def test_a_server_that_makes_way_for_another_model_ends_its_streams_first(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    a, b, first, other = entry_and_switcher(start_node, tmp_path, 30, 1)
    wait_for(lambda: warm(a, first), 30, f"{first} routed from A")
    # A long stream on B's model; a second later the model counts as idle (nobody asked
    # for it since), and a request for the other model makes B switch.
    body = {"model": first, "messages": [{"role": "user", "content": "a story"}]}
    stream = ChatStream(a.port, {**body, "max_tokens": 3000, "temperature": 0}).start()
    wait_for(lambda: stream.events >= 3, 30, "the stream to start")
    time.sleep(1.5)
    assert not stream.ended, "the stream ended before the switch: make it longer"
    answer = chat(a.port, other)  # waits for B to load it
    switched_at = time.monotonic()
    stream.join(60)
    assert stream.ok, stream.error
    assert stream.ended_at <= switched_at  # the new model came only after the stream ended
    assert answer["choices"] and serving(b) == other
    assert f"{first} takes no new requests" in b.log()


def serving(node: NodeProcess) -> str:
    """The model the node's (one) llama-server serves, once ready; '' before."""
    server = node.status()["server"]
    return str(server["model"]) if server["state"] == "ready" else ""


def request(model: str) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
