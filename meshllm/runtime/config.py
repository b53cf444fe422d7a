"""The node's configuration, built once by `meshllm up` and handed to every actor."""

from __future__ import annotations

import msgspec


class ModelSpec(msgspec.Struct, frozen=True):
    """A model this node was asked for with `--model`."""

    name: str
    """Name clients use in the `model` field (the GGUF file's stem)."""
    path: str = ""
    """Local GGUF path; empty when the file is not on disk yet."""
    url: str = ""
    """Where to download the file from when it is not on disk."""
    size: int = 0
    """Size in bytes when known (0: unknown)."""
    sha256: str = ""
    target: str = ""
    """Where the file is, or will be once downloaded."""


class NodeConfig(msgspec.Struct, frozen=True):
    """Everything an actor needs to know about its node; immutable for the node's life."""

    home: str
    run_dir: str
    node_id: str
    models: tuple[ModelSpec, ...] = ()
    """`--model` flags in order: the first is served here, the rest seed the catalog."""
    available: tuple[ModelSpec, ...] = ()
    """GGUFs found in the models directory at start (the announced `available_models`)."""
    models_dir: str = ""
    vram_bytes: int = 0
    """Memory budget for models: VRAM, a share of RAM, or `--max-vram`
    (see meshllm.placement.memory)."""
    client: bool = False
    """A lite client serves no model (`--client`)."""
    http_host: str = "127.0.0.1"
    http_port: int = 9337
    strict_models: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    llama_server: str = ""
    llama_args: tuple[str, ...] = ()
    """Extra arguments appended to every llama-server command line."""
    load_timeout_s: float = 600.0
    join: tuple[str, ...] = ()
    mesh_secret: bytes = b""
    """Admits peers (from the invite token, or made by the first node)."""
    advertise_host: str = "127.0.0.1"
    """Host other nodes dial to reach this one."""
    gossip_port: int = 0
    tunnel_port: int = 0
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 1.0
    console_port: int = 0
    console_host: str = "127.0.0.1"
    log_level: str = "INFO"

    @property
    def tunnel_http_path(self) -> str:
        """Unix socket where the Tunnel takes HTTP requests for remote models."""
        return f"{self.run_dir}/tunnel-http.sock"
