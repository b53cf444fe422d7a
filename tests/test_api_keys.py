"""`meshllm up --api-key` with real nodes on loopback.

Node A requires keys (from a file); node B joins with a key of its own and serves
the second model. A request is authorised where it enters the mesh: A's key gets
B's model through A (B's tunnel host asks for none), and is no key at B itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshllm.testing import NodeProcess, http, token_of, wait_for

pytestmark = pytest.mark.integration

SERVING = ("--bind", "127.0.0.1:0", "--llama-arg=-t", "--llama-arg=1")
A_KEY = "sk-alice-0123456789"
LIMITED_KEY = "sk-limited-0123456789"
TOKENS_KEY = "sk-tokens-0123456789"
B_KEY = "sk-bnode-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post(
    node: NodeProcess, model: str, headers: dict[str, str], stream: bool = False
) -> tuple[int, dict[str, Any]]:
    status, resp_headers, body = http(
        node.port,
        "POST",
        "/v1/chat/completions",
        {**CHAT, "model": model, "stream": stream},
        headers={"content-type": "application/json", **headers},
    )
    return status, {"body": body if stream else json.loads(body), "headers": resp_headers}


def wait_health(node: NodeProcess, *models: str, timeout: float = 60) -> None:
    """Until `/health` (which needs no key) lists `models` as ready."""

    def ready() -> bool:
        node.check_alive()
        status, _, body = http(node.port, "GET", "/health", timeout=2)
        listed = json.loads(body)["models"] if status == 200 else []
        if not set(models) <= set(listed):
            raise AssertionError(f"/health: {status} {body!r}")
        return True

    wait_for(ready, timeout, f"{models} ready on :{node.port}", interval=0.2)


def test_a_node_with_keys(
    start_node: Callable[..., NodeProcess],
    demo_model: Path,
    second_model: Path,
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# the team\nalice:{A_KEY}\nlimited:{LIMITED_KEY}:rpm=1\n")
    keys.write_text(keys.read_text() + f"tokens:{TOKENS_KEY}:tpm=30\n")
    env = {"MESHLLM_MODELS_DIR": str(tmp_path / "no-models")}
    a = start_node("--model", str(demo_model), "--api-key", f"@{keys}", *SERVING, env=env)
    wait_health(a, demo_model.stem)
    assert "requires a key: alice, limited, tokens" in a.log()

    status, got = post(a, demo_model.stem, {})
    assert status == 401 and got["body"]["error"]["code"] == "missing_api_key"
    status, got = post(a, demo_model.stem, {"authorization": "Bearer sk-wrong-0123456789"})
    assert status == 401 and got["body"]["error"]["code"] == "invalid_api_key"
    assert http(a.port, "GET", "/v1/models")[0] == 401
    assert post(a, demo_model.stem, {"authorization": f"Bearer {A_KEY}"})[0] == 200
    assert post(a, demo_model.stem, {"x-api-key": A_KEY})[0] == 200
    assert http(a.port, "GET", "/v1/models", headers={"x-api-key": A_KEY})[0] == 200

    # One request a minute: the second within it is 429, with the wait.
    assert post(a, demo_model.stem, {"x-api-key": LIMITED_KEY})[0] == 200
    status, got = post(a, demo_model.stem, {"x-api-key": LIMITED_KEY})
    assert status == 429 and got["body"]["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(got["headers"]["retry-after"]) <= 60

    # 30 tokens a minute: an answer (~22 tokens, from its usage) and a stream (from
    # llama-server's timings) spend more than that, so the third request waits.
    tokens = {"authorization": f"Bearer {TOKENS_KEY}"}
    assert post(a, demo_model.stem, tokens)[0] == 200
    status, got = post(a, demo_model.stem, tokens, stream=True)
    assert status == 200 and b'"timings"' in got["body"]
    status, got = post(a, demo_model.stem, tokens)
    assert status == 429 and "30 tokens per minute" in got["body"]["error"]["message"]

    # B requires its own key; A's request for B's model is authorised at A.
    b = start_node(
        "--model", str(second_model), "--join", token_of(a), "--api-key", B_KEY, *SERVING, env=env
    )
    wait_health(b, second_model.stem)
    wait_health(a, demo_model.stem, second_model.stem)
    status, got = post(a, second_model.stem, {"authorization": f"Bearer {A_KEY}"})
    assert status == 200, got
    assert post(b, second_model.stem, {"authorization": f"Bearer {A_KEY}"})[0] == 401
    assert post(b, demo_model.stem, {"authorization": f"Bearer {B_KEY}"})[0] == 200

    # Never logged: not by the nodes, not in llama-server's command line or log.
    for node in (a, b):
        logs = node.log() + "".join(
            p.read_text(errors="replace") for p in (node.home / "logs").glob("*.log")
        )
        for key in (A_KEY, LIMITED_KEY, TOKENS_KEY, B_KEY):
            assert key not in logs
