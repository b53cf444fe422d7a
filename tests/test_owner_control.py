"""Owner control with real nodes (issue 12, item 4).

On 127.0.0.1: A starts the mesh (the demo model; it makes the owner key), B
serves the demo model too and C is a lite client, both joined with A's token.
A hostile member (a `MeshEndpoint` in this process with the secret and a key
of its own) sends B owner commands over B's tunnel: one signed with its own
key, one really signed by the owner but too old, and one the owner signed (a
drop of a model B does not serve) twice: the second is a replay. C, without
the owner key, cannot stop B; with the key imported from A (`ctl owner
export/import`), its command reaches B. Then A's `meshllm ctl --node B drop
meshllm-demo` makes B exit, and A's `meshllm ctl --node C stop` stops C.
Another local user cannot use A's control socket at all.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.mesh import wire
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.owner import load_owner_key, new_command, sign_command
from meshllm.mesh.quic import Link, MeshEndpoint, release_stream
from meshllm.mesh.token import decode_token
from meshllm.runtime.paths import home_from
from meshllm.testing import NodeProcess, alive, quic_ports, token_of, wait_for

pytestmark = pytest.mark.integration

LOOPBACK = ("--bind", "127.0.0.1:0")
ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
ANSWER_S = 10.0
DEMO = "meshllm-demo"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory other users may traverse (not list): the homes in it are then
    guarded by their own permissions alone, as under /home."""
    path = Path(tempfile.mkdtemp(prefix="meshllm-owner-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _no_setup(link: Link) -> None:
    pass


async def send_orders(secret: bytes, tunnel_port: int, orders: list[wire.OwnerOrder]) -> list[str]:
    """Each order on its own stream from a hostile member; what B answered to each."""
    key = load_or_create_key(None)
    evil = MeshEndpoint(node_id_of(key), secret, key, _no_setup)
    answers: list[str] = []
    try:
        link = await evil.dial("127.0.0.1", tunnel_port, timeout=ANSWER_S)
        for order in orders:
            reader, writer = await link.open_stream()
            writer.write(wire.encode_frame(order))
            writer.write_eof()
            try:
                raw = await asyncio.wait_for(reader.read(-1), ANSWER_S)
            finally:
                release_stream(reader, writer)
            answer = wire.decode_payload(raw[wire.HEADER :])
            assert isinstance(answer, wire.OwnerAnswer), answer
            answers.append(f"{answer.done} {answer.message}")
    finally:
        evil.close()
        await asyncio.sleep(0.05)  # let the close frame go
    return answers


def test_owner_stops_another_node_and_no_one_else_can(base: Path) -> None:
    a = NodeProcess(base / "a", *LOOPBACK, *ONE_THREAD)
    nodes = [a]
    try:
        a.start()
        token = token_of(a)
        b = NodeProcess(base / "b", "--model", DEMO, "--join", token, *LOOPBACK, *ONE_THREAD)
        c = NodeProcess(base / "c", "--client", "--join", token, *LOOPBACK)
        nodes += [b, c]
        b.start()
        c.start()
        b_id = b.status()["node_id"]

        def knows_b(node: NodeProcess) -> bool:
            return any(p["node_id"] == b_id for p in node.status()["peers"])

        wait_for(lambda: knows_b(a) and knows_b(c), 30, "A and C to see B")

        # The owner key is A's alone, owner-only; every node knows the public key.
        a_home, b_home = home_from(a.home), home_from(b.home)
        assert stat.S_IMODE(a_home.owner_key_path.stat().st_mode) == 0o600
        assert not b_home.owner_key_path.exists()
        mine = decode_token(token)
        assert mine.owner and decode_token(token_of(b)).owner == mine.owner

        # A hostile member: its own signature, a stale one, the owner's twice (replay).
        owner = load_owner_key(a_home)
        forged = sign_command(
            load_or_create_key(None), new_command(mine.mesh_id, b_id, "stop", None, time.time())
        )
        stale = sign_command(
            owner, new_command(mine.mesh_id, b_id, "stop", None, time.time() - 600)
        )
        drop = sign_command(
            owner, new_command(mine.mesh_id, b_id, "drop", "nothing-here", time.time())
        )
        answers = asyncio.run(
            send_orders(mine.secret, quic_ports(b)[1], [forged, stale, drop, drop])
        )
        assert answers[0] == "False the command is not signed by the mesh owner key"
        assert answers[1].startswith("False") and "too old" in answers[1]
        not_served = f"this node serves {DEMO!r}, not 'nothing-here'; nothing was dropped"
        assert answers[2] == f"False {not_served}"  # past the gate: acted on
        assert answers[3] == "False the command was already acted on (a replay)"
        assert "refused an owner command from node" in b.log()
        b.check_alive()

        # C holds no owner key: refused before anything is sent.
        out = c.ctl("--node", b_id, "stop")
        assert out.returncode == 1 and "holds no mesh owner key" in out.stderr, out.stderr
        # Its own id: not sent (nor acted on).
        out = a.ctl("--node", a.status()["node_id"], "stop")
        assert out.returncode == 1 and "this node's own id" in out.stderr, out.stderr
        # With the key moved from A to C, C's command reaches B (and B answers it).
        pem = base / "owner.pem"
        assert a.ctl("owner", "export", "--out", str(pem)).returncode == 0
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        assert c.ctl("owner", "import", str(pem)).returncode == 0
        out = c.ctl("--node", b_id, "drop", "nothing-here")
        assert out.returncode == 1, out
        assert f"node {b_id} refused: {not_served}" in out.stderr
        b.check_alive()

        # The owner, from A: B drops its model (and exits, as with its own `ctl drop`).
        b.wait_serving()
        out = a.ctl("--node", b_id, "drop", DEMO)
        assert out.returncode == 0 and f"node {b_id}: dropping {DEMO}" in out.stdout, out
        assert b.wait_exit(30) == 0
        assert "the mesh owner (via node" in b.log()
        assert not b.server_pid or not alive(b.server_pid)
        # ... and C stops.
        c_id = c.status()["node_id"]
        out = a.ctl("--node", c_id, "stop")
        assert out.returncode == 0 and f"node {c_id} is stopping" in out.stdout, out
        assert c.wait_exit(30) == 0
        a.check_alive()
        # Gone: a command to it now says so.
        out = a.ctl("--node", b_id, "stop")
        assert out.returncode == 1 and f"node {b_id}" in out.stderr, out.stderr
    finally:
        for node in nodes:
            node.stop()


def _python_for_stranger() -> str | None:
    """An interpreter user nobody can run (this one may live in root's home)."""
    for python in (sys.executable, "/usr/bin/python3"):
        probe = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", ""]
        if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
            return python
    return None


def test_another_local_user_cannot_use_the_control_socket(base: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    python = _python_for_stranger()
    if python is None:
        pytest.skip("no Python that user nobody can run")
    a = NodeProcess(base / "a", *LOOPBACK, *ONE_THREAD)
    try:
        a.start()
        a.wait_ready()
        socket_path = a.control_path
        # The socket is writable by its user only, in a run directory only its user enters.
        assert stat.S_IMODE(socket_path.stat().st_mode) & 0o022 == 0
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(a.home.stat().st_mode) == 0o700
        stranger = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python]
        connect = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"try: s.connect({str(socket_path)!r})\n"
            "except PermissionError: sys.exit(13)\n"
        )
        assert subprocess.run([*stranger, "-c", connect], timeout=30).returncode == 13
        if python == sys.executable:  # the real command too, where nobody can run it
            ctl = [*stranger, "-m", "meshllm", "ctl", "status", "--home", str(a.home)]
            out = subprocess.run(ctl, capture_output=True, text=True, timeout=30, cwd=os.getcwd())
            assert out.returncode == 1 and "permission denied" in out.stderr, out.stderr
        a.check_alive()
        assert a.status()["node_id"]  # its own user still can
    finally:
        a.stop()
