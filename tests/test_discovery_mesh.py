"""`meshllm up --discover` on two real nodes, and `meshllm discover` hearing both, with
mDNS kept on loopback (`MESHLLM_MDNS_INTERFACES=127.0.0.1`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshllm.mesh.mdns import ENV_INTERFACES
from meshllm.mesh.token import decode_token, mesh_id_of
from meshllm.testing import NodeProcess, quic_ports, token_of, wait_for

pytestmark = pytest.mark.integration

LOOPBACK_MDNS = {ENV_INTERFACES: "127.0.0.1"}
ARGS = ("--discover", "--bind", "127.0.0.1:0", "--llama-arg=-t", "--llama-arg=1")
WAIT_S = 60.0


def discover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshllm", "discover", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **LOOPBACK_MDNS},
    )


def heard_nodes(timeout: float = 2.0) -> dict[str, Any]:
    """`meshllm discover --json`: node id -> its advertisement (in any mesh)."""
    out = discover("--json", "--timeout", str(timeout))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return {n["node_id"]: n for mesh in data["meshes"] for n in mesh["nodes"]}


@pytest.fixture
def homes() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="meshllm-discover-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_discover_hears_both_nodes_of_a_mesh_and_not_its_secret(homes: Path) -> None:
    a = NodeProcess(homes / "a", *ARGS, env=LOOPBACK_MDNS)
    b: NodeProcess | None = None
    try:
        a.start()
        token = token_of(a)
        b = NodeProcess(homes / "b", *ARGS, "--client", "--join", token, env=LOOPBACK_MDNS)
        b.start()
        ids = {a.status()["node_id"]: a, b.status()["node_id"]: b}
        secret = decode_token(token).secret

        def both() -> dict[str, Any] | None:
            nodes = heard_nodes()
            return nodes if set(ids) <= set(nodes) else None

        nodes = wait_for(both, WAIT_S, "meshllm discover to hear both nodes", interval=0.2)
        for node_id, node in ids.items():
            assert nodes[node_id]["mesh_id"] == mesh_id_of(secret)
            assert nodes[node_id]["addresses"] == [f"127.0.0.1:{quic_ports(node)[0]}"]

        text = discover("--timeout", "2")
        assert text.returncode == 0, text.stderr
        assert f"mesh {mesh_id_of(secret)}: 2 nodes" in text.stdout
        assert "still needs its invite token" in text.stdout
        for shown in (text.stdout, json.dumps(nodes)):
            assert token not in shown and secret.hex() not in shown

        # The model the mesh serves reaches the advertisements (the client's too).
        wait_for(
            lambda: all("meshllm-demo" in n["models"] for n in heard_nodes().values()),
            WAIT_S,
            "both advertisements to name the demo model",
            interval=0.2,
        )

        # A stopped node says goodbye: it is no longer heard.
        b.stop()
        gone = next(i for i, n in ids.items() if n is b)
        wait_for(lambda: gone not in heard_nodes(), WAIT_S, "the stopped node to be gone")
    finally:
        if b is not None:
            b.stop()
        a.stop()
