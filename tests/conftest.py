from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshllm.models.demo import ensure_demo_model
from meshllm.runtime.binaries import BinaryNotFound, find_binary
from meshllm.runtime.paths import cache_dir
from meshllm.testing import NodeProcess


@pytest.fixture(scope="session")
def llama_server() -> str:
    try:
        return find_binary("llama-server")
    except BinaryNotFound as exc:
        pytest.fail(f"integration tests need llama-server: {exc}")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return ensure_demo_model(cache_dir() / "models")


@pytest.fixture(scope="session")
def second_model() -> Path:
    """A second demo model with other weights and another name."""
    return ensure_demo_model(cache_dir() / "models", seed=1, name="meshllm-demo-b")


@pytest.fixture
def start_node(tmp_path: Path, llama_server: str) -> Iterator[Callable[..., NodeProcess]]:
    """Start `meshllm up` processes; every one is stopped when the test ends."""
    nodes: list[NodeProcess] = []

    def start(*args: str, name: str | None = None, **kwargs: object) -> NodeProcess:
        home = tmp_path / (name or f"node{len(nodes)}")
        node = NodeProcess(home, *args, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.stop()
