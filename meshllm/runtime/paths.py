"""Where a node keeps its state: the home directory and its run directory."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

DEFAULT_HOME = Path("~/.meshllm")
DEFAULT_MODELS_DIR = Path("~/.models")


def cache_dir() -> Path:
    """The per-machine cache (llama.cpp builds live here, outside any checkout)."""
    if env := os.environ.get("MESHLLM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshllm"


def publish_json(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` whole or not at all (a reader never sees half of
    it): a node's counters for the benchmark and the tests. Best effort: a file that
    cannot be written is skipped."""
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_bytes(msgspec.json.encode(data))
        tmp.replace(path)


def models_dir() -> Path:
    """The models directory: `MESHLLM_MODELS_DIR`, else `~/.models`."""
    return Path(os.environ.get("MESHLLM_MODELS_DIR") or DEFAULT_MODELS_DIR).expanduser()


@dataclass(frozen=True)
class NodeHome:
    """Layout of a node's home directory (`--home`, default `~/.meshllm`)."""

    root: Path

    @property
    def run_dir(self) -> Path:
        """Sockets, pid and lock files of the running node (owner-only)."""
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def key_path(self) -> Path:
        return self.root / "node.key"

    @property
    def secret_path(self) -> Path:
        """The secret of the mesh this node belongs to (owner-only)."""
        return self.root / "mesh.secret"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "node.lock"

    @property
    def control_address(self) -> str:
        return f"ipc://{self.run_dir / 'control.ipc'}"

    def ensure(self) -> None:
        """Create the directories with owner-only permissions."""
        for path in (self.root, self.run_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o700)


def home_from(path: str | os.PathLike[str] | None) -> NodeHome:
    return NodeHome(Path(path or DEFAULT_HOME).expanduser().resolve())
