"""Real `meshllm up` processes for the tests and the benchmark: start, wait, ask, always stop.

The one harness that `tests/` and `bench/` share. It lives in the package, not
in either of them, because both drive the same command line the same way and
neither should import the other. A node runs `python -m meshllm up` in its own
session (so a stop reaches its whole process group), with its own home and a
log file that holds the root's and every actor's output.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path
from typing import IO, Any

from meshllm.runtime.paths import home_from
from meshllm.runtime.procutil import kill_tree

API_LINE = re.compile(rb"OpenAI API at http://[\d.]+:(\d+)/v1")
"""The line `meshllm up` logs once its API listens; the port is read from it."""
TOKEN_PREFIX = "invite token"
"""A first node prints this line, then its invite token on the next one."""


class NodeError(AssertionError):
    """A node exited when it should not have, or a wait ran out (says what it last saw)."""


class NodeExited(NodeError):
    """The node's process is gone: no wait on it can succeed any more."""


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; fail saying what it last saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except NodeExited:
            raise
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise NodeError(f"timed out after {timeout}s waiting for {what}; last saw: {last!r}")


def http(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port: (status, lower-cased headers, body)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""A Prometheus scrape: (sample name, labels) -> value."""


def scrape_metrics(port: int) -> Samples:
    """A node's `GET /metrics` (`meshllm.http.metrics`), parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, data = http(port, "GET", "/metrics")
    if status != 200 or not headers.get("content-type", "").startswith("text/plain"):
        raise NodeError(f"/metrics answered {status}: {data[:300]!r}")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(data.decode())
        for s in family.samples
    }


def chat(port: int, model: str, content: str = "hello", max_tokens: int = 16, **extra: Any) -> Any:
    """A deterministic (temperature 0) chat completion that must answer 200."""
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


def mesh_models(port: int, timeout: float = 5) -> dict[str, dict[str, Any]]:
    """`/v1/models` of a node: model id -> its `meshllm` field (status, nodes)."""
    status, _, body = http(port, "GET", "/v1/models", timeout=timeout)
    assert status == 200, body
    return {m["id"]: m["meshllm"] for m in json.loads(body)["data"]}


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class NodeProcess:
    """`meshllm up --home HOME ARGS` in its own process group, with its own log file.

    `cwd` is the source tree the node runs from (`python -m meshllm` there), so
    two versions of meshllm can run side by side; by default, this process's.
    """

    def __init__(
        self, home: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.home = home
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.log_path = home / "node-stdout.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.started_at = 0.0
        """perf_counter() just before the process was started."""
        self.port = 0
        """The OpenAI API's port, once known (`start`, `port_from_log`)."""
        self.killed = False
        """Killed on purpose (`kill_tree`): its exit is no failure."""
        self.model = ""
        self.server_port = 0
        self.server_pid = 0
        self.actor_pids: dict[str, int] = {}
        """What `wait_serving` found: the warm model, its llama-server and the actors."""

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"the node in {self.home} was never started")
        return self._proc

    @property
    def control_path(self) -> Path:
        """The node's control socket (what `meshllm ctl` talks to)."""
        return home_from(self.home).run_dir / "control.ipc"

    def start(self, wait: bool = True, timeout: float = 30) -> NodeProcess:
        """Start the node (`--port 0` unless the arguments name one); with `wait`, return
        once its API port is in the log."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "meshllm", "up", "--home", str(self.home), *self.args]
        if "--port" not in self.args:
            cmd += ["--port", "0"]
        self.started_at = time.perf_counter()
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        if wait:
            wait_for(self._started, timeout, f"{self.home} to open its API")
        return self

    def restart(self, timeout: float = 30) -> NodeProcess:
        """Stop the node and start it again with the same home and arguments (so the same
        key and token). The old log is kept aside, so the new API port line is the only
        one in `log_path`."""
        self.stop()
        kept = len(list(self.home.glob(f"{self.log_path.stem}.*{self.log_path.suffix}")))
        self.log_path.rename(self.log_path.with_suffix(f".{kept + 1}{self.log_path.suffix}"))
        self._proc = None
        self.port = 0
        self.killed = False
        return self.start(timeout=timeout)

    def _started(self) -> int:
        self.check_alive()
        return self.port_from_log()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Fail with the end of the log if the node exited (unless it was killed on purpose)."""
        if self.proc.poll() is not None and not self.killed:
            raise NodeExited(
                f"node {self.home} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
            )

    def port_from_log(self) -> int:
        """The API port from the log (0 while it is not there yet); remembered in `port`."""
        if not self.port:
            try:
                match = API_LINE.search(self.log_path.read_bytes())
            except OSError:
                match = None
            self.port = int(match.group(1)) if match else 0
        return self.port

    def token_from_log(self) -> str:
        """The invite token a first node prints ("" when it printed none)."""
        lines = self.log().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith(TOKEN_PREFIX) and lines[i + 1].strip():
                return lines[i + 1].strip()
        return ""

    def warm_models(self) -> set[str]:
        _status, _, body = http(self.port, "GET", "/v1/models", timeout=2)
        data = json.loads(body)["data"]
        return {m["id"] for m in data if m.get("meshllm", {}).get("status") == "warm"}

    def wait_ready(self, model: str | None = None, timeout: float = 60) -> NodeProcess:
        """Until `model` (any model, if None) is warm in this node's `/v1/models`."""

        def ready() -> bool:
            self.check_alive()
            warm = self.warm_models()
            return model in warm if model else bool(warm)

        wait_for(ready, timeout, f"{model or 'a model'} to be warm on :{self.port}")
        return self

    def wait_serving(self, timeout: float = 60) -> NodeProcess:
        """Until this node's own llama-server is ready; fills `model`, `server_port`,
        `server_pid` and `actor_pids`."""

        def ready() -> dict[str, Any] | None:
            self.check_alive()
            st = self.status()
            server = st.get("server") or {}
            return st if server.get("state") == "ready" and server.get("port") else None

        st = wait_for(ready, timeout, "llama-server to be ready", interval=0.1)
        self.model = st["server"]["model"]
        self.server_port = int(st["server"]["port"])
        self.server_pid = int(st["server"].get("pid") or 0)
        self.actor_pids = {a["name"]: int(a["pid"]) for a in st.get("actors", [])}
        return self

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`meshllm ctl ARGS --home HOME`."""
        return subprocess.run(
            [sys.executable, "-m", "meshllm", "ctl", *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.cwd,
        )

    def status(self) -> dict[str, Any]:
        """`meshllm ctl status --json`."""
        out = self.ctl("status", "--json")
        if out.returncode != 0:
            raise NodeError(f"ctl status failed: {out.stderr.strip()}")
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM (the same shutdown as `meshllm ctl stop`), without waiting."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def kill_tree(self) -> list[int]:
        """kill -9 of the whole tree, as a machine losing power (`procutil.kill_tree`)."""
        self.killed = True
        return kill_tree(self.proc.pid)

    def stop(self, grace_s: float = 15) -> None:
        """Always leaves nothing behind: SIGTERM, then SIGKILL of the whole group."""
        if self._proc is None:
            return
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()


class PlainLlamaServer:
    """A llama-server of its own, outside any node (an external backend, `--backend-url`):
    one thread, on 127.0.0.1; `start` waits for its /health, `stop` kills it. Started
    again, it takes the same port."""

    def __init__(self, binary: str, model: Path, log_path: Path, port: int = 0) -> None:
        from meshllm.runtime.procutil import free_port

        self.binary = binary
        self.model = model
        self.log_path = log_path
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> PlainLlamaServer:
        cmd = [self.binary, "-m", str(self.model), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "-t", "1"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

        def healthy() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise NodeExited(f"llama-server exited: {self.log_path.read_text()[-2000:]}")
            return http(self.port, "GET", "/health", timeout=2)[0] == 200

        wait_for(healthy, timeout, f"llama-server on :{self.port} to be healthy")
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait(10)
        self._proc = None


def token_of(node: NodeProcess, timeout: float = 10) -> str:
    """The node's invite token: from its log (a first node prints it), else `meshllm ctl
    token` (any node)."""

    def find() -> str | None:
        if token := node.token_from_log():
            return token
        out = node.ctl("token", timeout=5)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None

    token: str = wait_for(find, timeout, f"the invite token of {node.home}", interval=0.2)
    return token


@contextlib.contextmanager
def running_node(
    *args: str, timeout: float = 60, keep_home: bool = False, repo: Path | None = None
) -> Iterator[NodeProcess]:
    """`meshllm up ARGS` (the demo model unless `args` say otherwise) in a temporary home,
    serving: its model warm and its llama-server ready. Always stopped, its home removed
    (unless `keep_home`)."""
    home = Path(tempfile.mkdtemp(prefix="meshllm-node-"))
    node = NodeProcess(home, *args, cwd=repo)
    try:
        node.start(timeout=timeout)
        node.wait_ready(timeout=timeout)
        node.wait_serving(timeout=timeout)
        yield node
    finally:
        node.stop()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)


MESH_ENDPOINT_LINE = re.compile(rb"mesh endpoint on \S+:(\d+)\s")
TUNNEL_PORT_LINE = re.compile(rb"tunnel on udp port (\d+)\s")


def quic_ports(node: NodeProcess, timeout: float = 30) -> tuple[int, int]:
    """The node's two QUIC ports, gossip and tunnel, as its log states them."""

    def read() -> tuple[int, int] | None:
        text = node.log_path.read_bytes()
        gossip, tunnel = MESH_ENDPOINT_LINE.search(text), TUNNEL_PORT_LINE.search(text)
        return (int(gossip.group(1)), int(tunnel.group(1))) if gossip and tunnel else None

    ports: tuple[int, int] = wait_for(read, timeout, f"the QUIC ports in {node.log_path}")
    return ports


def group_rss_kib(node: NodeProcess) -> int:
    """Resident memory (VmRSS, KiB) of every process in the node's process group.

    The QUIC endpoints live in actor processes, not in the root: all count.
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != node.proc.pid:  # the process group (field 5)
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(rss.group(1)) if rss else 0
    return total


def served_count(node: NodeProcess) -> int:
    """Requests the node's llama-server has completed (its log's "total time =" lines)."""
    try:
        return (
            (node.home / "logs" / "llama-server.log")
            .read_text(errors="replace")
            .count("total time =")
        )
    except OSError:
        return 0


def group_pids(node: NodeProcess) -> list[int]:
    """The node's processes: its process group and every descendant (llama-server too)."""
    parent: dict[int, int] = {}
    group: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parent[pid] = int(fields[1])
            if int(fields[2]) == node.proc.pid:
                group.add(pid)
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == node.proc.pid:
                return True
            pid = parent.get(pid, 0)
        return False

    return sorted(group | {pid for pid in parent if descends(pid)})


def open_fds(node: NodeProcess) -> int:
    """Open file descriptors of all the node's processes (`group_pids`)."""
    total = 0
    for pid in group_pids(node):
        try:
            total += len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            continue
    return total


def process_names(nodes: Iterable[NodeProcess]) -> dict[str, int]:
    """How many processes of each name (`/proc/PID/comm`) the nodes run."""
    names: dict[str, int] = {}
    for node in nodes:
        for pid in group_pids(node):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            names[name] = names.get(name, 0) + 1
    return names


@contextlib.asynccontextmanager
async def quic_stranger(port: int, host: str = "127.0.0.1") -> AsyncIterator[Any]:
    """A plain aioquic client from `host` to 127.0.0.1:`port` that completes the QUIC
    handshake and knows nothing of admission (no secret): what strangers can do.
    Yields its `QuicConnectionProtocol`; closed (and its socket) on the way out."""
    import asyncio
    import socket
    import ssl

    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from meshllm.mesh.quic import ALPN

    loop = asyncio.get_running_loop()
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    config.verify_mode = ssl.CERT_NONE
    config.server_name = "127.0.0.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(QuicConnection(configuration=config)), sock=sock
    )
    assert isinstance(protocol, QuicConnectionProtocol)
    try:
        protocol.connect(("127.0.0.1", port))
        async with asyncio.timeout(5):
            await protocol.wait_connected()
        yield protocol
    finally:
        protocol.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await protocol.wait_closed()
        transport.close()


async def websocket_attempt(
    app: Any, path: str, headers: list[tuple[bytes, bytes]]
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Offer an ASGI `app` (the Proxy's or the console's) a websocket connection, with
    the Starlette app inside it (`app.app`) replaced by a spy: what `app` sent back,
    and the scopes that reached the inside (none may: only plain HTTP is served)."""
    reached: list[Any] = []

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    app.app = spy
    sent: list[dict[str, Any]] = []
    received = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return received.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "websocket", "path": path, "headers": headers}, receive, send)
    return sent, reached


@dataclasses.dataclass
class ChatStream:
    """One streaming chat request through `port`, read to its end as a client would: in
    the caller's thread (`read`) or in a thread of its own (`start`, then `join`). It
    never raises: what went wrong is in `error`, so a load of many streams can count its
    failures and a test waiting on one can say how it ended. It stops at `[DONE]` or at
    an error event (a stream the Proxy cut), whichever comes first."""

    port: int
    body: dict[str, Any] | bytes = dataclasses.field(repr=False)
    """The request; a dict is sent as JSON with `"stream": true`."""
    timeout: float = 60.0
    """Seconds without a byte after which the read gives up (a hang)."""
    status: int = 0
    content_type: str = ""
    events: int = 0
    """Data events before the end (`[DONE]` and an error event not counted)."""
    tail: collections.deque[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=8), repr=False
    )
    """The last data events (for messages); a load of many streams keeps no more."""
    text: str = dataclasses.field(default="", repr=False)
    """The choices' `delta.content`, concatenated."""
    usage: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    """The last `usage` seen (`stream_options.include_usage`)."""
    done: bool = False
    """`[DONE]` came."""
    error: str = ""
    """The message of an error event, a non-200 answer's body, or what broke the read."""
    error_event: bool = False
    started_at: float = 0.0
    ended_at: float = 0.0
    ended: bool = False
    """Whether the read is over (`ended_at` is when)."""
    thread: threading.Thread | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error

    def start(self) -> ChatStream:
        """Read it in a daemon thread; returns at once."""
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a started stream to end; whether it has."""
        assert self.thread is not None, "join() a stream that was start()ed"
        self.thread.join(timeout)
        return self.ended

    def started(self, events: int = 3) -> bool:
        """Whether `events` data events came (for `wait_for`); raises once the stream
        ended without them, saying how."""
        if self.events >= events:
            return True
        if self.ended:
            raise AssertionError(f"the stream ended after {self.events} events: {self.error}")
        return False

    def read(self) -> ChatStream:
        """Send the request and read the answer to its end (or error)."""
        self.started_at = time.monotonic()
        body = self.body
        if isinstance(body, dict):
            body = json.dumps({**body, "stream": True}).encode()
        conn = HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request("POST", "/v1/chat/completions", body)
            resp = conn.getresponse()
            self.status = resp.status
            self.content_type = resp.getheader("content-type", "")
            if resp.status != 200:
                self.error = resp.read()[:300].decode(errors="replace")
                return self
            self._read_events(resp)
        except (OSError, HTTPException, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, TimeoutError):  # socket.timeout too
                self.error = f"no byte for {self.timeout:g} s (a hang): {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.ended = True
            conn.close()
        return self

    def _read_events(self, resp: HTTPResponse) -> None:
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            payload = line.removeprefix(b"data: ").strip()
            if payload == b"[DONE]":
                self.done = True
                return
            event = json.loads(payload)
            if "error" in event:
                self.error_event = True
                error = event["error"]
                self.error = str(error.get("message", error) if isinstance(error, dict) else error)
                return
            self.events += 1
            self.tail.append(event)
            for choice in event.get("choices") or ():
                self.text += (choice.get("delta") or {}).get("content") or ""
            if event.get("usage"):
                self.usage = event["usage"]
        self.error = "the stream ended without [DONE] or an error event"
