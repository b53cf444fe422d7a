"""The stand-in for `llama-server` that the llama.cpp suite starts (see the package).

It takes llama-server's command line, drops what names a model or where to fetch one
and serves the demo model instead. `MESHLLM_SUITE_TARGET=node` makes it a node
(`meshllm up`) that runs llama-server with the rest of the flags through
`--llama-arg`, listening where the suite asked; otherwise it is llama-server itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from meshllm.models.demo import ensure_demo_model  # noqa: E402
from meshllm.runtime.binaries import find_binary  # noqa: E402
from meshllm.runtime.paths import cache_dir  # noqa: E402

TARGET_ENV = "MESHLLM_SUITE_TARGET"
HOMES_ENV = "MESHLLM_SUITE_HOMES"
"""Where the node runs keep their homes (the runner removes them)."""

MODEL_FLAGS = frozenset(
    {
        "-m",
        "--model",
        "-hf",
        "-hfr",
        "--hf-repo",
        "-hff",
        "--hf-file",
        "-mu",
        "--model-url",
        "-md",
        "--model-draft",
        "--hf-repo-draft",
        "-mm",
        "--mmproj",
        "-mmu",
        "--mmproj-url",
        "--models-dir",
        "--models-max",
        "--models-preset",
        "--lora",
    }
)
"""Flags (each with a value) that say which model to serve or fetch."""
MODEL_SWITCHES = frozenset({"--offline", "--no-models-autoload", "--no-mmproj"})


def split_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """(host, port, the other flags) of a llama-server command line, model flags dropped."""
    host, port = "127.0.0.1", "8080"
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--host":
            host = next(args)
        elif arg == "--port":
            port = next(args)
        elif arg in MODEL_FLAGS:
            next(args, None)
        elif arg not in MODEL_SWITCHES:
            rest.append(arg)
    return host, port, rest


def main() -> None:
    host, port, rest = split_args(sys.argv[1:])
    model = str(ensure_demo_model(cache_dir() / "models"))
    if os.environ.get(TARGET_ENV) != "node":
        binary = find_binary("llama-server")
        os.execv(binary, [binary, *rest, "-m", model, "--host", host, "--port", port])
    homes = os.environ.get(HOMES_ENV) or tempfile.gettempdir()
    home = tempfile.mkdtemp(prefix="node-", dir=homes)
    node = [sys.executable, "-m", "meshllm", "up", "--home", home, "--model", model]
    node += ["--listen", host, "--port", port, "--bind", "127.0.0.1:0", "--log-level", "warning"]
    node += [f"--llama-arg={arg}" for arg in rest]
    # The suite's relative paths (templates, slot files) stay relative to where it runs.
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    os.execv(sys.executable, node)


if __name__ == "__main__":
    main()
