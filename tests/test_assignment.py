"""Auto-assignment with real nodes on loopback (docs/design.md,
"Placement").

A seeding node names two models and serves the first; the second is listed cold
until a node joining with `--join` alone takes it: the file on its disk (rule 1)
or downloaded from a local HTTP server (rule 2). Later nodes add capacity to
the least-served model, a node whose `--max-vram` fits no model serves nothing,
and when the last server of a model drops, a node with room moves to it.

Every node has its own models directory (`MESHLLM_MODELS_DIR`) and counts the
~490 KB demo GGUFs as models (`MESHLLM_MIN_MODEL_BYTES`).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshllm.testing import NodeProcess, chat, mesh_models, token_of, wait_for

pytestmark = pytest.mark.integration

ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
LOOPBACK = ("--bind", "127.0.0.1:0")
SERVING = (*LOOPBACK, *ONE_THREAD)
A = "meshllm-demo"
B = "meshllm-demo-b"
FITS_ONE = ("--max-vram", "0.001")
"""1 MB: room for one ~490 KB demo model (with the 10% overhead), and less than the
seeding node announces, so the seeding node stays the host of its model."""
FITS_NONE = ("--max-vram", "0.0001")
"""100 KB: no demo model fits."""
COLD_GRACE_S = 10.0
"""The cold grace of the spare that moves (`--cold-grace`; 30 s by default): long
enough that the test sees the model cold before the spare takes it."""

StartNode = Callable[..., NodeProcess]


@dataclass(frozen=True)
class Models:
    a: Path
    b: Path


@pytest.fixture
def models(demo_model: Path, second_model: Path) -> Models:
    return Models(demo_model, second_model)


def models_dir(tmp_path: Path, name: str, *files: Path) -> dict[str, str]:
    """The environment of a node whose models directory holds copies of `files`."""
    directory = tmp_path / f"models-{name}"
    directory.mkdir()
    for f in files:
        shutil.copy(f, directory / f.name)
    return {"MESHLLM_MODELS_DIR": str(directory), "MESHLLM_MIN_MODEL_BYTES": "1000"}


def node_id(node: NodeProcess) -> str:
    return str(node.status()["node_id"])


def decisions(node: NodeProcess) -> list[tuple[str, str]]:
    """(model or "nothing", reason) of every decision the node's Elector logged."""
    return re.findall(r"decided: serve (\S+) \(([a-z-]+)", node.log())


def wait_listing(node: NodeProcess, want: dict[str, set[str]], timeout: float = 60) -> None:
    """Until the node's `/v1/models` shows each model served by exactly these node ids."""

    def matches() -> bool:
        seen = mesh_models(node.port, timeout=2)
        got = {name: set(seen[name]["nodes"]) if name in seen else None for name in want}
        if got != want:
            raise AssertionError(f"listed {seen}")
        return True

    wait_for(matches, timeout, f"{want} on :{node.port}", interval=0.2)


def me(node: NodeProcess) -> dict[str, Any]:
    """The node's own announcement, from `ctl status --json` (once gossip has made it)."""
    found: dict[str, Any] = wait_for(lambda: node.status()["me"], 10, "the node's announcement")
    return found


def serving(node: NodeProcess) -> str:
    """What `ctl status --json` says the node serves ("" for nothing), once its server
    state and its announcement agree."""

    def agreed() -> str | None:
        status = node.status()
        model: str = status["server"]["model"]
        announced = status["me"]["serving"] if status["me"] else "?"
        if (announced or "") != model:
            raise AssertionError(f"server {status['server']}, announced {announced!r}")
        return model or "nothing"

    model: str = wait_for(agreed, 10, "server state and announcement to agree", interval=0.2)
    return "" if model == "nothing" else model


def assert_cold(node: NodeProcess, model: str) -> None:
    assert mesh_models(node.port)[model] == {"status": "cold", "nodes": []}


def seed(start_node: StartNode, models: Models, env: dict[str, str], *second: str) -> NodeProcess:
    """The seeding node: serves A, names `second` as the catalog's other model."""
    node = start_node("--model", str(models.a), *second, *SERVING, name="seed", env=env)
    node.wait_ready(A)
    return node


# -- rule 1, least-served, too little memory ------------------------------------------


def test_rule1_on_disk_then_capacity_to_the_least_served(
    start_node: StartNode, models: Models, tmp_path: Path
) -> None:
    s = seed(start_node, models, models_dir(tmp_path, "seed"), "--model", str(models.b))
    token = token_of(s)
    ids = {"s": node_id(s)}
    assert_cold(s, B)  # seeded: listed with zero nodes until someone takes it
    assert me(s)["requested_models"] == [A, B]

    # Rule 1: B is unserved and on this node's disk (A is not: it cannot get A at all).
    j1 = start_node("--join", token, *SERVING, name="j1", env=models_dir(tmp_path, "j1", models.b))
    ids["j1"] = node_id(j1)
    wait_listing(s, {A: {ids["s"]}, B: {ids["j1"]}})
    assert decisions(j1)[-1] == (B, "unserved-on-disk")
    assert serving(j1) == B
    assert chat(s.port, B, max_tokens=4)["choices"][0]["finish_reason"] == "length"

    # A second server of A, by explicit choice: A has two servers, B one.
    x = start_node(
        "--model", str(models.a), "--join", token, *SERVING, name="x", env=models_dir(tmp_path, "x")
    )
    ids["x"] = node_id(x)
    wait_listing(s, {A: {ids["s"], ids["x"]}, B: {ids["j1"]}})

    # Both models on disk, both served: the third auto-assigned node adds capacity to the
    # least-served, B (a tie would have gone to A: same size, the smaller name).
    env = models_dir(tmp_path, "j2", models.a, models.b)
    j2 = start_node("--join", token, *SERVING, name="j2", env=env)
    ids["j2"] = node_id(j2)
    wait_listing(s, {A: {ids["s"], ids["x"]}, B: {ids["j1"], ids["j2"]}})
    assert decisions(j2)[-1] == (B, "least-served-on-disk")
    assert serving(j2) == B

    # Too little memory for any model: it joins, serves nothing, and everyone sees that.
    env = models_dir(tmp_path, "small", models.a, models.b)
    small = start_node("--join", token, *FITS_NONE, *LOOPBACK, name="small", env=env)
    small_id = node_id(small)
    wait_for(
        lambda: decisions(small) and decisions(small)[-1],
        30,
        "the small node to decide",
    )
    assert decisions(small)[-1] == ("nothing", "nothing-fits")
    wait_for(lambda: small_id in {p["node_id"] for p in s.status()["peers"]}, 15, "s to see small")
    wait_listing(small, {A: {ids["s"], ids["x"]}, B: {ids["j1"], ids["j2"]}})
    time.sleep(2)  # a decision holds: nothing changes while the mesh does not
    assert serving(small) == ""
    assert small.status()["server"]["state"] == "stopped"
    announced = me(small)
    assert announced["vram_bytes"] == 100_000 and set(announced["available_models"]) == {A, B}
    peer = {p["node_id"]: p for p in s.status()["peers"]}[small_id]
    assert peer["serving"] is None and peer["role"] == "idle"
    assert [d for d in decisions(small) if d[0] != "nothing"] == []
    wait_listing(s, {A: {ids["s"], ids["x"]}, B: {ids["j1"], ids["j2"]}})


def test_a_model_seeded_by_name_only_is_taken_by_a_node_that_has_it(
    start_node: StartNode, models: Models, tmp_path: Path
) -> None:
    """`--model A --model C` where C is nowhere the seed can find it: the seed still starts,
    warns, and requests C; a node with C on its disk takes it by rule 1."""
    c = "meshllm-demo-c"
    s = seed(start_node, models, models_dir(tmp_path, "seed"), "--model", c)
    assert f"--model {c} is seeded by name only" in s.log()
    assert_cold(s, c)
    assert me(s)["requested_models"] == [A, c]
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(models.b, held / f"{c}.gguf")
    j = start_node(
        "--join", token_of(s), *SERVING, name="j", env=models_dir(tmp_path, "j", held / f"{c}.gguf")
    )
    wait_listing(s, {A: {node_id(s)}, c: {node_id(j)}})
    assert decisions(j)[-1] == (c, "unserved-on-disk")
    assert chat(s.port, c, max_tokens=4)["choices"][0]["finish_reason"] == "length"


# -- rule 2: a download from the seed's URL --------------------------------------------


class FileServer:
    """A local HTTP server for model files, recording every request path."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                server.requests.append((self.command, self.path))

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(directory))
        )
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def file_server(tmp_path: Path, second_model: Path) -> Iterator[FileServer]:
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(second_model, served / second_model.name)
    server = FileServer(served)
    yield server
    server.close()


def test_rule2_unserved_model_is_downloaded(
    start_node: StartNode, models: Models, tmp_path: Path, file_server: FileServer
) -> None:
    url = file_server.url(models.b.name)
    digest = hashlib.sha256(models.b.read_bytes()).hexdigest()
    # Others fetch a proposed model only with its size and digest: the URL carries the digest.
    s = seed(start_node, models, models_dir(tmp_path, "seed"), "--model", f"{url}#sha256={digest}")
    assert_cold(s, B)
    announced = me(s)
    assert announced["requested_models"] == [A, B] and announced["model_urls"] == {B: url}
    assert announced["model_sha256"] == {B: digest}
    # The seed only asks B's size (so others can tell whether it fits), never fetches it.
    assert file_server.requests == [("HEAD", f"/{models.b.name}")]
    assert announced["model_sizes"][B] == models.b.stat().st_size

    # Nothing on this node's disk: B is unserved and downloadable (rule 2); A cannot be had.
    env = models_dir(tmp_path, "j1")
    j1 = start_node("--join", token_of(s), *SERVING, name="j1", env=env)
    wait_listing(s, {A: {node_id(s)}, B: {node_id(j1)}})
    assert decisions(j1)[-1] == (B, "unserved-download")
    assert serving(j1) == B
    downloaded = Path(env["MESHLLM_MODELS_DIR"]) / models.b.name
    assert downloaded.read_bytes() == models.b.read_bytes()
    assert ("GET", f"/{models.b.name}") in file_server.requests
    assert chat(s.port, B, max_tokens=4)["choices"][0]["finish_reason"] == "length"


# -- a model whose last server drops finds a new one -------------------------------------


def test_a_node_with_room_takes_a_model_whose_only_server_dropped(
    start_node: StartNode, models: Models, tmp_path: Path
) -> None:
    # This time B is in the catalog because it is on the seed's disk (available_models).
    s = seed(start_node, models, models_dir(tmp_path, "seed", models.b))
    token = token_of(s)
    ids = {"s": node_id(s)}
    assert me(s)["available_models"] == [B]
    assert_cold(s, B)

    j1 = start_node("--join", token, *SERVING, name="j1", env=models_dir(tmp_path, "j1", models.b))
    ids["j1"] = node_id(j1)
    wait_listing(s, {A: {ids["s"]}, B: {ids["j1"]}})

    # One server each: the next node adds capacity to A (the tie goes to the smaller name).
    # It has less memory than the seed, so the seed stays A's host and j2 is a spare.
    env = models_dir(tmp_path, "j2", models.a, models.b)
    grace = ("--cold-grace", str(COLD_GRACE_S))
    j2 = start_node("--join", token, *FITS_ONE, *SERVING, *grace, name="j2", env=env)
    ids["j2"] = node_id(j2)
    wait_listing(s, {A: {ids["s"], ids["j2"]}, B: {ids["j1"]}})
    assert decisions(j2)[-1] == (A, "least-served-on-disk")

    # And one that waits: no model fits it.
    env = models_dir(tmp_path, "small", models.a, models.b)
    small = start_node("--join", token, *FITS_NONE, *LOOPBACK, name="small", env=env)
    wait_for(lambda: decisions(small), 30, "the small node to decide")

    out = j1.ctl("drop", B)
    assert out.returncode == 0, out.stderr
    dropped_at = time.monotonic()
    assert j1.wait_exit(15) == 0
    wait_listing(s, {A: {ids["s"], ids["j2"]}, B: set()}, timeout=5)
    assert_cold(s, B)
    # The spare keeps A through a short absence (a restarting server is not replaced),
    # then moves to the cold model; the seed, A's host, stays. The wait is shorter than
    # the default grace (30 s): j2 moves on its own `--cold-grace`.
    wait_listing(s, {A: {ids["s"]}, B: {ids["j2"]}}, timeout=COLD_GRACE_S + 15)
    took = time.monotonic() - dropped_at
    print(f"\n{B} cold after its only server dropped; j2 took it after {took:.1f}s")
    assert decisions(j2)[-1] == (B, "unserved-on-disk")
    assert f"moved from {A}" in j2.log()
    assert serving(j2) == B and serving(small) == ""
    assert decisions(small)[-1] == ("nothing", "nothing-fits")
    wait_listing(small, {A: {ids["s"]}, B: {ids["j2"]}})
    assert chat(small.port, B, max_tokens=4)["choices"][0]["finish_reason"] == "length"
