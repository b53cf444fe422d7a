"""Finding llama.cpp binaries (meshllm.runtime.binaries): flag, env var, cache, then PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshllm.runtime.binaries import BinaryNotFound, build_dir, find_binary, rpc_server_binary


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An isolated cache, PATH and environment; returns the directories to fill."""
    dirs = {name: tmp_path / name for name in ("cache", "path", "flag", "env")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("MESHLLM_CACHE", str(dirs["cache"]))
    monkeypatch.setenv("PATH", str(dirs["path"]))
    monkeypatch.delenv("MESHLLM_LLAMA_SERVER", raising=False)
    monkeypatch.delenv("MESHLLM_RPC_SERVER", raising=False)
    assert build_dir().is_relative_to(dirs["cache"])
    dirs["build"] = build_dir()
    dirs["build"].mkdir(parents=True)
    return dirs


def _exe(path: Path, executable: bool = True) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def test_flag_comes_first(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    flag = _exe(places["flag"] / "my-llama-server")
    monkeypatch.setenv("MESHLLM_LLAMA_SERVER", str(_exe(places["env"] / "llama-server")))
    _exe(places["build"] / "llama-server")
    _exe(places["path"] / "llama-server")
    assert find_binary("llama-server", str(flag)) == str(flag.resolve())


def test_env_var_comes_before_cache_and_path(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _exe(places["env"] / "llama-server")
    monkeypatch.setenv("MESHLLM_LLAMA_SERVER", str(env))
    _exe(places["build"] / "llama-server")
    _exe(places["path"] / "llama-server")
    assert find_binary("llama-server") == str(env.resolve())
    assert find_binary("llama-server", None) == str(env.resolve())


def test_cache_comes_before_path(places: dict[str, Path]) -> None:
    cached = _exe(places["build"] / "llama-server")
    _exe(places["path"] / "llama-server")
    assert find_binary("llama-server") == str(cached)


def test_path_comes_last(places: dict[str, Path]) -> None:
    on_path = _exe(places["path"] / "llama-server")
    assert find_binary("llama-server") == str(on_path)


def test_non_executable_cache_entry_is_skipped(places: dict[str, Path]) -> None:
    _exe(places["build"] / "llama-server", executable=False)
    on_path = _exe(places["path"] / "llama-server")
    assert find_binary("llama-server") == str(on_path)


def test_rpc_server_new_name_preferred_then_old_name(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _exe(places["build"] / "rpc-server")
    assert find_binary("rpc-server") == str(old)
    new = _exe(places["build"] / "ggml-rpc-server")
    assert find_binary("rpc-server") == str(new)
    env = _exe(places["env"] / "rpc")
    monkeypatch.setenv("MESHLLM_RPC_SERVER", str(env))
    assert find_binary("rpc-server") == str(env.resolve())


def test_non_executable_flag_path_errors_clearly(places: dict[str, Path]) -> None:
    # A bad explicit choice is an error, never silently replaced by another binary.
    _exe(places["build"] / "llama-server")
    bad = _exe(places["flag"] / "llama-server", executable=False)
    with pytest.raises(BinaryNotFound) as err:
        find_binary("llama-server", str(bad))
    message = str(err.value)
    assert "--llama-server" in message
    assert str(bad) in message
    assert "not an executable file" in message


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_flag_path_missing_or_a_directory_errors(places: dict[str, Path], what: str) -> None:
    path = places["flag"] / "nope" if what == "missing" else places["flag"]
    with pytest.raises(BinaryNotFound, match="given by --rpc-server is not an executable file"):
        find_binary("rpc-server", str(path))


def test_non_executable_env_path_errors_naming_the_variable(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _exe(places["path"] / "llama-server")
    bad = _exe(places["env"] / "llama-server", executable=False)
    monkeypatch.setenv("MESHLLM_LLAMA_SERVER", str(bad))
    with pytest.raises(BinaryNotFound, match="MESHLLM_LLAMA_SERVER"):
        find_binary("llama-server")


@pytest.mark.parametrize("kind", ["llama-server", "rpc-server"])
def test_nothing_found_says_how_to_install(places: dict[str, Path], kind: str) -> None:
    with pytest.raises(BinaryNotFound) as err:
        find_binary(kind)
    message = str(err.value)
    assert f"{kind} not found" in message
    assert "tools/setup" in message
    assert str(build_dir()) in message
    assert "PATH" in message


def test_symlinked_flag_is_resolved(places: dict[str, Path]) -> None:
    real = _exe(places["flag"] / "real-server")
    link = places["flag"] / "link"
    os.symlink(real, link)
    assert find_binary("llama-server", str(link)) == str(real.resolve())


def test_a_missing_rpc_server_is_said_only_when_asked_for(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not found anywhere: the node starts, and says why when asked to be a worker.
    path, why = rpc_server_binary(None)
    assert path == "" and "rpc-server not found" in why
    # Asked for by flag or variable, a wrong path stops the start.
    with pytest.raises(BinaryNotFound, match="--rpc-server"):
        rpc_server_binary(str(places["flag"] / "nope"))
    monkeypatch.setenv("MESHLLM_RPC_SERVER", str(places["env"] / "nope"))
    with pytest.raises(BinaryNotFound, match="MESHLLM_RPC_SERVER"):
        rpc_server_binary(None)
    found = _exe(places["env"] / "ggml-rpc-server")
    monkeypatch.setenv("MESHLLM_RPC_SERVER", str(found))
    assert rpc_server_binary(None) == (str(found), "")
