"""llama.cpp's own server tests pass through a node as they pass against llama-server.

A few files of the suite (see `tests.llama_suite`), run twice with the same flags:
against llama-server, then against a node that runs llama-server behind its Proxy.
The whole suite: `.venv/bin/python -m tests.llama_suite` (about half an hour).
"""

from __future__ import annotations

import pytest

from tests.llama_suite.run import compare, run_suite, suite_dir

pytestmark = pytest.mark.integration

FILES = ["unit/test_tokenize.py", "unit/test_security.py", "-k", "tokenize or api_key"]
"""Tokenizing (a route the node used to lack), and llama-server's own `--api-key` checked
behind the node (the client's `Authorization` and `x-api-key` must reach it)."""


def test_the_llama_cpp_suite_passes_through_a_node_as_against_llama_server() -> None:
    if not suite_dir().is_dir():
        pytest.skip(f"the llama.cpp source is not at {suite_dir()} (tools/setup keeps it)")
    direct = run_suite("llama-server", FILES, timeout=300)
    node = run_suite("node", FILES, timeout=300)
    print(f"\nllama-server: {sorted(direct.items())}\nnode: {sorted(node.items())}")
    assert sum(o == "passed" for o in direct.values()) >= 6  # the run itself worked
    regressions, _ = compare(direct, node)
    assert regressions == []
    assert node.keys() == direct.keys()
