"""`meshllm up`, the programmatic way: prepare a node and run its root process."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

import uvloop

from meshllm.http.auth import ApiKey
from meshllm.http.proxy import is_loopback_address
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.owner import OwnerKeyError, settle_owner
from meshllm.mesh.quic import key_to_pem
from meshllm.mesh.token import (
    InvalidToken,
    InviteToken,
    decode_token,
    encode_token,
    mesh_id_of,
    new_secret,
    split_address,
    token_text,
)
from meshllm.models.files import MIN_BYTES_ENV, default_min_bytes
from meshllm.placement.memory import detect_memory
from meshllm.runtime import logs
from meshllm.runtime.binaries import find_binary, rpc_server_binary
from meshllm.runtime.config import ModelSpec, NodeConfig, UpOptions
from meshllm.runtime.paths import NodeHome, cache_dir, home_from, models_dir, write_private
from meshllm.runtime.root import Node, cleanup_run_dir

log = logging.getLogger("meshllm.up")


MODEL_FLAGS = ("-m", "--model", "-hf", "-hfr", "--hf-repo", "-mu", "--model-url")
"""llama-server flags that choose the model: the node's own (`--model`)."""


class UpError(RuntimeError):
    """A problem the user can fix; its message says how."""


def resolve_model(ref: str) -> ModelSpec:
    """A `--model` value: a GGUF path, a file name in the models directory, or a catalog name."""
    from meshllm.models.files import ModelNotFound
    from meshllm.models.files import resolve_model as resolve

    try:
        found = resolve(ref)
    except ModelNotFound as exc:
        raise UpError(str(exc)) from None
    size = found.size
    if not found.needs_download:
        size = found.path.stat().st_size
    elif found.url and size is None:
        from meshllm.models.download import remote_size

        # Nodes decide what fits from the announced size (docs/design.md, "Placement").
        size = remote_size(found.url)
    return ModelSpec(
        name=found.name,
        path="" if found.needs_download else str(found.path),
        url=found.url or "",
        size=size or 0,
        sha256=found.sha256 or "",
        target=str(found.path),
    )


def seed_model(ref: str) -> ModelSpec:
    """A `--model` after the first: it only seeds the mesh catalog (docs/design.md,
    "Placement"), so a name this node cannot resolve is still requested, with a warning:
    a node that holds it (on disk, or by a source of its own) may serve it. Only a value
    that cannot name a model at all (an unsafe URL, a path) is refused."""
    from meshllm.http.backends import check_model_name
    from meshllm.models.files import model_name

    try:
        return resolve_model(ref)
    except UpError as exc:
        name = model_name(ref.strip())
        if "://" in ref or check_model_name(name) is not None:
            raise
        cause = exc
    log.warning(
        "--model %s is seeded by name only (%s): a node that has it will serve it", name, cause
    )
    return ModelSpec(name=name)


CONSOLE_KEY_NAME = "console"


def api_keys(opts: UpOptions) -> tuple[tuple[ApiKey, ...], str]:
    """The keys the OpenAI API requires (`--api-key`), and the console's own key (empty
    when there is no console or no key). Refuses an endpoint open beyond loopback."""
    from meshllm.http.auth import KeySpecError, digest_of, load_keys

    try:
        source = "MESHLLM_API_KEYS" if opts.api_keys_from_env else "--api-key"
        keys = load_keys(opts.api_keys, opts.key_rpm, opts.key_tpm, source, log.warning)
    except KeySpecError as exc:
        raise UpError(str(exc)) from None
    if not keys:
        if opts.key_rpm or opts.key_tpm:
            flag = "--key-rpm" if opts.key_rpm else "--key-tpm"
            raise UpError(f"{flag} limits each --api-key: give a key too")
        if not opts.insecure and not is_loopback_address(opts.listen):
            raise UpError(
                f"--listen {opts.listen} opens the OpenAI API beyond this machine: require a "
                "key with --api-key KEY (or --api-key @FILE), or pass --insecure to let "
                "anyone who reaches the port use the mesh"
            )
        return (), ""
    if any(key.name == CONSOLE_KEY_NAME for key in keys):
        raise UpError(f"--api-key: the name {CONSOLE_KEY_NAME!r} is the console's; pick another")
    flags = [a.split("=", 1)[0] for a in opts.llama_args]
    if given := [f for f in flags if f in ("--api-key", "--api-key-file")]:
        raise UpError(
            f"--llama-arg {given[0]} cannot go with --api-key: the node checks the keys itself "
            "and passes none on to llama-server; drop one of them"
        )
    if not opts.console_port:
        return keys, ""
    # The console (loopback only) calls the API for its page with a key of its own,
    # made here and never written anywhere.
    console_key = secrets.token_urlsafe(32)
    return (*keys, ApiKey(CONSOLE_KEY_NAME, digest_of(console_key))), console_key


def check_backends(opts: UpOptions) -> tuple[str, ...]:
    """The `--model` names of a node with `--backend-url` (checked, not resolved)."""
    from meshllm.http.backends import check_backend_urls, check_model_name

    if problem := check_backend_urls(opts.backend_urls):
        raise UpError(f"--backend-url {problem}")
    if opts.client:
        raise UpError("a lite client (--client) serves no model; drop --backend-url")
    for name in opts.models:
        if problem := check_model_name(name):
            raise UpError(f"--model {problem} (with --backend-url, --model names a model)")
    if opts.split or opts.llama_args:
        flag = "--split" if opts.split else "--llama-arg"
        raise UpError(
            f"{flag} is for this node's own llama-server, which a node with --backend-url "
            "does not run; drop it"
        )
    return tuple(dict.fromkeys(opts.models))


def use_models_dir(opts: UpOptions) -> None:
    """`--models-dir DIR`: this process and every actor it starts look models up, scan
    and download them in DIR (as `$MESHLLM_MODELS_DIR` would say)."""
    assert opts.models_dir is not None
    path = Path(opts.models_dir).expanduser()
    if opts.client or opts.backend_urls:
        runs = "a lite client (--client)" if opts.client else "a node with --backend-url"
        raise UpError(f"--models-dir serves the models in it, and {runs} runs no llama-server")
    if not opts.models_dir.strip():
        raise UpError("--models-dir needs a directory")
    if not path.exists():
        raise UpError(f"--models-dir {opts.models_dir}: no such directory")
    if not path.is_dir():
        raise UpError(f"--models-dir {opts.models_dir}: not a directory")
    os.environ["MESHLLM_MODELS_DIR"] = str(path.resolve())


def scan_available() -> tuple[ModelSpec, ...]:
    """GGUFs in the models directory that count as models (over 500 MB)."""
    from meshllm.models.files import scan_models

    return tuple(
        ModelSpec(name=f.name, path=str(f.path), size=f.size, target=str(f.path))
        for f in scan_models()
    )


def demo_model() -> ModelSpec:
    from meshllm.models.demo import ensure_demo_model

    path = ensure_demo_model(cache_dir() / "models")
    return ModelSpec(
        name=path.name.removesuffix(".gguf"),
        path=str(path),
        size=path.stat().st_size,
        target=str(path),
    )


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


def mesh_secret(home: NodeHome, tokens: list[InviteToken], client: bool) -> bytes:
    """The secret of the mesh this node is in: the tokens', or this home's own."""
    secrets_given = {t.secret for t in tokens}
    if len(secrets_given) > 1:
        raise UpError("the --join tokens belong to different meshes")
    if secrets_given:
        secret = secrets_given.pop()
        if not client:
            write_private(home.secret_path, secret)
        return secret
    if home.secret_path.exists():
        return home.secret_path.read_bytes()
    secret = new_secret()
    write_private(home.secret_path, secret)
    return secret


def bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UpError(f"cannot bind the mesh endpoint to {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


ROUTE_PROBE = ("192.0.2.1", 9)
"""A documentation-only address (RFC 5737): `connect` on a UDP socket picks the
source address the kernel would route through, and sends nothing."""


def advertise_host(bind_host: str, given: str | None) -> str:
    """The host other nodes dial: `--advertise`, the bind address, or this machine's
    address on its default route (the host name often resolves to 127.0.1.1)."""
    if given:
        return given
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    candidates: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(ROUTE_PROBE)
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates.append(socket.gethostbyname(socket.gethostname()))
    for address in candidates:
        if address and not address.startswith("127.") and address != "0.0.0.0":
            return address
    log.warning(
        "no address other machines could dial was found: advertising 127.0.0.1 "
        "(pass --advertise HOST for a mesh across machines)"
    )
    return "127.0.0.1"


def prepare(opts: UpOptions) -> tuple[NodeConfig, dict[str, dict[str, Any]], str, int]:
    """Check everything the user could have got wrong, before any process starts."""
    if opts.models_dir is not None:
        use_models_dir(opts)  # before anything is written: a wrong DIR changes nothing
    if opts.min_size_mb is not None:
        # Read by every scan, in this process and the actors it starts.
        os.environ[MIN_BYTES_ENV] = str(int(opts.min_size_mb * 1_000_000))
    home = home_from(opts.home)
    home.ensure()
    lock_fd = lock_home(home)
    try:
        backends = bool(opts.backend_urls)
        backend_models = check_backends(opts) if backends else ()
        # Only the model this node serves itself must resolve here; the rest seed.
        refs = [] if backends else opts.models
        models = [resolve_model(ref) if i == 0 else seed_model(ref) for i, ref in enumerate(refs)]
        if not models and not opts.join and not opts.client and not backends:
            models = [] if opts.models_dir is not None else [demo_model()]
        if opts.client and models:
            raise UpError("a lite client (--client) serves no model; drop --model")
        if opts.pause_when_busy and (opts.client or backends):
            raise UpError(
                "--pause-when-busy pauses this node's llama-server, and a lite client or a "
                "node with --backend-url runs none; drop --pause-when-busy"
            )
        flags = [a.split("=", 1)[0] for a in opts.llama_args]
        if reserved := [f for f in flags if f in ("--host", "--port")]:
            raise UpError(
                f"--llama-arg {reserved[0]} is not allowed: llama-server is bound to "
                "127.0.0.1 on a port meshllm picks (peers reach it only through the tunnel)"
            )
        if reserved := [f for f in flags if f in MODEL_FLAGS]:
            raise UpError(
                f"--llama-arg {reserved[0]} is not allowed: the node tells llama-server which "
                "model to load (name it with --model, which the mesh announces)"
            )
        keys, console_key = api_keys(opts)
        if opts.client and not opts.join:
            raise UpError("a lite client needs a mesh to join: pass --join TOKEN")
        try:
            tokens = [decode_token(token_text(value)) for value in opts.join]
            bind_host, bind_port = split_address(opts.bind, allow_zero=True)
        except InvalidToken as exc:
            raise UpError(str(exc)) from None
        runs_servers = not opts.client and not backends
        llama_server = find_binary("llama-server", opts.llama_server) if runs_servers else ""
        rpc_server, rpc_missing = rpc_server_binary(opts.rpc_server) if runs_servers else ("", "")
        available = scan_available() if runs_servers else ()
        if opts.models_dir is not None and not available and not models and not opts.join:
            raise UpError(
                f"--models-dir {opts.models_dir}: no GGUF model of at least "
                f"{default_min_bytes() / 1e6:g} MB there (smaller files count with "
                "--min-size-mb 0); add --model NAME to download one, or --join"
            )
        memory = detect_memory(opts.max_vram_gb)
        key = load_or_create_key(None if opts.client else home.key_path)
        held = home.secret_path.read_bytes() if home.secret_path.exists() else None
        secret = mesh_secret(home, tokens, opts.client)
        try:
            owner = settle_owner(
                home,
                {t.owner for t in tokens if t.owner},
                same_mesh=held == secret,
                fresh=not tokens and held is None,
                client=opts.client,
            )
        except OwnerKeyError as exc:
            raise UpError(str(exc)) from None
        sock = bind_http(opts.listen, opts.port)
        gossip_sock = bind_udp(bind_host, bind_port)
        tunnel_sock = bind_udp(bind_host, 0)
    except BaseException:
        os.close(lock_fd)
        raise
    advertised = advertise_host(bind_host, opts.advertise)
    gossip_port = gossip_sock.getsockname()[1]
    address = f"{advertised}:{gossip_port}"
    token = encode_token(InviteToken(secret, (address,), mesh_id_of(secret), owner))
    config = NodeConfig(
        home=str(home.root),
        run_dir=str(home.run_dir),
        node_id=node_id_of(key),
        # The tokens themselves (not @FILE): the Gossiper dials their addresses.
        # The keys as digests (`api_keys`), never as given: every actor gets the options.
        options=dataclasses.replace(opts, join=[encode_token(t) for t in tokens], api_keys=[]),
        models=tuple(models),
        available=available,
        models_dir=str(models_dir()),
        vram_bytes=memory.budget_bytes if runs_servers else 0,
        gpus=len(memory.gpus),
        http_host=opts.listen,
        http_port=sock.getsockname()[1],
        llama_server=llama_server,
        rpc_server=rpc_server,
        rpc_server_missing=rpc_missing,
        mesh_secret=secret,
        owner_public=owner,
        advertise_host=advertised,
        gossip_port=gossip_port,
        tunnel_port=tunnel_sock.getsockname()[1],
        backend_models=backend_models,
        api_keys=keys,
    )
    resources: dict[str, dict[str, Any]] = {
        "proxy": {"socket": sock},
        # Both endpoints prove the node's id with its key, and the Gossiper signs its
        # announcements with it (a process takes bytes, not key objects).
        "gossiper": {"socket": gossip_sock, "key": key_to_pem(key)},
        "tunnel": {"socket": tunnel_sock, "key": key_to_pem(key)},
        "console": {"api_key": console_key},
    }
    return config, resources, token, lock_fd


def run(opts: UpOptions) -> int:
    """Run a node in the foreground until it is stopped; returns the exit code."""
    logs.setup(opts.log_level, "node")
    config, resources, token, lock_fd = prepare(opts)
    cleanup_run_dir(config.run_dir)
    serving = (
        config.models[0].name
        if config.models
        else f"the models of {', '.join(opts.backend_urls)}"
        if opts.backend_urls
        else "nothing (lite client)"
        if opts.client
        else "what the mesh assigns"
    )
    log.info(
        "node %s serving %s; OpenAI API at http://%s:%s/v1",
        config.node_id,
        serving,
        config.http_host,
        config.http_port,
    )
    log.info("mesh endpoint on %s:%s", config.advertise_host, config.gossip_port)
    if config.api_keys:
        names = [k.name for k in config.api_keys]
        log.info("the OpenAI API requires a key: %s", ", ".join(names))
    elif not is_loopback_address(config.http_host):
        log.warning("--insecure: anyone who reaches port %s can use the mesh", config.http_port)
    if not opts.join:
        # The first node of a mesh prints its invitation; `meshllm ctl token` repeats it.
        print(
            "invite token (another node joins with `meshllm up --join @FILE` after "
            "`meshllm ctl token --out FILE`, or with `--join TOKEN`):\n"
            f"{token}",
            flush=True,
        )
    try:
        reason = uvloop.run(Node(config, resources, token).run())
    finally:
        for actor_resources in resources.values():
            for resource in actor_resources.values():
                if isinstance(resource, socket.socket):
                    resource.close()
        cleanup_run_dir(config.run_dir)
        os.close(lock_fd)
    log.info("node stopped (%s)", reason)
    sys.stdout.flush()
    return 0
