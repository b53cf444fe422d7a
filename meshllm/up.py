"""`meshllm up`, the programmatic way: prepare a node and run its root process."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from meshllm import logs
from meshllm.binaries import find_binary
from meshllm.config import ModelSpec, NodeConfig
from meshllm.identity import load_or_create_key, node_id_of
from meshllm.paths import NodeHome, cache_dir, home_from, models_dir
from meshllm.runtime import Node, cleanup_run_dir

log = logging.getLogger("meshllm.up")


class UpError(RuntimeError):
    """A problem the user can fix; its message says how."""


@dataclass
class UpOptions:
    models: list[str] = field(default_factory=list)
    join: list[str] = field(default_factory=list)
    client: bool = False
    home: str | None = None
    listen: str = "127.0.0.1"
    port: int = 9337
    strict_models: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    llama_server: str | None = None
    rpc_server: str | None = None
    llama_args: list[str] = field(default_factory=list)
    load_timeout_s: float = 600.0
    bind: str = "0.0.0.0:0"
    console_port: int = 0
    log_level: str = "INFO"


def resolve_model(ref: str) -> ModelSpec:
    """A `--model` value: a GGUF path, or a file name in the models directory."""
    candidates = [Path(ref).expanduser()]
    for base in (models_dir(), cache_dir() / "models"):
        candidates += [base / ref, base / f"{ref}.gguf"]
    for path in candidates:
        if path.is_file():
            return ModelSpec(name=path.name.removesuffix(".gguf"), path=str(path.resolve()))
    raise UpError(
        f"model {ref!r} not found: give a path to a .gguf file or a file name in {models_dir()}"
    )


def demo_model() -> ModelSpec:
    from meshllm.demo_model import ensure_demo_model

    path = ensure_demo_model(cache_dir() / "models")
    return ModelSpec(name=path.name.removesuffix(".gguf"), path=str(path))


def lock_home(home: NodeHome) -> int:
    """Hold the home directory's lock for the node's lifetime (one node per home)."""
    fd = os.open(home.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UpError(
            f"another meshllm node (pid {owner}) is already running with home {home.root}; "
            "stop it with `meshllm ctl stop` or pick another --home"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def bind_http(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UpError(
                f"port {port} on {host} is already in use (another meshllm node?); "
                "choose another with --port"
            ) from None
        raise UpError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def prepare(opts: UpOptions) -> tuple[NodeConfig, socket.socket, int]:
    """Check everything the user could have got wrong, before any process starts."""
    home = home_from(opts.home)
    home.ensure()
    lock_fd = lock_home(home)
    try:
        models = [resolve_model(ref) for ref in opts.models]
        if not models and not opts.join and not opts.client:
            models = [demo_model()]
        if opts.client and models:
            raise UpError("a lite client (--client) serves no model; drop --model")
        if opts.client and not opts.join:
            raise UpError("a lite client needs a mesh to join: pass --join TOKEN")
        llama_server = "" if opts.client else find_binary("llama-server", opts.llama_server)
        key = load_or_create_key(None if opts.client else home.key_path)
        sock = bind_http(opts.listen, opts.port)
    except BaseException:
        os.close(lock_fd)
        raise
    config = NodeConfig(
        home=str(home.root),
        run_dir=str(home.run_dir),
        node_id=node_id_of(key),
        models=tuple(models),
        client=opts.client,
        http_host=opts.listen,
        http_port=sock.getsockname()[1],
        strict_models=opts.strict_models,
        max_body_bytes=opts.max_body_bytes,
        llama_server=llama_server,
        llama_args=tuple(opts.llama_args),
        load_timeout_s=opts.load_timeout_s,
        join=tuple(opts.join),
        bind=opts.bind,
        console_port=opts.console_port,
        log_level=opts.log_level,
    )
    return config, sock, lock_fd


def run(opts: UpOptions) -> int:
    """Run a node in the foreground until it is stopped; returns the exit code."""
    logs.setup(opts.log_level, "node")
    config, sock, lock_fd = prepare(opts)
    cleanup_run_dir(config.run_dir)
    serving = config.models[0].name if config.models else "nothing (lite client)"
    log.info(
        "node %s serving %s; OpenAI API at http://%s:%s/v1",
        config.node_id,
        serving,
        config.http_host,
        config.http_port,
    )
    try:
        reason = uvloop.run(Node(config, {"proxy": {"socket": sock}}).run())
    finally:
        sock.close()
        cleanup_run_dir(config.run_dir)
        os.close(lock_fd)
    log.info("node stopped (%s)", reason)
    sys.stdout.flush()
    return 0
