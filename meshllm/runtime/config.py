"""The node's configuration: what `meshllm up` was asked (`UpOptions`) and what it
made of that (`NodeConfig`, built once and handed to every actor).

Each option of `meshllm up` is defined once, as a field of `UpOptions`: its
type, default, flag, help and check. The command line (`meshllm.cli`) is
generated from these fields, and actors read the same values through
`NodeConfig.options`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec

from meshllm.http.auth import ApiKey
from meshllm.http.balance import LOAD_WAIT_S, MAX_IN_FLIGHT, MAX_QUEUED, QUEUE_WAIT_S, STALL_S
from meshllm.http.origin import check_origins
from meshllm.mesh import health
from meshllm.placement.election import COLD_GRACE_S, HOT_HOLD_S, HOT_RPM, IDLE_UNLOAD_S
from meshllm.placement.split import RTT_LIMIT_MS
from meshllm.runtime import busy
from meshllm.runtime.paths import DEFAULT_HOME


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one `UpOptions` field is written on the command line."""

    name: str
    """The flag, e.g. `--port`."""
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    """Allowed values, matched without regard to case."""
    envvar: str | None = None
    shown_default: Any = None
    """The default the command line uses and shows, where it is not the field's
    (`--home`: the field's None means "from the environment, else ~/.meshllm")."""
    check: Callable[[Any], str | None] | None = None
    """Returns what is wrong with a value given on the command line, or None."""


def option(default: Any, flag: str, help: str, **spec: Any) -> Any:
    """An `UpOptions` field: its default plus its `Flag` (typed Any so that a field reads
    `port: int = option(9337, "--port", ...)`)."""
    cli = Flag(flag, help, **spec)
    if isinstance(default, list):
        return dataclasses.field(default_factory=list, metadata={"flag": cli})
    return dataclasses.field(default=default, metadata={"flag": cli})


def flag_of(field: dataclasses.Field[Any]) -> Flag:
    found: Flag = field.metadata["flag"]
    return found


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be between 0 and 65535"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def _percent(value: float) -> str | None:
    return None if 0 <= value <= 100 else "must be between 0 and 100"


def _not_negative(value: float | None) -> str | None:
    return None if value is None or value >= 0 else "must not be negative"


def _backend_urls(values: list[str]) -> str | None:
    from meshllm.http.backends import check_backend_urls  # it imports messages, which import us

    return check_backend_urls(values)


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class UpOptions:
    """What `meshllm up` was asked; every field is one option of the command, in the order
    its help lists them (but `api_keys_from_env`, which says how one was given)."""

    models: list[str] = option(  # noqa: RUF009 (option() makes a dataclasses.field)
        [],
        "--model",
        "GGUF path, file name in the models directory, catalog name, Hugging Face "
        "owner/repo/file.gguf or URL (downloaded when not on disk). Repeat to seed the mesh "
        "catalog: the first is served here; a later one this node cannot resolve is seeded by "
        "name (a node that has it on disk takes it). Default (no --join): the built-in demo "
        "model.",
        metavar="MODEL",
    )
    join: list[str] = option(  # noqa: RUF009
        [],
        "--join",
        "Join the mesh of an invite token. @FILE reads the token from FILE, which keeps "
        "the secret out of the process list (e.g. --join @~/.meshllm-token, written by "
        "`meshllm ctl token --out ~/.meshllm-token`). Without --join, the token is taken "
        "from the MESHLLM_TOKEN environment variable (a token or @FILE) when it is set.",
        metavar="TOKEN|@FILE",
        envvar="MESHLLM_TOKEN",
    )
    client: bool = option(False, "--client", "Lite client: serve no model, route to the mesh.")
    backend_urls: list[str] = option(  # noqa: RUF009
        [],
        "--backend-url",
        "OpenAI-compatible server this node does not run (another llama-server, vLLM, "
        "Ollama) to join into the mesh, as http://HOST:PORT (repeat for several). The node "
        "then runs no llama-server; its --model flags name the models the backends serve "
        "(default: every model their /v1/models lists).",
        metavar="URL",
        check=_backend_urls,
    )
    home: str | None = option(
        None,
        "--home",
        "Directory for the node's key, config, logs and run directory.",
        envvar="MESHLLM_HOME",
        shown_default=str(DEFAULT_HOME),
    )
    port: int = option(9337, "--port", "Port of the OpenAI API.", check=_port)
    listen: str = option(
        "127.0.0.1",
        "--listen",
        "Address the OpenAI API binds to. Beyond loopback it needs --api-key (or --insecure).",
    )
    api_keys: list[str] = option(  # noqa: RUF009
        [],
        "--api-key",
        "Key the OpenAI API requires, as 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
        "(401 without; /health stays open). Repeat for several; NAME:KEY names one, "
        "NAME:KEY:rpm=N,tpm=M limits it to N requests and M tokens per minute (429 with "
        "Retry-After past them). "
        "@FILE reads keys from FILE, one a line, which keeps them out of the process list "
        "(e.g. --api-key @~/.meshllm-keys); MESHLLM_API_KEYS holds keys or @FILE too, "
        "separated by spaces.",
        metavar="KEY|@FILE",
        envvar="MESHLLM_API_KEYS",
    )
    key_rpm: int = option(
        0,
        "--key-rpm",
        "Requests per minute each --api-key allows unless it sets its own rpm=N; 0: no limit.",
        metavar="N",
        check=_not_negative,
    )
    key_tpm: int = option(
        0,
        "--key-tpm",
        "Tokens (prompt and completion) per minute each --api-key allows unless it sets its "
        "own tpm=N; 0: no limit. A request reserves its estimate as it starts; its answer's "
        "usage is charged instead once it has gone out.",
        metavar="N",
        check=_not_negative,
    )
    insecure: bool = option(
        False,
        "--insecure",
        "Let the OpenAI API listen beyond loopback (--listen) without any --api-key: anyone "
        "who reaches the port can use the mesh.",
    )
    console_port: int = option(
        0,
        "--console",
        "Serve the web console on 127.0.0.1:PORT (suggested: 3131); 0 turns it off.",
        metavar="PORT",
        check=_port,
    )
    strict_models: bool = option(
        False,
        "--strict-models",
        "Answer 404 for an unknown model instead of falling back to the first available one.",
    )
    max_body_mb: float = option(
        16.0, "--max-body-mb", "Largest request body accepted (MiB).", check=_positive
    )
    max_in_flight: int = option(
        MAX_IN_FLIGHT,
        "--max-in-flight",
        "Requests per model this node sends on at once (over all its servers); more wait "
        "in a queue.",
        metavar="N",
        check=_positive,
    )
    max_queued: int = option(
        MAX_QUEUED,
        "--queue",
        "Requests per model that may wait for a slot; beyond them, 429 with Retry-After.",
        metavar="N",
        check=_not_negative,
    )
    queue_wait_s: float = option(
        QUEUE_WAIT_S,
        "--queue-timeout",
        "Seconds a request may wait for a slot before 429 with Retry-After.",
        metavar="S",
        check=_positive,
    )
    stall_s: float = option(
        STALL_S,
        "--stall-timeout",
        "Seconds a server may send nothing while requests wait on it before this node "
        "checks its /health; one that does not answer is hung: its requests that got no "
        "byte yet go to another replica, its streams end with an error event, and it is "
        "avoided until it answers again.",
        metavar="S",
        check=_positive,
    )
    no_affinity: bool = option(
        False,
        "--no-affinity",
        "Send each request to the least busy replica of its model, ignoring which one has "
        "its conversation's prompt cached (by default, requests with the same "
        "prompt_cache_key, user or leading messages prefer the same replica).",
    )
    cors_origins: list[str] = option(  # noqa: RUF009
        [],
        "--cors-origin",
        "Web page origin allowed to call the API and the console from a browser "
        "(repeat, e.g. --cors-origin https://app.example.com; '*' allows any). "
        "Other sites are refused with 403.",
        metavar="ORIGIN",
        check=check_origins,
    )
    llama_server: str | None = option(
        None, "--llama-server", "llama-server binary to run.", metavar="PATH"
    )
    llama_args: list[str] = option(  # noqa: RUF009
        [],
        "--llama-arg",
        "Extra argument for llama-server (repeat, e.g. --llama-arg=-c --llama-arg=4096).",
        metavar="ARG",
    )
    load_timeout_s: float = option(
        600.0, "--load-timeout", "Seconds a model may take to load.", check=_positive
    )
    bind: str = option(
        "0.0.0.0:0",
        "--bind",
        "UDP address of the mesh (QUIC) endpoint; port 0 picks a free one.",
        metavar="HOST:PORT",
    )
    advertise: str | None = option(
        None, "--advertise", "Host other nodes dial (default: from --bind).", metavar="HOST"
    )
    discover: bool = option(
        False,
        "--discover",
        "Advertise this mesh on the local network over mDNS (service _meshllm._udp): its "
        "mesh id, this node's id, mesh address and models; never the secret or the token. "
        "`meshllm discover` lists the meshes nearby; joining one still needs its token.",
    )
    max_vram_gb: float | None = option(
        None,
        "--max-vram",
        "Memory for models, in GB, used for planning and announced to the mesh "
        "(default: total VRAM of NVIDIA GPUs, else 75% of RAM).",
        metavar="GB",
        check=_not_negative,
    )
    split: bool = option(
        False,
        "--split",
        "Serve this node's model split with other nodes that serve it (llama.cpp RPC "
        "over the mesh) even when it fits here. Without it, a model is split only when it "
        "fits on no single node that serves it.",
    )
    split_rtt_limit_ms: float = option(
        RTT_LIMIT_MS,
        "--split-rtt-limit",
        "Farthest round trip (ms) to a node that may hold layers of a split model: every "
        "token waits for each worker once.",
        metavar="MS",
        check=_positive,
    )
    rpc_server: str | None = option(
        None,
        "--rpc-server",
        "llama.cpp RPC server binary (rpc-server or ggml-rpc-server) a split worker runs; "
        "it must come from the same llama.cpp build as every host's llama-server.",
        metavar="PATH",
    )
    probe_interval_s: float = option(
        health.DEFAULT_INTERVAL_S,
        "--probe-interval",
        f"Seconds between health probes ({health.SLOW_INTERVAL_S:g} is gentler on slow links).",
        check=_positive,
    )
    probe_timeout_s: float = option(
        health.DEFAULT_TIMEOUT_S,
        "--probe-timeout",
        f"Seconds a probe may take before the peer is suspected "
        f"({health.SLOW_TIMEOUT_S:g} is gentler on slow links).",
        check=_positive,
    )
    cold_grace_s: float = option(
        COLD_GRACE_S,
        "--cold-grace",
        "Seconds a model must have no server before a spare server of another model "
        "moves to it (a server that restarts within this time is not replaced).",
        check=_not_negative,
    )
    models_dir: str | None = option(
        None,
        "--models-dir",
        "Serve every model in DIR that fits this node's memory, each with its own "
        "llama-server, the most requested first; the others are announced for other "
        "nodes to take. DIR is also where models are looked up and downloaded "
        "(default: $MESHLLM_MODELS_DIR, else ~/.models, serving one model).",
        metavar="DIR",
    )
    min_size_mb: float | None = option(
        None,
        "--min-size-mb",
        "Smallest GGUF in the models directory counted as a model, in MB "
        "(default: $MESHLLM_MIN_MODEL_BYTES, else 500); e.g. 0 to serve small files.",
        metavar="MB",
        check=_not_negative,
    )
    idle_unload_s: float = option(
        IDLE_UNLOAD_S,
        "--idle-unload",
        "When another model is asked for and waits for capacity, a model nobody asked for "
        "in the last S seconds (or ever) may be unloaded and this node serves that one "
        "instead; it is loaded again when asked for. A model a node moved to for demand "
        "stays at least S seconds. Nodes started with --model keep their first model. "
        "0: never.",
        metavar="S",
        check=_not_negative,
    )
    hot_rpm: float = option(
        HOT_RPM,
        "--hot-rpm",
        f"Requests per minute per server over which a model gains a replica (a server "
        f"whose model is idle moves to it after {HOT_HOLD_S:g}s over). 0: never.",
        metavar="N",
        check=_not_negative,
    )
    load_wait_s: float = option(
        LOAD_WAIT_S,
        "--load-wait",
        "Seconds a request for a model that no node serves waits for one to load it "
        "before 503 with Retry-After.",
        metavar="S",
        check=_not_negative,
    )
    pause_when_busy: float = option(
        0.0,
        "--pause-when-busy",
        f"Give the machine back when other processes use more than PERCENT of its CPU "
        f"(or of a GPU, through NVML) for {busy.BUSY_FOR_S:g}s: pause as `meshllm ctl "
        f"pause` does; resume after {busy.CALM_FOR_S:g}s under PERCENT-{busy.MARGIN:g}. "
        "0: never.",
        metavar="PERCENT",
        check=_percent,
    )
    log_level: str = option(
        "info",
        "--log-level",
        "Logging level of the node and its actors.",
        choices=LOG_LEVELS,
    )
    api_keys_from_env: bool = False
    """Whether `api_keys` came from MESHLLM_API_KEYS, not --api-key: errors name it."""

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ModelSpec(msgspec.Struct, frozen=True):
    """A model this node can serve: asked for with `--model`, found on disk, from the
    catalog, or proposed by a peer (`actors.elector.model_sources`)."""

    name: str
    """Name clients use in the `model` field (the GGUF file's stem)."""
    path: str = ""
    """Local GGUF path; empty when the file is not on disk yet."""
    url: str = ""
    """Where to download the file from when it is not on disk."""
    size: int = 0
    """Size in bytes when known (0: unknown)."""
    sha256: str = ""
    """SHA-256 (lowercase hex) the download is checked against; empty: unknown. A model
    peers propose is only ever downloaded with one (see `meshllm.models.catalog`)."""
    target: str = ""
    """Where the file is, or will be once downloaded."""


class NodeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything an actor needs to know about its node; immutable for the node's life.

    What the user asked is in `options`; the fields here are what `meshllm up`
    resolved from it (paths, bound ports, identity, the models found)."""

    home: str
    run_dir: str
    node_id: str
    options: UpOptions = msgspec.field(default_factory=UpOptions)
    models: tuple[ModelSpec, ...] = ()
    """`--model` flags in order: the first is served here, the rest seed the catalog."""
    available: tuple[ModelSpec, ...] = ()
    """GGUFs found in the models directory at start (the announced `available_models`)."""
    models_dir: str = ""
    vram_bytes: int = 0
    """Memory budget for models: VRAM, a share of RAM, or `--max-vram`
    (see meshllm.placement.memory)."""
    gpus: int = 0
    """NVIDIA GPUs found (a split host places its share of the layers on them)."""
    http_host: str = "127.0.0.1"
    """Where the OpenAI API listens (`--listen`)."""
    http_port: int = 0
    """The port the OpenAI API is bound to (`--port`, or the one picked for port 0)."""
    llama_server: str = ""
    """Path of the llama-server binary (`--llama-server`, else found; empty for a client)."""
    rpc_server: str = ""
    """Path of the RPC server binary a split worker runs (empty: not found)."""
    rpc_server_missing: str = ""
    """Why there is no RPC server binary (said when this node is asked to be a worker)."""
    mesh_secret: bytes = b""
    """Admits peers (from the invite token, or made by the first node)."""
    owner_public: bytes = b""
    """The mesh owner's public key (DER; `meshllm.mesh.owner`): what signs the owner
    commands this node takes. Empty: the mesh has none, no command is taken."""
    advertise_host: str = "127.0.0.1"
    """Host other nodes dial to reach this one."""
    gossip_port: int = 0
    tunnel_port: int = 0
    console_host: str = "127.0.0.1"
    api_keys: tuple[ApiKey, ...] = ()
    """The keys the OpenAI API requires (`--api-key`, digests only; the console's own
    among them when both are on); empty: none."""
    backend_models: tuple[str, ...] = ()
    """The `--model` names of a node with `--backend-url`: what its backends serve
    (nothing is resolved on disk for them; `models` is empty)."""

    @property
    def tunnel_http_path(self) -> str:
        """Unix socket where the Tunnel takes HTTP requests for remote models."""
        return f"{self.run_dir}/tunnel-http.sock"
