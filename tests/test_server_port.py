"""llama-server's port is picked by the node and checked with /health, never read from
llama-server's output: a model whose metadata says "listening on ..." changes nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from actors.server_supervisor import bind_failed
from meshllm.models.demo import write_demo_model
from meshllm.runtime.procutil import free_port, listens_on_loopback
from meshllm.testing import chat, running_node

HOSTILE = "listening on http://127.0.0.1:1"


def test_free_port_is_a_bindable_loopback_port() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_port_squatted_by_another_process_is_not_the_childs() -> None:
    # Another local user can bind the picked port before llama-server does and answer
    # /health: the listening socket must be the child's own before it counts as ready.
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
            "print(s.getsockname()[1], flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None
        port = int(squatter.stdout.readline())
        assert listens_on_loopback(squatter.pid, port)
        assert not listens_on_loopback(os.getpid(), port)
        assert not listens_on_loopback(squatter.pid, free_port())
    finally:
        squatter.kill()
        squatter.wait()


def test_only_llama_servers_own_bind_error_for_our_port_counts() -> None:
    own = b"srv    operator(): couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 4242"
    assert bind_failed([own], 4242)
    assert bind_failed([b"noise", own + b"\r"], 4242)
    hostile = [
        own.replace(b"4242", b"4243"),  # another port
        own + b" and more",  # not the end of the line
        own.replace(b"127.0.0.1", b"10.0.0.1"),  # not the host we pass
        b"main: server is listening on http://127.0.0.1:4242",
        b"general.name str = listening on http://127.0.0.1:4242",
        b"",
    ]
    for line in hostile:
        assert not bind_failed([line], 4242), line


def test_metadata_that_says_listening_changes_nothing(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "hostile.gguf", name=HOSTILE)
    # --verbose: llama-server prints the model's metadata before its own listening line.
    args = ("--model", str(model), "--bind", "127.0.0.1:0", "--llama-arg=--verbose")
    with running_node(*args) as node:
        assert HOSTILE in (node.home / "logs" / "llama-server.log").read_text(errors="replace")
        assert node.server_port not in (0, 1)
        reply = chat(node.port, "hostile", max_tokens=4)
        assert reply["choices"][0]["message"]["content"] is not None
