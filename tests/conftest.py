from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from meshllm.models.demo import ensure_demo_model
from meshllm.runtime.binaries import BinaryNotFound, find_binary
from meshllm.runtime.paths import cache_dir
from meshllm.testing import NodeProcess

# mDNS (LAN discovery) stays on loopback in every test and every node a test starts.
os.environ.setdefault("MESHLLM_MDNS_INTERFACES", "127.0.0.1")

FUZZ_EXAMPLES_ENV = "MESHLLM_FUZZ_EXAMPLES"
"""Cases per property in tests/test_fuzz.py. By default 2,000 where the `CI` variable is
set (as CI services set it) and 200 elsewhere, which keeps the file under ~40 s on two
busy cores; set it to hunt longer, e.g. `MESHLLM_FUZZ_EXAMPLES=100000`."""


def _fuzz_examples() -> int:
    value = os.environ.get(FUZZ_EXAMPLES_ENV) or ("2000" if os.environ.get("CI") else "200")
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{FUZZ_EXAMPLES_ENV} must be a positive integer, not {value!r}")
    return int(value)


# No deadline: a slow case on a busy machine is not a failure (pytest-timeout bounds a
# test); print_blob prints what replays a failure found in CI (@reproduce_failure).
settings.register_profile(
    "meshllm",
    max_examples=_fuzz_examples(),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("meshllm")


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
