"""Start and always stop a real `meshllm up` node for a benchmark section."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_LINE = re.compile(r"OpenAI API at http://([\d.]+):(\d+)/v1")
REPO = Path(__file__).resolve().parent.parent


class NodeError(RuntimeError):
    pass


@dataclass
class Node:
    """A running node: its API port, its llama-server port and the pids to watch."""

    home: Path
    proc: subprocess.Popen[bytes]
    api_port: int = 0
    server_port: int = 0
    server_pid: int = 0
    model: str = ""
    actor_pids: dict[str, int] | None = None
    repo: Path = REPO

    @property
    def log_path(self) -> Path:
        return self.home / "node-stdout.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ctl(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshllm", "ctl", *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.repo,
        )

    def status(self) -> dict[str, Any]:
        out = self.ctl("status", "--json")
        if out.returncode != 0:
            raise NodeError(f"ctl status failed: {out.stderr.strip()}")
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the whole process group: nothing is left behind."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _wait(what: str, node: Node, timeout: float, probe: Any) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise NodeError(f"node exited with {node.proc.returncode}:\n{node.log()[-4000:]}")
        try:
            last = probe()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise NodeError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def _warm(port: int) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
        data = json.loads(resp.read())["data"]
    warm = [m["id"] for m in data if m.get("meshllm", {}).get("status") == "warm"]
    return warm[0] if warm else None


@contextlib.contextmanager
def running_node(
    *args: str, timeout: float = 60, keep_home: bool = False, repo: Path = REPO
) -> Iterator[Node]:
    """`meshllm up` (demo model unless `args` say otherwise) in a temp home, ready to serve.

    `repo` is the source tree the node runs from (`python -m meshllm` in that
    directory), so two versions of meshllm can be compared side by side.
    """
    home = Path(tempfile.mkdtemp(prefix="meshllm-bench-"))
    log_file = (home / "node-stdout.log").open("ab")
    cmd = [sys.executable, "-m", "meshllm", "up", "--home", str(home), "--port", "0", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=repo,
        start_new_session=True,
    )
    node = Node(home, proc, repo=repo)
    try:
        match = _wait("the API line", node, timeout, lambda: API_LINE.search(node.log()))
        node.api_port = int(match.group(2))
        node.model = _wait("a warm model", node, timeout, lambda: _warm(node.api_port))

        def server_ready() -> dict[str, Any] | None:
            st = node.status()
            server = st.get("server") or {}
            return st if server.get("state") == "ready" and server.get("port") else None

        st = _wait("llama-server to be ready", node, timeout, server_ready)
        node.server_port = int(st["server"]["port"])
        node.server_pid = int(st["server"].get("pid") or 0)
        node.actor_pids = {a["name"]: int(a["pid"]) for a in st.get("actors", [])}
        yield node
    finally:
        node.stop()
        log_file.close()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
