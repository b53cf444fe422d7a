"""The `meshllm` command line (meshllm.cli), driven with click's CliRunner."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import meshllm.cli
import meshllm.runtime.logs
import meshllm.up
from meshllm.cli import main
from meshllm.http.auth import digest_of
from meshllm.mesh.token import InviteToken, decode_token, encode_token, new_secret, token_text
from meshllm.models.demo import DEMO_MODEL_NAME
from meshllm.runtime import messages as m
from meshllm.up import UpOptions


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def _lookup(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


COMMANDS = list(_commands(main))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="meshllm", catch_exceptions=False)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real home, cache or logging set-up; never start a real node."""
    monkeypatch.setenv("MESHLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MESHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MESHLLM_TOKEN", raising=False)
    monkeypatch.setattr(meshllm.runtime.logs, "setup", lambda *a, **k: None)


def test_command_tree_is_complete() -> None:
    assert {" ".join(p) for p in COMMANDS} >= {
        "",
        "up",
        "ctl",
        "ctl status",
        "ctl drop",
        "ctl stop",
        "models",
        "models demo",
        "discover",
    }


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "meshllm")
def test_help_documents_every_option(path: tuple[str, ...]) -> None:
    for flag in ("--help", "-h"):
        result = invoke(*path, flag)
        assert result.exit_code == 0, result.output
        assert f"Usage: {' '.join(('meshllm', *path))} " in result.output
    cmd = _lookup(path)
    assert cmd.help, f"{path} has no docstring"
    assert " ".join(cmd.help.split()[:6]) in " ".join(result.output.split())
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            assert param.help, f"option {param.opts} of {path} has no help text"
            assert max(param.opts, key=len) in result.output


def test_up_help_shows_defaults() -> None:
    out = invoke("up", "--help").output
    assert "9337" in out and "127.0.0.1" in out


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("meshllm, version ")


@pytest.fixture
def captured_up(monkeypatch: pytest.MonkeyPatch) -> list[UpOptions]:
    """`meshllm.up.run` replaced by a recorder, to test argument parsing only."""
    calls: list[UpOptions] = []

    def fake_run(opts: UpOptions) -> int:
        calls.append(opts)
        return 0

    monkeypatch.setattr(meshllm.up, "run", fake_run)
    return calls


def test_up_forwards_options(captured_up: list[UpOptions], tmp_path: Path) -> None:
    result = invoke(
        "up",
        "--model",
        "a.gguf",
        "--model",
        "b",
        "--home",
        str(tmp_path / "h"),
        "--port",
        "0",
        "--listen",
        "0.0.0.0",
        "--strict-models",
        "--max-body-mb",
        "0.5",
        "--llama-arg=-c",
        "--llama-arg=4096",
        "--log-level",
        "debug",
    )
    assert result.exit_code == 0, result.output
    (opts,) = captured_up
    assert opts.models == ["a.gguf", "b"]
    assert opts.home == str(tmp_path / "h")
    assert opts.port == 0 and opts.listen == "0.0.0.0"
    assert opts.strict_models and not opts.client
    assert opts.max_body_bytes == 512 * 1024
    assert opts.llama_args == ["-c", "4096"]
    assert opts.log_level == "debug"


def test_up_defaults(captured_up: list[UpOptions], tmp_path: Path) -> None:
    assert invoke("up").exit_code == 0
    (opts,) = captured_up
    assert opts.port == 9337 and opts.listen == "127.0.0.1"
    assert opts.models == [] and opts.join == []
    assert opts.home == str(tmp_path / "home")  # from MESHLLM_HOME
    assert opts.max_body_bytes == 16 * 1024 * 1024
    # The command line's defaults are the dataclass's: each option is defined once.
    assert opts == dataclasses.replace(UpOptions(), home=str(tmp_path / "home"))


def test_up_cold_grace_is_an_option(captured_up: list[UpOptions]) -> None:
    assert invoke("up", "--cold-grace", "2.5").exit_code == 0
    assert captured_up[0].cold_grace_s == 2.5
    result = invoke("up", "--cold-grace", "-1")
    assert result.exit_code == 2 and "--cold-grace" in result.output
    assert len(captured_up) == 1


@pytest.mark.parametrize("port", ["70000", "65536", "-1", "abc", "1.5"])
def test_up_rejects_invalid_port(captured_up: list[UpOptions], port: str) -> None:
    result = invoke("up", "--port", port)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "--port" in result.output
    assert "Traceback" not in result.output
    assert captured_up == []


@pytest.mark.parametrize("size", ["0", "-3"])
def test_up_rejects_non_positive_body_limit(captured_up: list[UpOptions], size: str) -> None:
    result = invoke("up", "--max-body-mb", size)
    assert result.exit_code == 2 and "--max-body-mb" in result.output
    assert captured_up == []


def test_up_rejects_unknown_log_level(captured_up: list[UpOptions]) -> None:
    result = invoke("up", "--log-level", "LOUD")
    assert result.exit_code == 2 and "--log-level" in result.output


def test_up_client_without_join_errors_clearly(tmp_path: Path) -> None:
    result = invoke("up", "--client", "--home", str(tmp_path / "h"))
    assert result.exit_code == 1, result.output
    assert "Error: a lite client needs a mesh to join: pass --join TOKEN" in result.output
    assert "Traceback" not in result.output


def test_up_client_with_model_errors_clearly(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    result = invoke("up", "--client", "--join", "t", "--model", str(model), "--home", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert "serves no model" in result.output


def test_up_missing_model_errors_clearly(tmp_path: Path) -> None:
    result = invoke("up", "--model", str(tmp_path / "nope.gguf"), "--home", str(tmp_path / "h"))
    assert result.exit_code == 1, result.output
    assert "not found" in result.output and "nope.gguf" in result.output


def test_a_seeded_model_may_be_a_name_this_node_cannot_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
    with caplog.at_level("WARNING", "meshllm.up"):
        spec = meshllm.up.seed_model("nowhere-model.gguf")
    assert spec == m.ModelSpec(name="nowhere-model")  # requested by name: no path, no source
    assert "seeded by name only" in caplog.text and "nowhere-model" in caplog.text
    found = tmp_path / "models" / "here.gguf"
    found.parent.mkdir()
    found.write_bytes(b"GGUF")
    assert meshllm.up.seed_model("here").path == str(found)  # resolved when it can be


@pytest.mark.parametrize("ref", ["/no/such/dir/x.gguf", "sub/x.gguf", ".hidden", "https://h/x.txt"])
def test_a_seeded_model_that_cannot_name_a_model_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(meshllm.up.UpError):
        meshllm.up.seed_model(ref)


@pytest.mark.parametrize(
    "args", [("ctl", "status"), ("ctl", "stop"), ("ctl", "drop", "m"), ("ctl", "status", "--json")]
)
def test_ctl_without_a_running_node(tmp_path: Path, args: tuple[str, ...]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(*args, "--home", str(empty))
    assert result.exit_code == 1, result.output
    assert f"Error: no meshllm node is running with home {empty.resolve()}" in result.output
    assert list(empty.iterdir()) == [], "ctl must not create files in the home"


def test_ctl_status_uses_meshllm_home(tmp_path: Path) -> None:
    result = invoke("ctl", "status")
    assert result.exit_code == 1
    assert str(tmp_path / "home") in result.output


def test_models_demo_prints_its_path(tmp_path: Path) -> None:
    result = invoke("models", "demo")
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path == tmp_path / "cache" / "models" / f"{DEMO_MODEL_NAME}.gguf"
    assert path.is_file() and path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    again = invoke("models", "demo")
    assert Path(again.output.strip()) == path
    assert path.stat().st_mtime_ns == mtime  # not rewritten


def test_models_demo_name_and_seed(tmp_path: Path) -> None:
    result = invoke("models", "demo", "--name", "other", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == tmp_path / "cache" / "models" / "other.gguf"


@pytest.mark.parametrize(
    ("arg", "why"),
    [
        ("--llama-arg=--host", "bound to 127.0.0.1"),
        ("--llama-arg=--port=80", "bound to 127.0.0.1"),
        ("--llama-arg=-m", "which model to load"),
        ("--llama-arg=--model=x.gguf", "which model to load"),
        ("--llama-arg=--hf-repo", "which model to load"),
    ],
)
def test_up_refuses_llama_args_the_node_owns(
    tmp_path: Path, arg: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLLM_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["up", "--home", str(tmp_path / "home"), arg])
    assert result.exit_code != 0
    assert "not allowed" in result.output and why in result.output


def test_secrets_in_a_logged_command_are_hidden() -> None:
    from meshllm.runtime.procutil import redact

    cmd = ["llama-server", "--api-key", "sk-1", "-t", "1", "--api-key=sk-2", "--hf-token", "h"]
    assert redact(cmd) == [
        "llama-server",
        "--api-key",
        "***",
        "-t",
        "1",
        "--api-key=***",
        "--hf-token",
        "***",
    ]


def test_advertised_host_prefers_the_flag_then_the_bind_address() -> None:
    from meshllm.up import advertise_host

    assert advertise_host("0.0.0.0", "node7.lan") == "node7.lan"
    assert advertise_host("10.1.2.3", None) == "10.1.2.3"
    wildcard = advertise_host("0.0.0.0", None)
    # Never the 127.0.1.1 that a Debian host name resolves to, unless nothing else exists.
    assert wildcard == "127.0.0.1" or not wildcard.startswith("127.")


TOKEN = encode_token(InviteToken(new_secret(), ("127.0.0.1:7",), "m"))


def test_up_takes_the_token_from_the_environment(
    captured_up: list[UpOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLLM_TOKEN", TOKEN)
    assert invoke("up").exit_code == 0
    assert captured_up[-1].join == [TOKEN]
    assert "MESHLLM_TOKEN" not in os.environ  # not inherited by llama-server and the actors
    monkeypatch.setenv("MESHLLM_TOKEN", TOKEN)
    assert invoke("up", "--join", "@given").exit_code == 0
    assert captured_up[-1].join == ["@given"]  # --join wins


def test_join_at_file_reads_the_stripped_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n  {TOKEN}\n")
    assert token_text(f"@{path}") == TOKEN
    assert decode_token(token_text(f"@{path}")) == decode_token(TOKEN)
    assert token_text(TOKEN) == TOKEN


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        (" \n", "is empty"),
        ("dir", "cannot read the token file"),
        ("hello", "an invite token starts with"),
    ],
)
def test_up_join_at_file_errors_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, says: str
) -> None:
    path = tmp_path / "token"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    for args in (["--join", f"@{path}"], []):
        monkeypatch.setenv("MESHLLM_TOKEN", f"@{path}")
        result = invoke("up", "--client", "--home", str(tmp_path / "h"), *args)
        assert result.exit_code == 1, result.output
        assert says in result.output and "Traceback" not in result.output
    assert invoke("up", "--join", "@", "--home", str(tmp_path / "h")).exit_code == 1


@pytest.fixture
def node_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`meshllm ctl token` answered as a running node would."""
    monkeypatch.setattr(meshllm.cli, "_ask", lambda home, msg: m.CtlDone(TOKEN))


@pytest.mark.usefixtures("node_token")
def test_ctl_token_out_writes_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    result = invoke("ctl", "token", "--out", str(path))
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token_text(f"@{path}") == TOKEN
    assert invoke("ctl", "token", "--out", str(path)).exit_code == 0  # ours, 0600: replaced
    assert invoke("ctl", "token").output.strip() == TOKEN


@pytest.mark.usefixtures("node_token")
def test_ctl_token_out_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    path.chmod(0o644)
    result = invoke("ctl", "token", "--out", str(path))
    assert result.exit_code == 1 and "readable by others" in result.output
    assert path.read_text() == "old"
    link = tmp_path / "link"
    link.symlink_to(path)
    result = invoke("ctl", "token", "--out", str(link))
    assert result.exit_code == 1 and "not a regular file" in result.output
    assert path.read_text() == "old"
    if os.getuid() == 0:
        path.chmod(0o600)
        os.chown(path, 1, 1)
        result = invoke("ctl", "token", "--out", str(path))
        assert result.exit_code == 1 and "another user" in result.output
        assert path.read_text() == "old"
    # A hard link to another of our files (swapped in by someone who can write the
    # directory) is not emptied and overwritten either.
    other = tmp_path / "other"
    other.write_text("keep")
    other.chmod(0o600)
    hard = tmp_path / "hard"
    os.link(other, hard)
    result = invoke("ctl", "token", "--out", str(hard))
    assert result.exit_code == 1 and "other hard links" in result.output
    assert other.read_text() == "keep"
    result = invoke("ctl", "token", "--out", str(tmp_path / "no" / "dir"))
    assert result.exit_code == 1 and "cannot write" in result.output


def test_up_forwards_backend_urls(captured_up: list[UpOptions]) -> None:
    result = invoke(
        "up", "--backend-url", "http://127.0.0.1:8080", "--backend-url", "http://10.0.0.2:8000/v1"
    )
    assert result.exit_code == 0, result.output
    assert captured_up[0].backend_urls == ["http://127.0.0.1:8080", "http://10.0.0.2:8000/v1"]


@pytest.mark.parametrize(
    ("urls", "says"),
    [
        (["https://127.0.0.1:8443"], "https backends are not supported"),
        (["127.0.0.1:8080"], "must start with http://"),
        (["http://127.0.0.1"], "names no port"),
        (["http://127.0.0.1:8080/api"], "only http://host:port"),
        (["http://127.0.0.1:8080", "http://127.0.0.1:8080/"], "is given twice"),
    ],
)
def test_up_rejects_bad_backend_urls(
    captured_up: list[UpOptions], urls: list[str], says: str
) -> None:
    result = invoke("up", *(arg for url in urls for arg in ("--backend-url", url)))
    assert result.exit_code == 2, result.output
    assert "--backend-url" in result.output and says in result.output
    assert "Traceback" not in result.output
    assert captured_up == []


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--client", "--join", TOKEN), "a lite client (--client) serves no model"),
        (("--model", "org/model"), "cannot name a model in the mesh"),
        (("--split",), "--split is for this node's own llama-server"),
        (("--llama-arg=-c",), "--llama-arg is for this node's own llama-server"),
    ],
)
def test_up_with_backends_refuses_what_cannot_go_with_them(
    tmp_path: Path, extra: tuple[str, ...], says: str
) -> None:
    result = invoke(
        "up", "--home", str(tmp_path / "h"), "--backend-url", "http://127.0.0.1:8080", *extra
    )
    assert result.exit_code == 1, result.output
    assert says in result.output and "Traceback" not in result.output


# -- --api-key ------------------------------------------------------------------------

KEY = "sk-alice-0123456789"


def test_api_keys_come_from_flags_files_and_the_environment(
    captured_up: list[UpOptions], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke("up", "--api-key", KEY, "--api-key", "@f", "--key-rpm", "60").exit_code == 0
    assert captured_up[-1].api_keys == [KEY, "@f"] and captured_up[-1].key_rpm == 60
    monkeypatch.setenv("MESHLLM_API_KEYS", f"alice:{KEY} @{tmp_path / 'keys'}")
    assert invoke("up").exit_code == 0
    assert captured_up[-1].api_keys == [f"alice:{KEY}", f"@{tmp_path / 'keys'}"]
    assert "MESHLLM_API_KEYS" not in os.environ  # read, and not inherited by llama-server


def test_up_keeps_only_the_keys_digests(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"bob:{KEY}-b:rpm=5\n")
    opts = UpOptions(api_keys=[f"alice:{KEY}", f"@{path}"], key_rpm=60, console_port=3131)
    keys, console_key = meshllm.up.api_keys(opts)
    assert [(k.name, k.rpm) for k in keys] == [("alice", 60), ("bob", 5), ("console", 0)]
    assert len(console_key) >= 32 and keys[-1].digest == digest_of(console_key)
    assert KEY not in repr(keys)
    keys, console_key = meshllm.up.api_keys(dataclasses.replace(opts, console_port=0))
    assert [k.name for k in keys] == ["alice", "bob"] and console_key == ""


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ({"listen": "0.0.0.0"}, "--listen 0.0.0.0 opens the OpenAI API beyond this machine"),
        ({"listen": "192.0.2.7"}, "or pass --insecure"),
        ({"key_rpm": 5}, "--key-rpm limits each --api-key"),
        ({"api_keys": ["tiny"]}, "--api-key #1: a key is 8 to 512"),
        ({"api_keys": [f"console:{KEY}"]}, "the console's"),
        ({"api_keys": [KEY], "llama_args": ["--api-key", "x"]}, "cannot go with --api-key"),
        ({"api_keys": [KEY], "llama_args": ["--api-key-file=f"]}, "cannot go with --api-key"),
    ],
)
def test_up_refuses_keys_given_wrongly_and_an_open_endpoint(
    given: dict[str, object], why: str
) -> None:
    with pytest.raises(meshllm.up.UpError, match=why) as info:
        meshllm.up.api_keys(UpOptions(**given))  # type: ignore[arg-type]
    assert "tiny" not in str(info.value)


@pytest.mark.parametrize(
    "given",
    [
        {"listen": "0.0.0.0", "insecure": True},
        {"listen": "0.0.0.0", "api_keys": [KEY]},
        {"listen": "127.0.0.2"},
        {"listen": "::1"},
        {"api_keys": [KEY], "llama_args": ["-c", "4096"]},
    ],
)
def test_up_accepts(given: dict[str, object]) -> None:
    meshllm.up.api_keys(UpOptions(**given))  # type: ignore[arg-type]


def test_up_beyond_loopback_without_a_key_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    result = invoke("up", "--listen", "0.0.0.0", "--home", str(tmp_path / "h"))
    assert result.exit_code == 1, result.output
    assert "--insecure" in result.output and "Traceback" not in result.output


def test_up_demand_options(captured_up: list[UpOptions], tmp_path: Path) -> None:
    args = ("--models-dir", str(tmp_path), "--idle-unload", "30", "--hot-rpm", "0")
    assert invoke("up", *args, "--load-wait", "5").exit_code == 0
    opts = captured_up[0]
    assert (opts.models_dir, opts.idle_unload_s, opts.hot_rpm, opts.load_wait_s) == (
        str(tmp_path),
        30,
        0,
        5,
    )
    assert invoke("up", "--min-size-mb", "0").exit_code == 0
    assert captured_up[1].min_size_mb == 0
    for flag in ("--idle-unload", "--hot-rpm", "--load-wait", "--min-size-mb"):
        result = invoke("up", flag, "-1")
        assert result.exit_code == 2 and flag in result.output
    assert len(captured_up) == 2


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ({"models_dir": "/no/such/dir"}, "--models-dir /no/such/dir: no such directory"),
        ({"models_dir": ".", "client": True}, "a lite client .* runs no llama-server"),
        (
            {"models_dir": ".", "backend_urls": ["http://127.0.0.1:1"]},
            "--backend-url runs no llama-server",
        ),
    ],
)
def test_up_refuses_a_models_dir_it_cannot_serve(
    given: dict[str, object], why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHLLM_MODELS_DIR", raising=False)
    with pytest.raises(meshllm.up.UpError, match=why):
        meshllm.up.use_models_dir(UpOptions(**given))  # type: ignore[arg-type]
    assert "MESHLLM_MODELS_DIR" not in os.environ


def test_a_models_dir_is_where_models_are_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLLM_MODELS_DIR", "/elsewhere")
    meshllm.up.use_models_dir(UpOptions(models_dir=str(tmp_path)))
    assert os.environ["MESHLLM_MODELS_DIR"] == str(tmp_path.resolve())
