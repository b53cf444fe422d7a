"""Model files a peer proposes (issue 9, item 4).

Unit tests of the gate every proposal passes (`proposed_source`, `model_sources`), then the
download checks black-box against a real HTTP server on 127.0.0.1: wrong size, wrong digest,
redirects to file:// and ftp://, too many redirects, a URL named like another model's file,
a file already on disk, and a full disk (a real 64 KiB tmpfs, mounted in a user namespace
with `unshare`, where the system allows it; a fake writer otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest

from actors.elector import model_sources
from actors.server_supervisor import DOWNLOAD_TRIES, ServerSupervisor
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.models import download as download_mod
from meshllm.models.catalog import (
    CATALOG,
    MAX_PROPOSED_BYTES,
    SourceRefused,
    proposed_source,
)
from meshllm.models.download import DownloadError, download_file, part_path
from meshllm.runtime import messages as m
from meshllm.runtime.backoff import Backoff
from meshllm.runtime.config import ModelSpec, NodeConfig
from meshllm.testing import NodeProcess, token_of, wait_for

DATA = os.urandom(200_000)
SHA = hashlib.sha256(DATA).hexdigest()
TIMEOUT = 5.0
MODELS_DIR = "/models"


# --- the gate: proposed_source ------------------------------------------------------------------


def test_a_complete_proposal_is_accepted_and_named_after_the_model() -> None:
    source = proposed_source("my-model", "https://h.example/dl/x.gguf?t=1", 10, SHA.upper())
    assert source.sha256 == SHA  # normalised to lowercase
    assert source.file == "my-model.gguf"  # never the URL's "x.gguf"


@pytest.mark.parametrize(
    ("name", "url", "size", "sha", "reason"),
    [
        ("m", "http://h/m.gguf", 10, None, "no sha256"),
        ("m", "http://h/m.gguf", 10, "", "no sha256"),
        ("m", "http://h/m.gguf", None, SHA, "no size"),
        ("m", "http://h/m.gguf", 0, SHA, "no size"),
        ("m", "http://h/m.gguf", -5, SHA, "no size"),
        ("m", "http://h/m.gguf", MAX_PROPOSED_BYTES + 1, SHA, "over the limit"),
        ("m", "http://h/m.gguf", 10, "xyz", "not 64 hex"),
        ("m", "http://h/m.gguf", 10, SHA + "00", "not 64 hex"),
        ("m", "ftp://h/m.gguf", 10, SHA, "not an http"),
        ("m", "file:///etc/passwd", 10, SHA, "not an http"),
        ("m", "javascript:alert(1)", 10, SHA, "not an http"),
        ("m", "http:///m.gguf", 10, SHA, "not an http"),
        ("m", "http://h:99999/m.gguf", 10, SHA, "malformed"),
        ("m", "http://h/a b.gguf", 10, SHA, "odd characters"),
        ("m", "http://h/\x1b[2J.gguf", 10, SHA, "odd characters"),
        ("m", "http://h/" + "a" * 3000, 10, SHA, "too long"),
        ("../m", "http://h/m.gguf", 10, SHA, "not a valid model name"),
        ("a/b", "http://h/m.gguf", 10, SHA, "not a valid model name"),
        (".hidden", "http://h/m.gguf", 10, SHA, "not a valid model name"),
        ("", "http://h/m.gguf", 10, SHA, "not a valid model name"),
        ("m.gguf", "http://h/m.gguf", 10, SHA, "not a valid model name"),
        ("x" * 200, "http://h/m.gguf", 10, SHA, "not a valid model name"),
        (CATALOG[0].name, "http://h/m.gguf", 10, SHA, "catalog model"),
        (CATALOG[0].name.lower(), "http://h/m.gguf", 10, SHA, "catalog model"),
    ],
)
def test_incomplete_or_unsafe_proposals_are_refused_with_a_reason(
    name: str, url: str, size: int | None, sha: str | None, reason: str
) -> None:
    with pytest.raises(SourceRefused, match=reason):
        proposed_source(name, url, size, sha)


# --- the elector's view: model_sources ------------------------------------------------------------


def ann(node_id: str, name: str, url: str, size: int | None, sha: str | None) -> PeerAnnouncement:
    return PeerAnnouncement(
        node_id=node_id,
        generation=1,
        requested_models=(name,),
        model_urls={name: url},
        model_sizes={} if size is None else {name: size},
        model_sha256={} if sha is None else {name: sha},
    )


def test_a_peer_cannot_replace_a_catalog_models_source() -> None:
    entry = CATALOG[0]
    hostile = ann("evil", entry.name, "http://evil.example/x.gguf", 5, "00" * 32)
    sources = model_sources((), [hostile], MODELS_DIR)
    spec = sources.specs[entry.name]
    assert (spec.url, spec.size, spec.sha256) == (entry.url, entry.size, entry.sha256)
    assert spec.target == f"{MODELS_DIR}/{entry.file}"


def test_a_proposal_without_a_digest_is_no_source_and_says_why() -> None:
    sources = model_sources((), [ann("p", "B", "http://h/B.gguf", 10, None)], MODELS_DIR)
    assert "B" not in sources.specs
    assert "no sha256" in sources.refused[("p", "B")]


def test_a_url_named_like_another_models_file_lands_in_its_own_file() -> None:
    entry = CATALOG[0]
    hostile = ann("evil", "innocent", f"http://evil.example/{entry.file}", 10, SHA)
    spec = model_sources((), [hostile], MODELS_DIR).specs["innocent"]
    assert spec.target == f"{MODELS_DIR}/innocent.gguf"
    assert spec.sha256 == SHA and spec.size == 10


def test_own_models_are_never_replaced_by_a_peer_and_never_reported() -> None:
    own = (ModelSpec("B", url="http://mine/B.gguf", target="/models/B.gguf"),)
    sources = model_sources(own, [ann("p", "B", "http://other/B.gguf", 10, SHA)], MODELS_DIR)
    assert sources.specs["B"] == own[0]
    assert not sources.refused


def test_competing_proposals_resolve_the_same_way_on_every_node() -> None:
    a = ann("node-a", "B", "http://a/B.gguf", 10, SHA)
    z = ann("node-z", "B", "http://z/B.gguf", 20, "cd" * 32)
    assert model_sources((), [z, a], MODELS_DIR).specs["B"].url == "http://a/B.gguf"
    assert model_sources((), [a, z], MODELS_DIR).specs["B"].url == "http://a/B.gguf"


# --- downloads against a real HTTP server ---------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Serves `files`; `redirects` maps a path to the Location it answers 302 with."""

    protocol_version = "HTTP/1.1"
    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}
    requests: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if (location := self.redirects.get(self.path)) is not None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/escape.gguf":  # a reason phrase with a terminal escape
            self.send_response(403, "\x1b[2Jdenied")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/no-length.gguf":  # the body ends when the connection closes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(DATA)
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server:
    def __init__(self) -> None:
        self.handler = type(
            "Handler", (_Handler,), {"files": {"/m.gguf": DATA}, "redirects": {}, "requests": []}
        )
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    @property
    def requests(self) -> list[str]:
        return self.handler.requests  # type: ignore[attr-defined]

    def redirect(self, path: str, location: str) -> None:
        self.handler.redirects[path] = location  # type: ignore[attr-defined]


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def fetch(url: str, dest: Path, size: int | None = len(DATA), sha: str | None = SHA) -> Path:
    """A download the way the ServerSupervisor makes one for a proposed model."""
    return download_file(
        url, dest, expected_size=size, sha256=sha, timeout=TIMEOUT, retries=2, sleep=lambda _: None
    ).path


def test_a_checked_download_reports_its_size_and_digest(server: Server, tmp_path: Path) -> None:
    done = download_file(server.url("/m.gguf"), tmp_path / "m.gguf", timeout=TIMEOUT)
    assert (done.size, done.sha256) == (len(DATA), SHA)  # what a node can then announce
    assert (tmp_path / "m.gguf").read_bytes() == DATA


def test_wrong_size_is_refused_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match="size mismatch") as err:
        fetch(server.url("/m.gguf"), dest, size=len(DATA) - 1)
    assert err.value.permanent
    assert not dest.exists() and not part_path(dest).exists()


def test_a_server_sending_more_than_the_announced_size_is_cut_off(
    server: Server, tmp_path: Path
) -> None:
    """No Content-Length: only the announced size bounds what lands on disk."""
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match="sent more than the 1000 bytes"):
        fetch(server.url("/no-length.gguf"), dest, size=1000)
    assert not dest.exists() and not part_path(dest).exists()


def test_wrong_digest_removes_the_partial_file_and_says_so(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=r"sha256 mismatch.*partial file was removed") as err:
        fetch(server.url("/m.gguf"), dest, sha="00" * 32)
    assert err.value.permanent
    assert not dest.exists() and not part_path(dest).exists()


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/m.gguf"])
def test_redirects_only_to_http(server: Server, tmp_path: Path, target: str) -> None:
    server.redirect("/r.gguf", target)
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match="not an http\\(s\\) URL") as err:
        fetch(server.url("/r.gguf"), dest)
    assert err.value.permanent
    assert not dest.exists()


def test_redirects_are_bounded(server: Server, tmp_path: Path) -> None:
    for i in range(6):
        server.redirect(f"/r{i}", server.url(f"/r{i + 1}"))
    server.handler.files["/r6"] = DATA  # type: ignore[attr-defined]
    # Five hops are followed ...
    assert fetch(server.url("/r1"), tmp_path / "a.gguf").read_bytes() == DATA
    # ... six are not, and neither is a loop.
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        fetch(server.url("/r0"), tmp_path / "b.gguf")
    server.redirect("/loop", server.url("/loop"))
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        fetch(server.url("/loop"), tmp_path / "c.gguf")
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "c.gguf").exists()


def test_a_url_named_after_another_models_file_cannot_touch_it(
    server: Server, tmp_path: Path
) -> None:
    """End to end: a hostile proposal whose URL ends in a catalog model's file name."""
    entry = CATALOG[0]
    victim = tmp_path / entry.file
    victim.write_bytes(b"the real model")
    server.handler.files[f"/{entry.file}"] = DATA  # type: ignore[attr-defined]
    hostile = ann("evil", "innocent", server.url(f"/{entry.file}"), len(DATA), SHA)
    spec = model_sources((), [hostile], str(tmp_path)).specs["innocent"]
    fetch(spec.url, Path(spec.target), spec.size, spec.sha256)
    assert victim.read_bytes() == b"the real model"
    assert (tmp_path / "innocent.gguf").read_bytes() == DATA


def test_an_existing_file_with_another_digest_is_not_replaced(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"someone else's model")
    with pytest.raises(
        DownloadError, match=r"already exists with different contents.*not replaced"
    ):
        fetch(server.url("/m.gguf"), dest)
    assert dest.read_bytes() == b"someone else's model"
    assert server.requests == []  # refused before any request


def test_an_existing_file_with_the_expected_digest_is_kept(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "m.gguf"
    dest.write_bytes(DATA)
    assert fetch(server.url("/m.gguf"), dest) == dest
    assert server.requests == []


def test_an_existing_file_without_a_digest_to_check_is_not_replaced(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"x" * len(DATA))
    with pytest.raises(DownloadError, match=r"no sha256 is known.*not replaced"):
        fetch(server.url("/m.gguf"), dest, sha=None)
    assert dest.read_bytes() == b"x" * len(DATA)


def test_a_symlink_at_the_destination_is_not_followed(server: Server, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.gguf").symlink_to(outside)
    with pytest.raises(DownloadError, match="not a regular file"):
        fetch(server.url("/m.gguf"), models / "m.gguf")
    part_path(models / "p.gguf").symlink_to(outside)
    with pytest.raises(DownloadError, match="cannot write"):
        fetch(server.url("/m.gguf"), models / "p.gguf")
    assert outside.read_bytes() == b"keep"


def test_a_servers_reason_phrase_is_not_passed_on_raw(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 403") as err:
        fetch(server.url("/escape.gguf"), tmp_path / "x.gguf")
    assert "\x1b" not in str(err.value) and "?[2Jdenied" in str(err.value)


def test_a_404_is_permanent_and_not_retried(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        fetch(server.url("/missing.gguf"), tmp_path / "x.gguf")
    assert err.value.permanent
    assert server.requests == ["/missing.gguf"]


# --- a full disk ---------------------------------------------------------------------------------


def test_disk_full_while_writing_stops_at_once_and_removes_the_partial_file(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake writer raises ENOSPC after the first chunk (the tmpfs test below does it for
    real where user namespaces are allowed)."""
    written: list[int] = []
    real_write = download_mod._Transfer._write

    def write(self: download_mod._Transfer, chunk: bytes) -> None:
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(chunk))
        real_write(self, chunk)

    monkeypatch.setattr(download_mod._Transfer, "_write", write)
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=r"disk full.*partial file was removed") as err:
        download_file(server.url("/m.gguf"), dest, timeout=TIMEOUT, chunk_size=4096)
    assert err.value.permanent
    assert server.requests == ["/m.gguf"]  # no retry loop
    assert not dest.exists() and not part_path(dest).exists()


def test_free_space_is_checked_against_the_announced_size_first(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        download_mod.shutil, "disk_usage", lambda _p: usage._replace(free=len(DATA) - 1)
    )
    with pytest.raises(DownloadError, match="not enough disk space"):
        fetch(server.url("/m.gguf"), tmp_path / "m.gguf")
    assert server.requests == []


_IN_TMPFS = """
import json, sys
from meshllm.models.download import DownloadError, download_file, part_path
url, dest, size = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    download_file(url, dest, expected_size=int(size) if size else None, timeout=5, retries=1)
    print(json.dumps({"ok": True}))
except DownloadError as exc:
    print(json.dumps({"error": str(exc), "permanent": exc.permanent,
                      "part": part_path(dest).exists()}))
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="no user namespaces to mount a tmpfs in")
@pytest.mark.parametrize("announced", [False, True])
def test_a_real_full_disk(server: Server, tmp_path: Path, announced: bool) -> None:
    """A 64 KiB tmpfs (mounted in a private user and mount namespace, no root needed) and a
    200 KB file: with no size known the write hits ENOSPC; with the size announced the
    download is refused before it starts. Either way nothing is left behind."""
    models = tmp_path / "models"
    models.mkdir()
    dest = models / "m.gguf"
    # Without a size (no Content-Length either) only the write can find the disk full.
    path, size = ("/m.gguf", str(len(DATA))) if announced else ("/no-length.gguf", "")
    script = (
        f"mount -t tmpfs -o size=64k none {models} && "
        f'exec "{sys.executable}" -c "$0" "$1" "$2" "$3"'
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, _IN_TMPFS, server.url(path), str(dest), size],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    expected = "not enough disk space" if announced else "disk full.*partial file was removed"
    assert outcome["error"] is not None
    assert re.search(expected, outcome["error"]), outcome
    assert outcome["permanent"] and not outcome["part"]
    assert server.requests == ([] if announced else [path])


# --- real nodes ---------------------------------------------------------------------------------

ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
LOOPBACK = ("--bind", "127.0.0.1:0")


class _Files(SimpleHTTPRequestHandler):
    """Serves a directory and records (method, path) of every request."""

    seen: list[tuple[str, str]]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.seen.append((self.command, self.path))

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def model_server(tmp_path: Path, second_model: Path) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A local HTTP server holding the second demo model: (its URL, the requests seen)."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(second_model, served / second_model.name)
    seen: list[tuple[str, str]] = []
    handler = type("Files", (_Files,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{second_model.name}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _models_env(tmp_path: Path, name: str, *files: Path) -> dict[str, str]:
    directory = tmp_path / f"models-{name}"
    directory.mkdir()
    for f in files:
        shutil.copy(f, directory / f.name)
    return {"MESHLLM_MODELS_DIR": str(directory), "MESHLLM_MIN_MODEL_BYTES": "1000"}


@pytest.mark.integration
def test_a_node_does_not_fetch_a_proposal_without_a_digest(
    start_node: Callable[..., NodeProcess],
    demo_model: Path,
    model_server: tuple[str, list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    """The seed proposes the second model by URL with no sha256: a joining node with nothing
    on disk says why the model has no download source there, serves nothing, and never
    requests the file."""
    url, seen = model_server
    env = _models_env(tmp_path, "seed", demo_model)
    seed = start_node(
        "--model", str(demo_model), "--model", url, *LOOPBACK, *ONE_THREAD, name="seed", env=env
    ).wait_ready(demo_model.stem)
    name = url.rsplit("/", 1)[1].removesuffix(".gguf")
    joined = start_node(
        "--join", token_of(seed), *LOOPBACK, name="j1", env=_models_env(tmp_path, "j1")
    )
    wait_for(
        lambda: (
            f"model {name!r} proposed by" in joined.log() and "no sha256 announced" in joined.log()
        ),
        30,
        "the joining node to refuse the proposal",
    )
    wait_for(lambda: "decided: serve nothing" in joined.log(), 30, "the joining node to decide")
    assert "decided: serve " + name not in joined.log()
    assert joined.status()["server"]["state"] == "stopped"
    assert [m for m, _ in seen] == ["HEAD"]  # the seed sized it; nobody fetched it


@pytest.mark.integration
def test_a_download_that_cannot_succeed_fails_once_with_its_reason(
    start_node: Callable[..., NodeProcess],
    model_server: tuple[str, list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    """A 404 is permanent: the node's server is failed with the reason in `ctl status`, and
    the file is not requested again (before this change the supervisor retried it every
    fraction of a second, forever)."""
    url, seen = model_server
    missing = url.rsplit("/", 1)[0] + "/missing.gguf"
    node = start_node("--model", missing, *LOOPBACK, env=_models_env(tmp_path, "n"))
    server = wait_for(
        lambda: (s := node.status()["server"])["state"] == "failed" and s,
        30,
        "the download to fail",
    )
    assert "HTTP 404" in server["reason"] and "no such file" in server["reason"]
    assert "HTTP 404" in node.ctl("status").stdout
    # A negative check needs a window: 2 s, in which the old supervisor retried ~5 times.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert [r for r in seen if r[0] == "GET"] == [("GET", "/missing.gguf")]
        assert node.status()["server"]["state"] == "failed"
        time.sleep(0.1)
    assert "restarting missing" not in node.log()


# --- the supervisor gives up ----------------------------------------------------------------------


class _Published:
    """Stands in for the actor's bus: keeps what it publishes."""

    def __init__(self) -> None:
        self.states: list[m.LocalServerState] = []
        self.changed = asyncio.Event()

    async def publish(self, topic: str, msg: m.Message) -> None:
        assert isinstance(msg, m.LocalServerState)
        self.states.append(msg)
        self.changed.set()

    async def until(self, predicate: Callable[[m.LocalServerState], bool]) -> None:
        async with asyncio.timeout(10):
            while not (self.states and predicate(self.states[-1])):
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.parametrize("permanent", [True, False])
def test_the_supervisor_gives_up_on_a_download_that_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, permanent: bool
) -> None:
    """A permanent failure (404, digest, disk full) is tried once; one that may pass (the
    downloader's own retries ran out) up to DOWNLOAD_TRIES times, with the shared Backoff;
    then the model stays failed with the reason until another one is wanted."""
    calls: list[str] = []

    def failing(url: str, dest: Path, **_: object) -> None:
        calls.append(url)
        raise DownloadError("the server said no", permanent=permanent)

    monkeypatch.setattr(download_mod, "download_file", failing)
    config = NodeConfig(home=str(tmp_path), run_dir=str(tmp_path), node_id="n")
    spec = ModelSpec("x", url="http://127.0.0.1:1/x.gguf", target=str(tmp_path / "x.gguf"))

    async def scenario() -> None:
        sup = ServerSupervisor(config)
        sup.bus = published = _Published()  # type: ignore[assignment]
        await sup.on_start()
        sup.download_policy = Backoff(base_s=0.0, max_s=0.0)  # no waiting between tries
        try:
            await sup.on_topic("wanted", m.ServeModel(spec, "test"))
            await published.until(lambda s: s.state == "failed" and sup.gave_up is spec)
            for _ in range(20):
                await asyncio.sleep(0)  # the loop would try again here if it were going to
            assert len(calls) == (1 if permanent else DOWNLOAD_TRIES)
            reason = published.states[-1].reason
            assert "the server said no" in reason
            assert ("gave up" in reason) is not permanent
            # Another wanted model is tried again.
            other = msgspec.structs.replace(spec, name="y")
            await sup.on_topic("wanted", m.ServeModel(other, "test"))
            await published.until(lambda s: s.model == "y" and s.state == "failed")
            assert len(calls) > (1 if permanent else DOWNLOAD_TRIES)
        finally:
            await sup.on_stop()

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_node_announces_the_digest_of_its_own_download(
    start_node: Callable[..., NodeProcess],
    second_model: Path,
    model_server: tuple[str, list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    """`--model URL` without `#sha256=`: once the node has downloaded and serves the file,
    its announcement carries the file's size and digest, so peers can take the proposal."""
    url, _ = model_server
    name = second_model.stem
    node = start_node(
        "--model", url, *LOOPBACK, *ONE_THREAD, name="seed", env=_models_env(tmp_path, "seed")
    ).wait_ready(name)
    data = second_model.read_bytes()
    me = wait_for(
        lambda: (me := node.status()["me"]).get("model_sha256", {}).get(name) and me,
        30,
        "the digest in the node's announcement",
    )
    assert me["model_sha256"][name] == hashlib.sha256(data).hexdigest()
    assert me["model_sizes"][name] == len(data)
