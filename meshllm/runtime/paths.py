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


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, readable by this user only (0600)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
    def owner_key_path(self) -> Path:
        """The mesh owner key (owner-only): made by the node that started the mesh,
        moved with `meshllm ctl owner export/import`; signs `ctl --node ID ...`."""
        return self.root / "owner.key"

    @property
    def owner_public_path(self) -> Path:
        """The mesh owner's public key (DER), from the invite token: what this node
        checks owner commands against."""
        return self.root / "owner.pub"

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
