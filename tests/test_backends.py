"""External backends (meshllm.http.backends), in-process: URLs, polls, models, routes.

The real processes (a plain llama-server joined into a mesh) are in
tests/test_backends_mesh.py.
"""

from __future__ import annotations

import pytest

from actors.router import backend_servers
from meshllm.http.backends import (
    DOWN_AFTER,
    BackendSet,
    BackendUrl,
    BackendUrlError,
    check_backend_urls,
    check_model_name,
    healthy_models,
    parse_backend_url,
    parse_model_ids,
    pick,
    probe_ok,
    served_models,
)
from meshllm.http.balance import Balancer, target_id
from meshllm.http.routing import build_route_table
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.runtime.messages import (
    BackendsState,
    BackendStatus,
    LocalServerState,
    MeshView,
    NodeStatus,
    RouteTable,
)
from meshllm.status import format_status, split_text

A = BackendUrl("127.0.0.1", 8080)
B = BackendUrl("10.0.0.2", 8000)


# -- URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:8080", A),
        ("http://127.0.0.1:8080/", A),
        ("http://127.0.0.1:8080/v1", A),
        ("http://127.0.0.1:8080/v1/", A),
        (" http://10.0.0.2:8000 ", B),
        ("http://[::1]:11434", BackendUrl("::1", 11434)),
        ("http://gpu-box.lan:11434", BackendUrl("gpu-box.lan", 11434)),
    ],
)
def test_backend_url_takes_host_port_and_an_optional_v1(text: str, expected: BackendUrl) -> None:
    assert parse_backend_url(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("https://127.0.0.1:8443", "https backends are not supported"),
        ("ftp://127.0.0.1:21", "must start with http://"),
        ("127.0.0.1:8080", "must start with http://"),
        ("http://127.0.0.1", "names no port"),
        ("http://:8080", "names no host"),
        ("http://127.0.0.1:0", "port 0"),
        ("http://127.0.0.1:99999", "not a valid URL"),
        ("http://127.0.0.1:80a", "not a valid URL"),
        ("http://u:p@127.0.0.1:8080", "credentials"),
        ("http://127.0.0.1:8080/openai/v1", "only http://host:port"),
        ("http://127.0.0.1:8080/?x=1", "only http://host:port"),
    ],
)
def test_bad_backend_url_says_why(text: str, says: str) -> None:
    with pytest.raises(BackendUrlError, match=says):
        parse_backend_url(text)
    problem = check_backend_urls([text])
    assert problem is not None and says in problem


def test_the_same_backend_twice_is_refused() -> None:
    problem = check_backend_urls(["http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"])
    assert problem == "http://127.0.0.1:8080 is given twice"
    assert check_backend_urls(["http://127.0.0.1:8080", "http://127.0.0.1:8081"]) is None


def test_url_of_an_ipv6_backend_has_brackets() -> None:
    assert BackendUrl("::1", 8080).url == "http://[::1]:8080"


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a\\b", "tab\there", "x" * 201])
def test_model_names_the_mesh_cannot_carry_are_refused(name: str) -> None:
    assert check_model_name(name) is not None


def test_ordinary_model_names_pass() -> None:
    for name in ("llama3:8b", "Qwen2.5-7B-Instruct", "meshllm-demo"):
        assert check_model_name(name) is None


# -- one poll -------------------------------------------------------------------------


def test_model_ids_of_an_openai_model_list() -> None:
    body = b'{"object":"list","data":[{"id":"a"},{"id":"b","owned_by":"x"},{"id":"a"}]}'
    assert parse_model_ids(body) == ("a", "b")


def test_model_ids_that_cannot_be_announced_are_left_out() -> None:
    body = b'{"data":[{"id":"/models/x.gguf"},{"id":"org/model"},{"id":"ok"}]}'
    assert parse_model_ids(body) == ("ok",)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"data": 3}', b"[]", b"[" * 100000])
def test_no_model_list(body: bytes) -> None:
    assert parse_model_ids(body) is None


def test_probe_ok() -> None:
    assert probe_ok(200, None)  # /health says so
    assert probe_ok(404, ("m",))  # no /health (Ollama), but a model list
    assert not probe_ok(404, None)
    assert not probe_ok(503, ("m",))  # llama-server loading
    assert not probe_ok(None, None)  # no answer


# -- which backend serves which model ----------------------------------------------------


def test_without_names_a_backend_serves_what_it_lists() -> None:
    assert served_models((), [("a", "b"), None]) == [("a", "b"), ()]


def test_a_lone_backend_serves_every_name() -> None:
    assert served_models(("x", "y"), [("other",)]) == [("x", "y")]
    assert served_models(("x",), [None]) == [("x",)]


def test_of_several_backends_each_serves_the_names_it_lists() -> None:
    listed = [("x", "z"), ("y",), None, ("unrelated",)]
    assert served_models(("x", "y"), listed) == [("x",), ("y",), ("x", "y"), ("x", "y")]


# -- up and down -------------------------------------------------------------------------


def test_a_backend_is_down_until_its_first_good_poll() -> None:
    backends = BackendSet((A,), ("m",))
    (status,) = backends.state().backends
    assert not status.up and status.reason == "not polled yet"
    assert status.models == ("m",)
    backends.observed(0, True, ("whatever",))
    (status,) = backends.state().backends
    assert status.up and status.models == ("m",) and status.url == "http://127.0.0.1:8080"


def test_an_up_backend_goes_down_after_failed_polls_in_a_row_and_comes_back() -> None:
    backends = BackendSet((A,))
    backends.observed(0, True, ("m",))
    for _ in range(DOWN_AFTER - 1):
        backends.observed(0, False, None, "refused")
        assert backends.state().backends[0].up  # one hiccup is not a death
    backends.observed(0, True, None)
    for _ in range(DOWN_AFTER - 1):
        backends.observed(0, False, None, "refused")
    assert backends.state().backends[0].up  # the count starts again after a good poll
    backends.observed(0, False, None, "refused")
    (status,) = backends.state().backends
    assert not status.up and status.reason == "refused"
    assert status.models == ("m",)  # the last list is kept: it is served again at once
    backends.observed(0, True, None)
    assert backends.state().backends[0].up


def test_a_refused_connection_takes_a_backend_down_at_once() -> None:
    backends = BackendSet((A,))
    backends.observed(0, True, ("m",))
    backends.observed(0, False, None, "connection refused", refused=True)
    (status,) = backends.state().backends
    assert not status.up and status.reason == "connection refused"


def test_healthy_models_and_pick() -> None:
    state = BackendsState(
        (
            BackendStatus("http://a:1", "a", 1, up=True, models=("x", "y")),
            BackendStatus("http://b:2", "b", 2, up=False, models=("z",), reason="down"),
            BackendStatus("http://c:3", "c", 3, up=True, models=("x",)),
        )
    )
    assert healthy_models(state) == ("x", "y")
    assert [pick(state, "x", turn).host for turn in range(4)] == ["a", "c", "a", "c"]  # type: ignore[union-attr]
    assert pick(state, "z", 0) is None
    assert pick(state, "nothing", 0) is None


# -- routes ------------------------------------------------------------------------------


def test_own_backends_are_local_targets_and_peers_backends_remote_ones() -> None:
    me = "0123456789abcdef"
    peer = PeerAnnouncement(
        node_id="fedcba9876543210", generation=1, http_port=9400, backend_models=("x",)
    )
    state = BackendsState(
        (
            BackendStatus("http://10.0.0.2:8000", "10.0.0.2", 8000, up=True, models=("x",)),
            BackendStatus("http://10.0.0.3:8000", "10.0.0.3", 8000, up=True, models=("x",)),
            BackendStatus("http://10.0.0.4:8000", "10.0.0.4", 8000, up=False, models=("x",)),
        )
    )
    servers = backend_servers(me, MeshView(me, (peer,)), state)
    table = build_route_table(me, LocalServerState(), servers, catalog=("x",))
    (route,) = table.models
    assert [(t.node_id, t.local, t.host, t.port, t.backend) for t in route.targets] == [
        (me, True, "10.0.0.2", 8000, True),
        (me, True, "10.0.0.3", 8000, True),
        ("fedcba9876543210", False, "", 9400, True),
    ]
    assert route.nodes == (me, "fedcba9876543210")
    # Two backends of one node are two targets to the balancer.
    assert len({target_id(t) for t in route.targets}) == 3
    balancer = Balancer()
    balancer.started(route.targets[0])
    assert balancer.in_flight(route.targets[1]) == 0
    assert split_text(route) == [
        f"{me} (backend 10.0.0.2:8000)",
        f"{me} (backend 10.0.0.3:8000)",
        "fedcba9876543210 (backend)",
    ]


def test_a_down_backend_leaves_its_model_cold() -> None:
    me = "0123456789abcdef"
    down = BackendsState((BackendStatus("http://a:1", "a", 1, up=False, models=("x",)),))
    servers = backend_servers(me, MeshView(me), down)
    table = build_route_table(me, LocalServerState(), servers, catalog=("x",))
    (route,) = table.models
    assert route.name == "x" and route.targets == ()


def test_ctl_status_shows_each_backend_and_the_peers_backend_models() -> None:
    peer = PeerAnnouncement(
        node_id="fedcba9876543210", generation=1, http_port=9400, backend_models=("x", "y")
    )
    status = NodeStatus(
        node_id="0123456789abcdef",
        role="idle",
        home="/h",
        http="127.0.0.1:9337",
        server=LocalServerState(),
        routes=RouteTable(),
        peers=(peer,),
        backends=(
            BackendStatus("http://10.0.0.2:8000", "10.0.0.2", 8000, up=True, models=("x",)),
            BackendStatus("http://10.0.0.3:8000", "10.0.0.3", 8000, reason="refused\x1b[2J"),
        ),
    )
    lines = format_status(status).splitlines()
    assert any(line.split() == ["http://10.0.0.2:8000", "up", "x"] for line in lines)
    down = next(line for line in lines if line.startswith("http://10.0.0.3:8000"))
    assert "down: refused?[2J" in down  # what a backend says is made printable
    assert any("x (backend), y (backend)" in line for line in lines)
