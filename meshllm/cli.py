"""The `meshllm` command line. Each command only forwards to the programmatic API."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import click

from meshllm import __version__
from meshllm.mesh.token import ENV_VAR as TOKEN_ENV
from meshllm.runtime import messages as m
from meshllm.runtime.config import UpOptions, flag_of
from meshllm.runtime.paths import home_from

F = TypeVar("F", bound=Callable[..., Any])
UP_FIELDS = {f.name: f for f in dataclasses.fields(UpOptions) if "flag" in f.metadata}
_UP_TYPES = get_type_hints(UpOptions)


def _checked(check: Callable[[Any], str | None]) -> Callable[[click.Context, Any, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        problem = check(value)
        if problem is not None:
            raise click.BadParameter(problem, ctx, param)
        return value

    return callback


def up_option(name: str) -> Callable[[F], F]:
    """The click option of `UpOptions` field `name`, from the field's type, default and `Flag`."""
    field = UP_FIELDS[name]
    flag = flag_of(field)
    kind = _UP_TYPES[name]
    kwargs: dict[str, Any] = {"help": flag.help, "metavar": flag.metavar, "envvar": flag.envvar}
    if get_origin(kind) is list:
        kwargs.update(multiple=True, type=get_args(kind)[0])
    elif kind is bool:
        kwargs.update(is_flag=True)
    else:
        # `float | None` takes a float; the default (None) means "not given".
        types = [t for t in get_args(kind) if t is not type(None)] or [kind]
        default = field.default if flag.shown_default is None else flag.shown_default
        kwargs.update(type=types[0], default=default, show_default=default is not None)
        if flag.choices:
            kwargs["type"] = click.Choice(flag.choices, case_sensitive=False)
    if flag.check is not None:
        kwargs["callback"] = _checked(flag.check)
    return click.option(flag.name, name, **kwargs)


HOME_OPTION = up_option("home")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="meshllm")
def main() -> None:
    """meshllm pools a group's machines into one OpenAI-compatible LLM service.

    Start a node with `meshllm up`; with no options it serves a tiny demo model
    on http://127.0.0.1:9337/v1. Manage a running node with `meshllm ctl`.
    """


def up_options(command: F) -> F:
    """Every option of `meshllm up`, one per `UpOptions` field, in the field order."""
    for name in reversed(UP_FIELDS):
        command = up_option(name)(command)
    return command


@main.command()
@up_options
def up(**given: Any) -> None:
    """Start a node and run it in the foreground until Ctrl-C or `meshllm ctl stop`."""
    from meshllm.runtime.binaries import BinaryNotFound
    from meshllm.up import UpError, run

    # click gives a repeated option as a tuple; UpOptions keeps lists.
    values: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
    # Read (when --join was not given): llama-server and the actors need not inherit it.
    os.environ.pop(TOKEN_ENV, None)
    os.environ.pop("MESHLLM_API_KEYS", None)  # likewise (read: --api-key)
    source = click.get_current_context().get_parameter_source("api_keys")
    values["api_keys_from_env"] = source is click.core.ParameterSource.ENVIRONMENT
    opts = UpOptions(**values)
    try:
        sys.exit(run(opts))
    except (UpError, BinaryNotFound) as exc:
        raise click.ClickException(str(exc)) from None


REMOTE_COMMANDS = ("drop", "stop")
"""The `meshllm ctl` commands that `--node ID` sends to another node."""


@main.group()
@click.option(
    "--node",
    metavar="ID",
    default=None,
    help="Send `drop` or `stop` to the mesh node ID (see `meshllm ctl status`) instead of "
    "this one, signed with the mesh owner key that this node's home holds "
    "(`meshllm ctl owner`), e.g. `meshllm ctl --node 3f2a9c01d4e5b6a7 stop`.",
)
@click.pass_context
def ctl(ctx: click.Context, node: str | None) -> None:
    """Talk to a running node through its control socket (only its user can: the socket
    is in the node's home, mode 0700). With --node, act on another node of the mesh as
    the mesh owner."""
    if node is not None:
        import re

        if not re.fullmatch(r"[0-9a-f]{16}", node):
            raise click.BadParameter(
                "a node id is 16 lowercase hex digits", ctx, param_hint="--node"
            )
        if ctx.invoked_subcommand not in REMOTE_COMMANDS:
            raise click.UsageError("--node goes with `drop` and `stop` only", ctx)
    ctx.obj = node


def _owner_order(home: str, node: str, action: str, model: str | None = None) -> str:
    """Sign `action` for `node` with the owner key in `home`; send it through the node
    running there; the target's answer (`ClickException` when refused)."""
    import time

    from meshllm.mesh.owner import (
        OwnerKeyError,
        check_holds_owner,
        load_owner_key,
        new_command,
        sign_command,
    )
    from meshllm.mesh.token import decode_token
    from meshllm.runtime.root import OWNER_ORDER_TIMEOUT_S

    try:
        key = load_owner_key(home_from(home))
        reply = _ask(home, m.GetToken())
        assert isinstance(reply, m.CtlDone)
        token = decode_token(reply.message)
        check_holds_owner(key, token.owner)
    except OwnerKeyError as exc:
        raise click.ClickException(str(exc)) from None
    order = sign_command(key, new_command(token.mesh_id, node, action, model, time.time()))
    reply = _ask(home, m.SendOwnerOrder(order), timeout=OWNER_ORDER_TIMEOUT_S + 5)
    return reply.message if isinstance(reply, m.CtlDone) else str(reply)


def _ask(home: str, msg: m.Message, timeout: float = 5.0) -> m.Message:
    from meshllm.runtime.bus import AskTimeout, ask_address

    node_home = home_from(home)
    try:
        running = (node_home.run_dir / "control.ipc").exists()
    except PermissionError:
        # The home is owner-only (0700): only the node's user controls it.
        raise click.ClickException(
            f"permission denied: the node with home {node_home.root} belongs to another "
            "user, and only that user can control it"
        ) from None
    if not running:
        raise click.ClickException(f"no meshllm node is running with home {node_home.root}")
    try:
        reply = asyncio.run(ask_address(node_home.control_address, msg, timeout))
    except AskTimeout:
        raise click.ClickException(
            f"the node with home {node_home.root} did not answer in {timeout:.0f}s"
        ) from None
    if isinstance(reply, m.ActorError):
        raise click.ClickException(reply.message)
    return reply


@ctl.command()
@HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(home: str, as_json: bool) -> None:
    """Show the node, its model, state and ports."""
    import msgspec

    from meshllm.status import format_status

    reply = _ask(home, m.GetStatus())
    assert isinstance(reply, m.NodeStatus)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(reply)).decode())
    else:
        click.echo(format_status(reply))


@ctl.command()
@HOME_OPTION
@click.argument("model")
@click.pass_obj
def drop(node: str | None, home: str, model: str) -> None:
    """Stop serving MODEL: kill llama-server and exit this node (others are unaffected).
    With `meshllm ctl --node ID drop MODEL`: node ID does so, as the mesh owner asks."""
    if node is not None:
        click.echo(_owner_order(home, node, "drop", model))
        return
    reply = _ask(home, m.DropModel(model))
    click.echo(reply.message if isinstance(reply, m.CtlDone) else reply)


@ctl.command()
@HOME_OPTION
@click.option(
    "--drain",
    "drain_s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds the requests in flight may take to end before llama-server stops anyway.",
)
def pause(home: str, drain_s: float) -> None:
    """Give the machine back: stop serving and let other nodes take the model.

    The node stops being a target at once (every router drops it, and elections
    count it out, so the model goes to other nodes), lets its requests in flight
    end, then stops llama-server. It stays in the mesh; `meshllm ctl resume` serves
    again. Example: meshllm ctl pause --drain 30
    """
    reply = _ask(home, m.PauseServing(True, drain_s, "meshllm ctl pause"))
    click.echo(reply.message if isinstance(reply, m.CtlDone) else reply)


@ctl.command()
@HOME_OPTION
def resume(home: str) -> None:
    """Serve again after `meshllm ctl pause`: start llama-server for the node's model."""
    reply = _ask(home, m.PauseServing(False, reason="meshllm ctl resume"))
    click.echo(reply.message if isinstance(reply, m.CtlDone) else reply)


@ctl.command()
@HOME_OPTION
@click.option(
    "--out",
    metavar="FILE",
    help="Write the token to FILE (mode 0600) instead of printing it, e.g. "
    "--out ~/.meshllm-token; others join with `meshllm up --join @FILE`.",
)
def token(home: str, out: str | None) -> None:
    """Print this node's invite token (others join with `meshllm up --join TOKEN`)."""
    from meshllm.mesh.token import InvalidToken, write_token_file

    reply = _ask(home, m.GetToken())
    assert isinstance(reply, m.CtlDone)
    if out is None:
        click.echo(reply.message)
        return
    try:
        write_token_file(out, reply.message)
    except InvalidToken as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(f"invite token written to {out} (mode 0600)", err=True)


@ctl.command()
@HOME_OPTION
@click.pass_obj
def stop(node: str | None, home: str) -> None:
    """Stop the node (llama-server included). With `meshllm ctl --node ID stop`: stop
    node ID, as the mesh owner."""
    if node is not None:
        click.echo(_owner_order(home, node, "stop"))
        return
    _ask(home, m.Shutdown("meshllm ctl stop"))
    click.echo("stopping")


@ctl.group()
def owner() -> None:
    """The mesh owner key: made by the node that started the mesh, it signs
    `meshllm ctl --node ID drop|stop`. Move it to act from another machine."""


@owner.command("export")
@HOME_OPTION
@click.option(
    "--out",
    metavar="FILE",
    help="Write the key to FILE (mode 0600) instead of printing it, e.g. --out owner.pem; "
    "install it elsewhere with `meshllm ctl owner import owner.pem`.",
)
def owner_export(home: str, out: str | None) -> None:
    """Print the mesh owner key held in this node's home (PEM). Whoever holds it can stop
    any node of the mesh: keep it as secret as the node's own files."""
    from meshllm.mesh.owner import OwnerKeyError, export_owner_key
    from meshllm.mesh.token import InvalidToken, write_token_file

    try:
        pem = export_owner_key(home_from(home))
    except OwnerKeyError as exc:
        raise click.ClickException(str(exc)) from None
    if out is None:
        click.echo(pem)
        return
    try:
        write_token_file(out, pem)
    except InvalidToken as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(f"owner key written to {out} (mode 0600)", err=True)


@owner.command("import")
@HOME_OPTION
@click.argument("file", metavar="FILE")
def owner_import(home: str, file: str) -> None:
    """Install the mesh owner key from FILE (from `meshllm ctl owner export --out FILE`)
    in this node's home (mode 0600), so that `meshllm ctl --node ID ...` works from here.
    Refused when it is not the owner key of the mesh this home belongs to."""
    from meshllm.mesh.owner import OwnerKeyError, import_owner_key

    try:
        click.echo(import_owner_key(home_from(home), file))
    except OwnerKeyError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def models() -> None:
    """Model files."""


@models.command()
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--name", default="meshllm-demo", show_default=True, help="Model name.")
def demo(seed: int, name: str) -> None:
    """Print the path of the built-in demo model, writing it first if needed."""
    from meshllm.models.demo import ensure_demo_model
    from meshllm.runtime.paths import cache_dir

    click.echo(ensure_demo_model(cache_dir() / "models", seed=seed, name=name))


MODELS_DIR_OPTION = click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Models directory (default: $MESHLLM_MODELS_DIR, else ~/.models).",
)


def _mesh_model_counts(home: str) -> dict[str, int]:
    """Models the running node's mesh knows, with how many nodes serve each ({} if none runs)."""
    if not (home_from(home).run_dir / "control.ipc").exists():
        return {}
    try:
        reply = _ask(home, m.GetStatus(), timeout=2.0)
    except click.ClickException:
        return {}
    if not isinstance(reply, m.NodeStatus):
        return {}
    return {route.name: len(route.nodes) for route in reply.routes.models}


@models.command("list")
@MODELS_DIR_OPTION
@HOME_OPTION
@click.option(
    "--min-size-mb",
    type=float,
    default=None,
    help="Smallest GGUF counted as a model, in MB (default: $MESHLLM_MIN_MODEL_BYTES, else 500).",
)
def list_models(models_dir: Path | None, home: str, min_size_mb: float | None) -> None:
    """List the models on disk, in the built-in catalog and in the mesh of a running node."""
    from meshllm.models.files import list_models_table

    min_bytes = None if min_size_mb is None else int(min_size_mb * 1_000_000)
    click.echo(list_models_table(models_dir, _mesh_model_counts(home), min_bytes=min_bytes))


@models.command("download")
@click.argument("name")
@MODELS_DIR_OPTION
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per connect or read.")
@click.option("--retries", default=5, show_default=True, help="Retries after a dropped connection.")
def download_cmd(name: str, models_dir: Path | None, timeout: float, retries: int) -> None:
    """Download NAME (a catalog name, a Hugging Face owner/repo/file.gguf or a URL) into the
    models directory, resuming a partial download; print the file's path."""
    from meshllm.models.download import DownloadError, terminal_progress
    from meshllm.models.files import ModelNotFound, download_model, resolve_model

    try:
        resolved = resolve_model(name, models_dir)
        bar = terminal_progress(resolved.path.name) if resolved.needs_download else None
        try:
            path = download_model(name, models_dir, progress=bar, timeout=timeout, retries=retries)
        finally:
            if bar is not None:
                bar.close()
    except (ModelNotFound, DownloadError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(path)


@main.command()
@click.option(
    "--timeout",
    default=3.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=300),
    metavar="S",
    help="Seconds to listen for advertisements.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was heard as JSON.")
def discover(timeout: float, as_json: bool) -> None:
    """List the meshes nearby that advertise themselves (`meshllm up --discover`) over
    mDNS: mesh id, nodes, addresses, models. Joining one still needs its invite token
    (`meshllm up --join TOKEN`, from a member's `meshllm ctl token`)."""
    import json

    from meshllm.mesh.discovery import format_nearby, nearby_json
    from meshllm.mesh.mdns import MdnsError, browse

    try:
        nearby = browse(timeout)
    except (MdnsError, OSError) as exc:
        raise click.ClickException(f"cannot listen for mDNS: {exc}") from None
    if as_json:
        click.echo(json.dumps(nearby_json(nearby), indent=2))
    else:
        click.echo(format_nearby(nearby))
