"""Route choice (sans-I/O): which node answers a request for a model.

docs/design.md, "The request path": a local model goes to the local
llama-server, a remote one through the tunnel to its host, and an unknown
model falls back to the first available target (unless `--strict-models`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshllm.http.balance import target_id
from meshllm.runtime.messages import LocalServerState, ModelRoute, RouteTable, RouteTarget


@dataclass(frozen=True)
class Serving:
    """A node that serves a model and is ready for requests."""

    model: str
    node_id: str
    port: int
    local: bool = False
    workers: tuple[str, ...] = ()
    """A split host's workers."""
    shares: tuple[float, ...] = ()
    host: str = ""
    """A local external backend's host (empty: 127.0.0.1)."""
    backend: bool = False
    """An external backend (`--backend-url`) serves the model there."""


def build_route_table(
    node_id: str,
    local: LocalServerState,
    remote: Iterable[Serving] = (),
    catalog: Iterable[str] = (),
    notes: Mapping[str, str] | None = None,
    loadable: Iterable[str] = (),
) -> RouteTable:
    """The table the Proxy routes by: warm models (with targets) then cold ones, with
    `notes` saying why a cold one is not served, where known.

    Targets are ordered local first, then by node id, so every node picks the
    same host for a model. A split group's workers and standbys are no targets:
    only its host runs llama-server. A paused local server (`meshllm ctl pause`) is no
    target: it only finishes the requests it has.
    """
    servers: list[Serving] = list(remote)
    split = local.split
    if local.model and local.state == "ready" and local.port and not local.paused:
        if split is None:
            servers.append(Serving(local.model, node_id, local.port, local=True))
        elif split.part == "host":
            servers.append(
                Serving(local.model, node_id, local.port, True, split.workers, split.shares)
            )
    if not local.paused:
        servers += [Serving(x.model, node_id, x.port, local=True) for x in local.ready_extras()]
    by_model: dict[str, list[Serving]] = {}
    for s in servers:
        by_model.setdefault(s.model, []).append(s)
    routes = []
    for model in sorted(by_model):
        group = sorted(by_model[model], key=lambda s: (not s.local, s.node_id, s.host, s.port))
        # One target per id: a peer that announces a model twice (as its server's and
        # its backends', or a name repeated) gets no bigger share for it.
        unique: dict[str, RouteTarget] = {}
        for s in group:
            target = RouteTarget(
                s.node_id, s.local, s.port, s.model, s.workers, s.shares, s.host, s.backend
            )
            unique.setdefault(target_id(target), target)
        targets = tuple(unique.values())
        nodes = tuple(dict.fromkeys(s.node_id for s in group))
        routes.append(ModelRoute(model, targets, nodes))
    cold = sorted(set(catalog) - set(by_model))
    notes = notes or {}
    can_load = set(loadable)
    routes += [
        ModelRoute(name, note=notes.get(name, ""), loadable=name in can_load) for name in cold
    ]
    return RouteTable(tuple(routes))


class Routes:
    """The Proxy's lookup structure, rebuilt whenever a new table arrives."""

    def __init__(self, table: RouteTable, strict: bool = False) -> None:
        self.table = table
        self.strict = strict
        self.by_name = {r.name: r for r in table.models}
        self.first = next((r.targets[0] for r in table.models if r.targets), None)
        self.first_route = next((r for r in table.models if r.targets), None)

    def local_model(self) -> str | None:
        """The first model this node serves itself, if any."""
        return next((r.name for r in self.table.models if any(t.local for t in r.targets)), None)

    def awaits_load(self, model: str) -> bool:
        """Whether a request for `model` may wait for a node to load it: a cold model of
        the mesh that some node which follows demand could load (`ModelRoute.loadable`),
        and whose server did not fail (no note: that is said at once)."""
        route = self.by_name.get(model)
        return route is not None and not route.targets and route.loadable and not route.note

    def unknown(self, model: str | None) -> bool:
        """Strict mode's 404: a named model absent from a table that lists models."""
        return bool(self.strict and model and self.table.models and model not in self.by_name)

    def candidates(self, model: str | None) -> tuple[ModelRoute | None, str]:
        """(route, why) for a request's `model`: the route whose targets may answer it
        (the balancer picks among them), or None and why not. An unknown model falls
        back to the first route with targets, as `choose` does."""
        route = self.by_name.get(model) if model else None
        if route is not None:
            if route.targets:
                return route, ""
            return None, self.choose(model)[1]
        if self.unknown(model) or self.first_route is None:
            return None, self.choose(model)[1]
        return self.first_route, ""

    def choose(self, model: str | None) -> tuple[RouteTarget | None, str]:
        """(target, why) for a request's `model`; why names the failure when target is None."""
        route = self.by_name.get(model) if model else None
        if route is not None:
            if route.targets:
                return route.targets[0], ""
            if route.note:
                return None, f"model {model!r} is known to the mesh but not served: {route.note}"
            return None, f"model {model!r} is known to the mesh but no node serves it yet"
        if self.unknown(model):
            return None, f"model {model!r} does not exist in this mesh"
        if self.first is None:
            return None, "no model is ready yet"
        return self.first, ""
