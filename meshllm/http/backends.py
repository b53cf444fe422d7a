"""External backends (sans-I/O): OpenAI-compatible servers a node does not run.

`meshllm up --backend-url URL` (repeatable) joins servers such as another
llama-server, vLLM or Ollama into the mesh. The node runs no llama-server of
its own; its `--model` flags name the models its backends serve. The
`actors.backends.Backends` actor polls each backend (`probe_ok`) and feeds
what it saw to `BackendSet`, which decides, with a little hysteresis, which
backends are up and which models each serves (`served_models`). The Router
makes each up backend a local target of its models, the Gossiper announces
them (`PeerAnnouncement.backend_models`) so other nodes route them here through
the tunnel, and the Tunnel forwards such a request to one of them (`pick`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

from meshllm.mesh.wire import MAX_MODELS
from meshllm.runtime.messages import BackendsState, BackendStatus

POLL_S = 1.0
"""Seconds between two polls of a backend."""
PROBE_TIMEOUT_S = 2.0
"""How long one poll of a backend may take before it counts as failed."""
DOWN_AFTER = 2
"""Failed polls in a row that take an up backend out of the mesh (one slow answer is a
hiccup; a refused connection is not: nothing listens, it is down at once). A down
backend comes back at its first good poll."""
MODELS_BODY_BYTES = 1024 * 1024
"""Largest `/v1/models` answer read from a backend."""

_MODEL_NAME = re.compile(r"^[^\x00-\x1f\x7f/\\.][^\x00-\x1f\x7f/\\]*$")
"""The wire's `ModelName` (meshllm.mesh.wire): what can be announced to the mesh."""
_ROOT_PATHS = ("", "/", "/v1", "/v1/")


class BackendUrlError(ValueError):
    """A `--backend-url` that cannot be used; the message says why."""


@dataclass(frozen=True)
class BackendUrl:
    """Where a backend listens: requests go to `http://host:port/v1/...`."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_backend_url(text: str) -> BackendUrl:
    """`http://host:port`, optionally ending in `/v1` (as an OpenAI SDK base URL does)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise BackendUrlError(f"{text!r} is not a valid URL: {exc}") from None
    if parts.scheme == "https":
        raise BackendUrlError(
            f"{text!r}: https backends are not supported; give the backend's plain http "
            "address (reach a remote one through an SSH tunnel or a node next to it)"
        )
    if parts.scheme != "http":
        raise BackendUrlError(f"{text!r} must start with http:// (e.g. http://127.0.0.1:8080)")
    if not parts.hostname:
        raise BackendUrlError(f"{text!r} names no host (e.g. http://127.0.0.1:8080)")
    if port is None:
        raise BackendUrlError(f"{text!r} names no port (e.g. http://{parts.hostname}:8080)")
    if port == 0:
        raise BackendUrlError(f"{text!r}: port 0 is not a port a backend listens on")
    if parts.username or parts.password:
        raise BackendUrlError(f"{text!r}: credentials in the URL are not supported")
    if parts.path not in _ROOT_PATHS or parts.query or parts.fragment:
        raise BackendUrlError(
            f"{text!r}: only http://host:port (or http://host:port/v1) is supported; "
            "the backend must answer /v1/chat/completions and the rest at its root"
        )
    return BackendUrl(parts.hostname, port)


def check_backend_urls(values: Iterable[str]) -> str | None:
    """What is wrong with `--backend-url` values, or None (the command line's check)."""
    seen: set[BackendUrl] = set()
    for value in values:
        try:
            backend = parse_backend_url(value)
        except BackendUrlError as exc:
            return str(exc)
        if backend in seen:
            return f"{backend.url} is given twice"
        seen.add(backend)
    return None


def check_model_name(name: str) -> str | None:
    """Why `name` cannot name a backend's model in the mesh, or None."""
    if not name or len(name) > 200 or not _MODEL_NAME.match(name):
        return (
            f"{name!r} cannot name a model in the mesh: 1 to 200 characters, no '/', '\\' "
            "or control characters, not starting with '.'"
        )
    return None


# -- one poll ----------------------------------------------------------------------


class _ModelEntry(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]


_models_decoder = msgspec.json.Decoder(_ModelList)


def parse_model_ids(body: bytes) -> tuple[str, ...] | None:
    """The model ids of an OpenAI `/v1/models` answer (None: not one). Ids that cannot
    be announced (`check_model_name`) are left out."""
    try:
        listing = _models_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    ids = dict.fromkeys(e.id for e in listing.data if check_model_name(e.id) is None)
    return tuple(ids)[:MAX_MODELS]


def probe_ok(health_status: int | None, listed: tuple[str, ...] | None) -> bool:
    """Whether one poll found the backend answering: `/health` said 200, or it has no
    such endpoint (any status but 503, which llama-server answers while loading) and
    `/v1/models` answered with a model list."""
    if health_status == 200:
        return True
    return health_status != 503 and listed is not None


def served_models(
    named: Sequence[str], listed: Sequence[tuple[str, ...] | None]
) -> list[tuple[str, ...]]:
    """The models each backend serves, from the `--model` names and what each backend's
    `/v1/models` listed (None: it did not answer one).

    Without names, a backend serves what it lists. With names: a lone backend serves
    every name (servers often list another id, e.g. llama-server its file's path); of
    several, a backend serves the names it lists, or every name when it lists none of
    them (or no list at all)."""
    if not named:
        return [tuple(ids or ()) for ids in listed]
    names = tuple(dict.fromkeys(named))
    if len(listed) == 1:
        return [names]
    out = []
    for ids in listed:
        mine = tuple(n for n in names if ids is not None and n in ids)
        out.append(mine or names)
    return out


# -- the state of every backend ---------------------------------------------------------


@dataclass
class _Health:
    up: bool = False
    failures: int = 0
    listed: tuple[str, ...] | None = None
    reason: str = "not polled yet"


@dataclass
class BackendSet:
    """Every backend of this node: up or down (with hysteresis) and the models it serves.

    Feed each poll to `observed`; `state()` is what the actor publishes."""

    backends: tuple[BackendUrl, ...]
    named: tuple[str, ...] = ()
    """The node's `--model` names."""
    down_after: int = DOWN_AFTER
    health: list[_Health] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.health = [_Health() for _ in self.backends]

    def observed(
        self,
        index: int,
        ok: bool,
        listed: tuple[str, ...] | None,
        reason: str = "",
        refused: bool = False,
    ) -> None:
        """One poll of backend `index`: whether it answered, what `/v1/models` listed,
        and whether its connection was refused (nothing listens there)."""
        h = self.health[index]
        if listed is not None:
            h.listed = listed
        if ok:
            h.up, h.failures, h.reason = True, 0, ""
            return
        h.failures += 1
        h.reason = reason or "not answering"
        if refused or h.failures >= self.down_after:
            h.up = False

    def state(self) -> BackendsState:
        models = served_models(self.named, [h.listed for h in self.health])
        return BackendsState(
            tuple(
                BackendStatus(
                    url=b.url,
                    host=b.host,
                    port=b.port,
                    up=h.up,
                    models=served,
                    reason="" if h.up else h.reason,
                )
                for b, h, served in zip(self.backends, self.health, models, strict=True)
            )
        )


def healthy_models(state: BackendsState) -> tuple[str, ...]:
    """The models some up backend serves (what the node announces), sorted."""
    return tuple(sorted({m for b in state.backends if b.up for m in b.models}))[:MAX_MODELS]


def pick(state: BackendsState, model: str, turn: int) -> BackendStatus | None:
    """An up backend serving `model` (the `turn`-th of them, round robin), or None."""
    serving = [b for b in state.backends if b.up and model in b.models]
    return serving[turn % len(serving)] if serving else None
