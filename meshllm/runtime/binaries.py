"""Finding the llama.cpp binaries: flag, environment variable, the project's cache, PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from meshllm.runtime.paths import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The pinned llama-cpp-python source package whose vendored llama.cpp we build."""

INSTALL_HINT = "run `tools/setup` (or just `tools/build-llama`) to build them into {cache}"

_NAMES = {
    "llama-server": ("llama-server",),
    # Newer llama.cpp names the RPC server ggml-rpc-server, older ones rpc-server.
    "rpc-server": ("ggml-rpc-server", "rpc-server"),
}
_ENV = {"llama-server": "MESHLLM_LLAMA_SERVER", "rpc-server": "MESHLLM_RPC_SERVER"}


class BinaryNotFound(RuntimeError):
    pass


def build_dir() -> Path:
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin"


def find_binary(kind: str, flag: str | None = None) -> str:
    """Path of `kind` ("llama-server" or "rpc-server"), or `BinaryNotFound` saying how to get it."""
    candidates: list[tuple[str, str]] = []
    if flag:
        candidates.append(("--" + kind, flag))
    if env := os.environ.get(_ENV[kind]):
        candidates.append((_ENV[kind], env))
    for origin, path in candidates:
        if os.access(path, os.X_OK) and Path(path).is_file():
            return str(Path(path).resolve())
        raise BinaryNotFound(f"{kind} given by {origin} is not an executable file: {path}")
    for name in _NAMES[kind]:
        cached = build_dir() / name
        if os.access(cached, os.X_OK):
            return str(cached)
    for name in _NAMES[kind]:
        if found := shutil.which(name):
            return found
    raise BinaryNotFound(
        f"{kind} not found (looked at --{kind}, ${_ENV[kind]}, {build_dir()}, PATH); "
        + INSTALL_HINT.format(cache=build_dir())
    )


def rpc_server_binary(flag: str | None) -> tuple[str, str]:
    """The RPC server a split worker runs, and why there is none: a node that is never a
    worker does not need one, so only a wrong `--rpc-server` (or `$MESHLLM_RPC_SERVER`)
    stops the node from starting."""
    try:
        return find_binary("rpc-server", flag), ""
    except BinaryNotFound as exc:
        if flag or os.environ.get(_ENV["rpc-server"]):
            raise
        return "", str(exc)
