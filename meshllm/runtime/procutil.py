"""Small process helpers: parent-death signals, graceful-then-forced stops."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies.

    Called in llama-server's pre-exec hook and first thing in every actor, so
    that a `kill -9` of any ancestor leaves no orphan behind.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


async def stop_process(proc: asyncio.subprocess.Process, grace_s: float = 3.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; always reaps the child."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, read from /proc (empty where /proc is not Linux's)."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = {pid}
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = set(kids)
    return found


def kill_tree(pid: int) -> list[int]:
    """kill -9 of a process and all its descendants, as a machine losing power.

    Everything is stopped (SIGSTOP) first, so no process can notice the others die
    and send a goodbye (a leave notice, a QUIC close), then killed. Used by tests
    and the benchmark. Returns the pids.
    """
    stopped: list[int] = []
    frontier = [pid]
    while frontier:  # stop the new children a stopping parent may still have forked
        for p in frontier:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
            stopped.append(p)
        frontier = [c for c in descendants(pid) if c not in stopped]
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return stopped


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` holds (OSError when /proc cannot tell)."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def _tcp_rows(table: str = "/proc/net/tcp") -> list[list[str]]:
    """The fields of each socket in a /proc/net/tcp-style table (OSError when absent)."""
    return [line.split() for line in Path(table).read_text().splitlines()[1:]]


def listens_on_loopback(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the listening socket on 127.0.0.1:`port`.

    Another local user could bind a port the node picked before its child does
    and answer `/health`: only the socket's inode among the child's own file
    descriptors proves whose it is. Where /proc cannot tell (not Linux), True.
    """
    wanted = f"0100007F:{port:04X}"
    try:
        rows = _tcp_rows()
        inodes = _socket_inodes(pid)
    except FileNotFoundError:
        return not Path("/proc/net/tcp").exists()
    except OSError:
        return False
    return any(
        len(fields) > 9 and fields[1] == wanted and fields[3] == "0A" and fields[9] in inodes
        for fields in rows  # 0A: LISTEN
    )


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """Every TCP (v4 and v6) address process `pid` itself listens on, as (host, port).

    How a worker proves it is reachable only from this machine: the RPC server
    has no authentication, so nothing but 127.0.0.1 may ever appear here.
    """
    inodes = _socket_inodes(pid)
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for fields in _tcp_rows(table):
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                    address, port = fields[1].split(":")
                    found.add((_proc_address(address), int(port, 16)))
    return found


def loopback_peer_uid(peer_port: int, local_port: int) -> int | None:
    """The user owning the 127.0.0.1 TCP socket of port `peer_port` connected to our
    `local_port`, from /proc/net/tcp; None where /proc cannot tell. How a loopback
    listener that must serve this node's own children refuses other local users."""
    wanted = (f"0100007F:{peer_port:04X}", f"0100007F:{local_port:04X}")
    try:
        rows = _tcp_rows()
    except OSError:
        return None
    for fields in rows:
        if len(fields) > 7 and (fields[1], fields[2]) == wanted:
            return int(fields[7])
    return None


def _proc_address(hex_address: str) -> str:
    """/proc/net/tcp's address (little-endian 32-bit words in hex) in the usual notation."""
    import ipaddress

    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago. Another process may take it
    before the child that is given it binds it: llama-server then exits saying so
    (`bind_failed`) and is started again at once on another port; /health on the port
    is what makes the server ready."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "-hft"})
"""llama-server flags whose value is a secret: never written to a log."""


def redact(cmd: list[str]) -> list[str]:
    """`cmd` as it may be logged: the values of `SECRET_FLAGS` replaced with `***`."""
    out: list[str] = []
    hide = False
    for arg in cmd:
        flag, eq, _ = arg.partition("=")
        if hide:
            out.append("***")
        elif eq and flag in SECRET_FLAGS:
            out.append(f"{flag}=***")
        else:
            out.append(arg)
        hide = not hide and not eq and arg in SECRET_FLAGS
    return out
