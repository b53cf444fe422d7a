"""llama.cpp's RPC server as a worker runs it (meshllm.runtime.rpc), with real processes:
it listens on loopback only, and a llama-server that offloads its layers to it answers
exactly as the same model served alone (temperature 0)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.runtime.binaries import BinaryNotFound, find_binary
from meshllm.runtime.procutil import _proc_address, listening_addresses
from meshllm.runtime.rpc import rpc_server_command, split_args

START_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_proc_addresses_read_as_written() -> None:
    assert _proc_address("0100007F") == "127.0.0.1"
    assert _proc_address("00000000") == "0.0.0.0"
    assert _proc_address("00000000000000000000000001000000") == "::1"
    assert _proc_address("00000000000000000000000000000000") == "::"


def test_split_args_name_every_worker_and_share() -> None:
    args = split_args([5001, 5002], [0.5, 0.25, 0.25])
    assert args[args.index("--rpc") + 1] == "127.0.0.1:5001,127.0.0.1:5002"
    assert args[args.index("--tensor-split") + 1] == "0.5000,0.2500,0.2500"
    with pytest.raises(ValueError):
        split_args([], [1.0])


def test_the_rpc_server_binds_loopback_and_keeps_a_cache() -> None:
    command = rpc_server_command("rpc", 5001)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--cache" in command


@pytest.fixture
def rpc_binary() -> str:
    try:
        return find_binary("rpc-server")
    except BinaryNotFound as exc:
        pytest.fail(f"integration tests need the RPC server: {exc}")


class Started:
    """Processes a test started, all stopped at its end whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
        import os

        proc = subprocess.Popen(
            command,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture
def started() -> Iterator[Started]:
    procs = Started()
    try:
        yield procs
    finally:
        procs.stop()


def wait_until(check: object, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited: {log.read_text()[-2000:]}")
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-2000:]}")


def chat(port: int) -> str:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        body,
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        content: str = json.load(response)["choices"][0]["message"]["content"]
        return content


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def serve(
    started: Started, llama_server: str, model: Path, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [llama_server, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    proc = started.start([*command, "--threads", "1", "--no-webui", *extra], log)
    wait_until(lambda: healthy(port), "llama-server's /health", proc, log)
    return proc, port


@pytest.mark.integration
def test_layers_on_an_rpc_worker_answer_as_the_model_alone(
    started: Started,
    rpc_binary: str,
    llama_server: str,
    demo_model: Path,
    tmp_path: Path,
) -> None:
    rpc_port = free_port()
    rpc_log = tmp_path / "rpc.log"
    rpc = started.start(
        rpc_server_command(rpc_binary, rpc_port), rpc_log, LLAMA_CACHE=str(tmp_path / "cache")
    )
    wait_until(lambda: listening_addresses(rpc.pid), "the RPC server to listen", rpc, rpc_log)
    # Never a network interface: the RPC server has no authentication.
    assert listening_addresses(rpc.pid) == {("127.0.0.1", rpc_port)}

    split_server, split_port = serve(
        started,
        llama_server,
        demo_model,
        tmp_path / "split.log",
        *split_args([rpc_port], [1.0]),
    )
    split_answer = chat(split_port)
    assert "Accepted client connection" in rpc_log.read_text()  # the layers went there
    split_server.kill()
    _, solo_port = serve(started, llama_server, demo_model, tmp_path / "solo.log")
    assert split_answer == chat(solo_port)
    assert split_answer
