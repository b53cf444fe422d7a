"""Running the llama.cpp suite (see the package) and reading its outcomes."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from meshllm.runtime.binaries import LLAMA_CPP_PYTHON_VERSION
from meshllm.runtime.paths import cache_dir
from tests.llama_suite.server import HOMES_ENV, TARGET_ENV

HERE = Path(__file__).resolve().parent
RUN_TIMEOUT_S = 3600


def suite_dir() -> Path:
    """`tools/server/tests` in the llama.cpp source `tools/build-llama` built from."""
    version = LLAMA_CPP_PYTHON_VERSION
    source = cache_dir() / f"build-{version}" / f"llama_cpp_python-{version}"
    return source / "vendor" / "llama.cpp" / "tools" / "server" / "tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_suite(
    target: str, pytest_args: list[str], timeout: float = RUN_TIMEOUT_S
) -> dict[str, str]:
    """Test id -> "passed", "failed", "error" or "skipped" for one run of the suite with
    the stand-in server as `target` ("llama-server" or "node")."""
    tests = suite_dir()
    if not tests.is_dir():
        raise FileNotFoundError(f"no llama.cpp server tests at {tests}: run tools/setup first")
    with tempfile.TemporaryDirectory(prefix="llama-suite-") as work:
        stand_in = Path(work) / "llama-server"
        stand_in.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "server.py"}" "$@"\n')
        stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
        homes = Path(work) / "homes"
        homes.mkdir()
        report = Path(work) / "report.xml"
        env = {
            **os.environ,
            "LLAMA_SERVER_BIN_PATH": str(stand_in),
            TARGET_ENV: target,
            HOMES_ENV: str(homes),
            "PORT": str(free_port()),
            "PYTHONPATH": str(HERE / "shim"),
            "LLAMA_CACHE": str(Path(work) / "llama-cache"),
        }
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "meshllm_suite_plugin",
            "-p",
            "no:cacheprovider",
            "-q",
            "-m",
            "not slow",
            f"--junitxml={report}",
            *pytest_args,
        ]
        subprocess.run(
            command,
            cwd=tests,
            env=env,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        outcomes = read_report(report) if report.exists() else {}
        shutil.rmtree(homes, ignore_errors=True)
    return outcomes


def read_report(path: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            outcomes[name] = "failed"
        elif "error" in kinds:
            outcomes[name] = "error"
        elif "skipped" in kinds:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def compare(direct: dict[str, str], node: dict[str, str]) -> tuple[list[str], list[str]]:
    """(tests that pass directly but not through the node, the other way round)."""
    regressions = sorted(t for t, o in direct.items() if o == "passed" and node.get(t) != "passed")
    gains = sorted(t for t, o in node.items() if o == "passed" and direct.get(t) != "passed")
    return regressions, gains
