"""The `meshllm` command line. Each command only forwards to the programmatic API."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from meshllm import __version__
from meshllm.runtime import messages as m
from meshllm.runtime.paths import DEFAULT_HOME, home_from

HOME_OPTION = click.option(
    "--home",
    envvar="MESHLLM_HOME",
    default=str(DEFAULT_HOME),
    show_default=True,
    help="Directory for the node's key, config, logs and run directory.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="meshllm")
def main() -> None:
    """meshllm pools a group's machines into one OpenAI-compatible LLM service.

    Start a node with `meshllm up`; with no options it serves a tiny demo model
    on http://127.0.0.1:9337/v1. Manage a running node with `meshllm ctl`.
    """


@main.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="MODEL",
    help="GGUF path, file name in the models directory, catalog name, Hugging Face "
    "owner/repo/file.gguf or URL (downloaded when not on disk). Repeat to seed the mesh "
    "catalog: the first is served here. Default (no --join): the built-in demo model.",
)
@click.option("--join", multiple=True, metavar="TOKEN", help="Join the mesh of an invite token.")
@click.option("--client", is_flag=True, help="Lite client: serve no model, route to the mesh.")
@HOME_OPTION
@click.option("--port", default=9337, show_default=True, help="Port of the OpenAI API.")
@click.option(
    "--listen", default="127.0.0.1", show_default=True, help="Address the OpenAI API binds to."
)
@click.option(
    "--console",
    default=0,
    show_default=True,
    metavar="PORT",
    help="Serve the web console on 127.0.0.1:PORT (suggested: 3131); 0 turns it off.",
)
@click.option(
    "--strict-models",
    is_flag=True,
    help="Answer 404 for an unknown model instead of falling back to the first available one.",
)
@click.option(
    "--max-body-mb", default=16.0, show_default=True, help="Largest request body accepted (MiB)."
)
@click.option("--llama-server", metavar="PATH", help="llama-server binary to run.")
@click.option(
    "--llama-arg",
    "llama_args",
    multiple=True,
    metavar="ARG",
    help="Extra argument for llama-server (repeat, e.g. --llama-arg=-c --llama-arg=4096).",
)
@click.option(
    "--load-timeout", default=600.0, show_default=True, help="Seconds a model may take to load."
)
@click.option(
    "--bind",
    default="0.0.0.0:0",
    show_default=True,
    metavar="HOST:PORT",
    help="UDP address of the mesh (QUIC) endpoint; port 0 picks a free one.",
)
@click.option("--advertise", metavar="HOST", help="Host other nodes dial (default: from --bind).")
@click.option(
    "--max-vram",
    type=float,
    default=None,
    metavar="GB",
    help="Memory for models, in GB, used for planning and announced to the mesh "
    "(default: total VRAM of NVIDIA GPUs, else 75% of RAM).",
)
@click.option(
    "--probe-interval",
    default=0.5,
    show_default=True,
    help="Seconds between health probes (the seed's value is 15).",
)
@click.option(
    "--probe-timeout",
    default=1.0,
    show_default=True,
    help="Seconds a probe may take before the peer is suspected (the seed's value is 5).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging level of the node and its actors.",
)
def up(
    models: tuple[str, ...],
    join: tuple[str, ...],
    client: bool,
    home: str,
    port: int,
    listen: str,
    console: int,
    strict_models: bool,
    max_body_mb: float,
    llama_server: str | None,
    llama_args: tuple[str, ...],
    load_timeout: float,
    bind: str,
    advertise: str | None,
    max_vram: float | None,
    probe_interval: float,
    probe_timeout: float,
    log_level: str,
) -> None:
    """Start a node and run it in the foreground until Ctrl-C or `meshllm ctl stop`."""
    from meshllm.runtime.binaries import BinaryNotFound
    from meshllm.up import UpError, UpOptions, run

    if not 0 <= port <= 65535:
        raise click.BadParameter("must be between 0 and 65535", param_hint="--port")
    if not 0 <= console <= 65535:
        raise click.BadParameter("must be between 0 and 65535", param_hint="--console")
    if max_body_mb <= 0:
        raise click.BadParameter("must be positive", param_hint="--max-body-mb")
    if max_vram is not None and max_vram < 0:
        raise click.BadParameter("must not be negative", param_hint="--max-vram")
    if probe_interval <= 0 or probe_timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--probe-interval/--probe-timeout")
    opts = UpOptions(
        models=list(models),
        join=list(join),
        client=client,
        home=home,
        listen=listen,
        port=port,
        strict_models=strict_models,
        console_port=console,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        llama_server=llama_server,
        llama_args=list(llama_args),
        load_timeout_s=load_timeout,
        bind=bind,
        advertise=advertise,
        max_vram_gb=max_vram,
        probe_interval_s=probe_interval,
        probe_timeout_s=probe_timeout,
        log_level=log_level.upper(),
    )
    try:
        sys.exit(run(opts))
    except (UpError, BinaryNotFound) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def ctl() -> None:
    """Talk to a running node through its control socket."""


def _ask(home: str, msg: m.Message, timeout: float = 5.0) -> m.Message:
    from meshllm.runtime.bus import AskTimeout, ask_address

    node_home = home_from(home)
    if not (node_home.run_dir / "control.ipc").exists():
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
def drop(home: str, model: str) -> None:
    """Stop serving MODEL: kill llama-server and exit this node (others are unaffected)."""
    reply = _ask(home, m.DropModel(model))
    click.echo(reply.message if isinstance(reply, m.CtlDone) else reply)


@ctl.command()
@HOME_OPTION
def token(home: str) -> None:
    """Print this node's invite token (others join with `meshllm up --join TOKEN`)."""
    reply = _ask(home, m.GetToken())
    assert isinstance(reply, m.CtlDone)
    click.echo(reply.message)


@ctl.command()
@HOME_OPTION
def stop(home: str) -> None:
    """Stop the node (llama-server included)."""
    _ask(home, m.Shutdown("meshllm ctl stop"))
    click.echo("stopping")


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
