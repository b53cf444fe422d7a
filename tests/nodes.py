"""Real node processes for integration tests: start, wait, query, always stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

API_LINE = re.compile(r"OpenAI API at http://([\d.]+):(\d+)/v1")


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; fail saying what it last saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw: {last!r}")


def http(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def chat(port: int, model: str, content: str = "hello", max_tokens: int = 16, **extra: Any) -> Any:
    status, _, body = http(
        port,
        "POST",
        "/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        },
    )
    assert status == 200, body
    return json.loads(body)


class NodeProcess:
    """`meshllm up` in its own process group, with its own home and log file."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log_path = home / "node-stdout.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> NodeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_file = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "meshllm", "up", "--home", str(self.home), *self.args]
        if "--port" not in self.args:
            cmd += ["--port", "0"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        self.port = int(wait_for(self._api_port, 30, f"{self.home} to open its API"))
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _api_port(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        match = API_LINE.search(self.log())
        return match.group(2) if match else None

    def wait_ready(self, model: str | None = None, timeout: float = 60) -> NodeProcess:
        def ready() -> bool:
            _status, _, body = http(self.port, "GET", "/v1/models", timeout=2)
            data = json.loads(body)["data"]
            warm = {m["id"] for m in data if m["meshllm"]["status"] == "warm"}
            return model in warm if model else bool(warm)

        wait_for(ready, timeout, f"{model or 'a model'} to be warm on :{self.port}")
        return self

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshllm", "ctl", *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    def status(self) -> dict[str, Any]:
        out = self.ctl("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Always leaves nothing behind: SIGTERM, then SIGKILL of the whole group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.log_file.close()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def token_of(node: NodeProcess, timeout: float = 10) -> str:
    """The node's invite token: the line after `invite token` in its log (a first node
    prints it), else `meshllm ctl token` (any node)."""

    def find() -> str | None:
        lines = node.log().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith("invite token") and lines[i + 1].strip():
                return lines[i + 1].strip()
        out = node.ctl("token", timeout=5)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None

    token: str = wait_for(find, timeout, f"the invite token of {node.home}", interval=0.2)
    return token


def mesh_models(port: int, timeout: float = 5) -> dict[str, dict[str, Any]]:
    """`/v1/models` of a node: model id -> its `meshllm` field (status, nodes)."""
    status, _, body = http(port, "GET", "/v1/models", timeout=timeout)
    assert status == 200, body
    return {m["id"]: m["meshllm"] for m in json.loads(body)["data"]}
