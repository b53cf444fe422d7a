"""A node stops promptly while its model is still downloading (real node, local HTTP server)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshllm.testing import NodeProcess, wait_for

pytestmark = pytest.mark.integration

SIZE = 50_000_000


class _Slow(http.server.BaseHTTPRequestHandler):
    """Serves a large file a little at a time, so the download is still going when we stop."""

    stop = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", str(SIZE))
        self.end_headers()
        sent = 0
        while sent < SIZE and not self.stop.is_set():
            try:
                self.wfile.write(b"\0" * 65536)
            except OSError:
                return
            sent += 65536
            time.sleep(0.1)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        _Slow.stop.set()
        server.shutdown()
        server.server_close()


def test_stop_during_a_download_is_prompt(
    start_node: Callable[..., NodeProcess], slow_server: int, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{slow_server}/slow.gguf"
    node = start_node(
        "--model", url, "--bind", "127.0.0.1:0", env={"MESHLLM_MODELS_DIR": str(tmp_path)}
    )
    wait_for(lambda: node.status()["server"]["state"] == "downloading", 30, "the download to start")
    assert node.ctl("stop").returncode == 0
    assert node.wait_exit(15) == 0
    # The download thread let go at its next chunk, so every actor stopped by itself: the
    # root had to terminate none (it would after its stop grace).
    assert "did not stop in" not in node.log()
    assert (tmp_path / "slow.gguf.part").exists()  # kept, so the next start resumes
    assert not (tmp_path / "slow.gguf").exists()
