"""Balancing, failover and admission over a model's replicas (sans-I/O).

Issue 11, items 1-4. For each request the Proxy asks `Admission` whether it may
go now, asks `Balancer.order` which targets to try and in what order, and tells
the balancer what happened (`started`, then `finished` or `failed`). Nothing here
touches a socket or a clock: `now` is the caller's monotonic time in seconds, and
the caller owns the futures and its one timer (`Admission.next_deadline`).

Everything is bounded: the balancer keeps state only for targets of the current
route table (and those with requests still in flight), admission only for models
with requests in flight or waiting, and a client's strings are hashed, never kept.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import msgspec

from meshllm.runtime.backoff import Backoff

if TYPE_CHECKING:  # the node's config takes this module's defaults; messages take the config
    from meshllm.runtime.messages import RouteTarget

Target = TypeVar("Target", str, "RouteTarget")
"""A node id, or a route table's target."""

STALL_S = 10.0
"""A target with requests in flight from this node and no byte from it for this long is
probed (`Balancer.stalled`): a server that does not answer the probe is hung."""
PROBE_TIMEOUT_S = 3.0
"""How long a stalled target's probe (its server's `/health`) may take."""

FAILOVER_STATUSES = frozenset({502, 503, 504})
"""Upstream statuses that count as a failure before the first byte (`Balancer.failed`):
the server, not the request, is at fault (llama-server answers 503 while it loads
its model), so another replica can answer. Any other status, 500 included, is the
server's answer to this request and passes through to the client."""


def target_id(target: str | RouteTarget) -> str:
    """What a target is counted and hashed by: its node id (and model), the same on every
    node, so that every node sends an affinity key to the same replica."""
    if isinstance(target, str):
        return target
    if target.host:
        # One node's several external backends of a model are several targets.
        return f"{target.node_id}/{target.model}@{target.host}:{target.port}"
    return f"{target.node_id}/{target.model}"


def _local(target: str | RouteTarget) -> bool:
    return not isinstance(target, str) and target.local


@dataclass(frozen=True)
class BalancePolicy:
    attempts: int = 3
    """Targets one request is tried on at most: the first choice, then failovers."""
    cooldown_s: float = 1.0
    """How long a target that failed is avoided; doubled by each failure after a
    cooldown ended, up to `cooldown_max_s`, and back to this after a success."""
    cooldown_max_s: float = 30.0
    affinity_slack: int = 2
    """The preferred replica of an affinity key is passed over once it has more than
    `max(affinity_slack, affinity_slack_ratio * least)` requests in flight beyond the
    least loaded one: a cached prompt is worth a short wait, not a pile-up."""
    affinity_slack_ratio: float = 0.5

    def overloaded(self, in_flight: int, least: int) -> bool:
        return in_flight > least + max(self.affinity_slack, self.affinity_slack_ratio * least)


@dataclass
class _TargetState:
    backoff: Backoff
    in_flight: int = 0
    cool_until: float = -math.inf
    progress_at: float = -math.inf
    """When a byte last came from the target for a request of this node (or its requests
    started, or a probe found it alive)."""
    hung: bool = False


class Balancer:
    """Which of a model's targets to try, in order, for one request.

    Rules, in order:
    - a target in cooldown (it failed before the first byte, see `failed`) is not
      returned at all; with every target cooling the order is empty and the caller
      answers 503 with `retry_after` (no retry storm against dead replicas);
    - the rest are ranked by requests in flight from this node (least first), a local
      target first among equals, then at random (`rng`). This is power-of-d-choices
      with d = all targets: the counts are exact and local, a model has few replicas,
      so sampling two would only lose information;
    - with an affinity key (`affinity_key`), the target with the highest rendezvous
      weight for the key goes first unless it is `BalancePolicy.overloaded`; when a
      target leaves, only the keys it had move;
    - at most `BalancePolicy.attempts` targets are returned.

    One balancer serves every model of the route table: targets are told apart by
    node and model (`target_id`).
    """

    def __init__(self, policy: BalancePolicy | None = None, rng: random.Random | None = None):
        self.policy = policy or BalancePolicy()
        self.rng = rng or random.Random()
        self.states: dict[str, _TargetState] = {}
        self.current: set[str] | None = None
        """Ids in the route table (None: no table given yet, keep every state)."""

    def retain(self, targets: Iterable[str | RouteTarget]) -> None:
        """A new route table: forget targets that left it, once their requests end."""
        self.current = {target_id(t) for t in targets}
        for tid in list(self.states):
            self._forget_if_gone(tid)

    def order(
        self, targets: Sequence[Target], now: float, key: bytes | None = None
    ) -> list[Target]:
        """The targets to try, first choice first (see the class's rules)."""
        healthy = [t for t in targets if not self.cooling(t, now)]
        if not healthy:
            return []
        # sorted() calls the key once per target: one random tie-breaker each.
        ranked = sorted(
            healthy, key=lambda t: (self.in_flight(t), not _local(t), self.rng.random())
        )
        if key is not None:
            preferred = max(healthy, key=lambda t: _weight(key, t))
            if not self.policy.overloaded(self.in_flight(preferred), self.in_flight(ranked[0])):
                ranked.remove(preferred)
                ranked.insert(0, preferred)
        return ranked[: self.policy.attempts]

    def retry_after(self, targets: Iterable[str | RouteTarget], now: float) -> int:
        """Whole seconds until the first of `targets` ends its cooldown (at least 1)."""
        ends = [self.states[target_id(t)].cool_until for t in targets if self.cooling(t, now)]
        return max(1, math.ceil(min(ends) - now)) if ends else 1

    def started(self, target: str | RouteTarget, now: float = -math.inf) -> None:
        """A request went to `target`; end it with one `finished` or one `failed`. The
        first request in flight starts the target's stall clock (`stalled`) at `now`."""
        state = self._state(target)
        if state.in_flight == 0:
            state.progress_at = max(state.progress_at, now)
        state.in_flight += 1

    def progressed(self, target: str | RouteTarget, now: float) -> None:
        """Bytes came from `target` (a response head or a piece of a body)."""
        state = self.states.get(target_id(target))
        if state is not None:
            state.progress_at = now

    def stalled(self, now: float, stall_s: float = STALL_S) -> list[str]:
        """Ids of the targets to probe: requests in flight, and no byte from them for
        `stall_s` (a queue or a long prompt is silent too: the probe tells them apart)."""
        return [
            tid
            for tid, state in self.states.items()
            if state.in_flight and not state.hung and now - state.progress_at > stall_s
        ]

    def hung(self, target: str | RouteTarget, now: float) -> None:
        """A stalled target did not answer its probe: it cools down as a failed one does,
        and stays out (`hung_ids`, probed again by the caller) until `revived`. A target
        that left the route table meanwhile is not remembered."""
        if self.current is not None and target_id(target) not in self.current:
            return
        state = self._state(target)
        state.hung = True
        if state.cool_until <= now:
            state.cool_until = now + state.backoff.failed(now)

    def revived(self, target: str | RouteTarget, now: float) -> None:
        """A probe found `target` answering: chosen again at once, its clock restarted."""
        state = self.states.get(target_id(target))
        if state is None:
            return
        if state.hung:
            state.hung = False
            state.cool_until = -math.inf
        state.progress_at = now

    def hung_ids(self) -> list[str]:
        return [tid for tid, state in self.states.items() if state.hung]

    def finished(self, target: str | RouteTarget, ok: bool = True) -> None:
        """A request to `target` ended. `ok`: the target answered (any status but
        `FAILOVER_STATUSES`), which resets its backoff; not ok (a stream cut midway, the
        client left) says nothing about its health."""
        state = self.states.get(target_id(target))
        if state is None:
            return
        state.in_flight = max(0, state.in_flight - 1)
        if ok:
            state.backoff.reset()
        self._forget_if_gone(target_id(target))

    def failed(self, target: str | RouteTarget, now: float) -> float:
        """A request to `target` failed before any byte reached the client: the
        connection was refused or reset, no response came before the caller's deadline,
        or the status was in `FAILOVER_STATUSES`. Ends the request (as `finished`) and
        puts the target in cooldown; returns the seconds left of it.

        Failures during a cooldown (requests already under way when it began) do not
        lengthen it: only a failure after it ended doubles the next one."""
        tid = target_id(target)
        state = self._state(target)
        state.in_flight = max(0, state.in_flight - 1)
        if state.cool_until <= now:
            state.cool_until = now + state.backoff.failed(now)
        left = state.cool_until - now
        self._forget_if_gone(tid)
        return left

    def in_flight(self, target: str | RouteTarget) -> int:
        state = self.states.get(target_id(target))
        return state.in_flight if state else 0

    def cooling(self, target: str | RouteTarget, now: float) -> bool:
        state = self.states.get(target_id(target))
        return state is not None and (state.cool_until > now or state.hung)

    def _state(self, target: str | RouteTarget) -> _TargetState:
        tid = target_id(target)
        state = self.states.get(tid)
        if state is None:
            p = self.policy
            # A window of ten long cooldowns bounds the failures the backoff remembers.
            backoff = Backoff(p.cooldown_s, p.cooldown_max_s, window_s=10 * p.cooldown_max_s)
            state = self.states[tid] = _TargetState(backoff)
        return state

    def _forget_if_gone(self, tid: str) -> None:
        state = self.states.get(tid)
        gone = self.current is not None and tid not in self.current
        if state is not None and gone and state.in_flight == 0:
            del self.states[tid]


def _weight(key: bytes, target: str | RouteTarget) -> int:
    """The rendezvous (highest random weight) hash of a key on a target."""
    digest = hashlib.blake2b(key + target_id(target).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# --- affinity keys ---------------------------------------------------------------

PREFIX_BYTES = 2048
"""How much of each prompt part an affinity key hashes (of its JSON): enough to tell
conversations apart, little enough to keep the work per request small."""
SPLIT_LIST_BYTES = 256 * 1024
"""A list of messages longer than this is not split into its elements (each would be an
object): its leading bytes stand for its leading messages."""
LEADING_MESSAGES = 8
"""Messages an affinity key looks at, at most: the system ones and the first other."""
_SYSTEM_ROLES = frozenset({"system", "developer"})


_ABSENT = msgspec.Raw()
"""msgspec has no `Raw | None`: a field that is absent (or null) is this empty Raw."""


class AffinityFields(msgspec.Struct):
    """The fields of a request body an affinity key is made from (the rest is skipped)."""

    prompt_cache_key: msgspec.Raw = _ABSENT
    user: msgspec.Raw = _ABSENT
    system: msgspec.Raw = _ABSENT
    """Anthropic's `/v1/messages` system prompt."""
    instructions: msgspec.Raw = _ABSENT
    """The system prompt of `/v1/responses`."""
    messages: msgspec.Raw = _ABSENT
    """The messages' JSON, unparsed (split into messages only when small)."""
    prompt: msgspec.Raw = _ABSENT
    """`/v1/completions`, `/completion`, `/infill`: text, texts or tokens."""
    input: msgspec.Raw = _ABSENT
    """`/v1/responses`: text or a list of messages."""


class _Role(msgspec.Struct):
    role: str | None = None


_fields = msgspec.json.Decoder(AffinityFields)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_role = msgspec.json.Decoder(_Role)


def affinity_key(body: bytes | AffinityFields, prefix_bytes: int = PREFIX_BYTES) -> bytes | None:
    """A 16-byte key that requests likely to share a prompt cache have in common, or None.

    The first present of: `prompt_cache_key`; `user`; the leading prefix of the prompt,
    which is what a conversation keeps as it grows: the system prompt (`system`,
    `instructions`, the leading system messages) and the first other message, or the
    start of a `prompt` or `input` that is text or tokens. Each part counts with at most
    `prefix_bytes` of its JSON; a body that is no JSON object has no key.
    """
    try:
        fields = body if isinstance(body, AffinityFields) else _fields.decode(body)
        for label, value in ((b"k", fields.prompt_cache_key), (b"u", fields.user)):
            if _present(value):
                return _digest(label, [memoryview(value)[:prefix_bytes]])
        parts = [
            memoryview(r)[:prefix_bytes]
            for r in (fields.system, fields.instructions)
            if _present(r)
        ]
        if _is_list_of_objects(fields.messages):
            parts += _leading(fields.messages, prefix_bytes)
        for raw in (fields.prompt, fields.input):
            if _is_list_of_objects(raw):
                parts += _leading(raw, prefix_bytes)
            elif _present(raw):
                parts.append(memoryview(raw)[:prefix_bytes])
        return _digest(b"p", parts) if parts else None
    except (msgspec.DecodeError, RecursionError):
        # Not the shape an affinity key reads (the request is still forwarded as is).
        return None


def _present(raw: msgspec.Raw) -> bool:
    return len(raw) > 0 and memoryview(raw) != b"null"


def _is_list_of_objects(raw: msgspec.Raw) -> bool:
    """Whether `messages`, a `prompt` or an `input` is a list of messages (not text,
    texts or tokens)."""
    start = memoryview(raw)[:64].tobytes().lstrip(b" \t\r\n")
    return start.startswith(b"[") and start[1:].lstrip(b" \t\r\n").startswith(b"{")


def _leading(raw: msgspec.Raw, prefix_bytes: int) -> list[memoryview]:
    """What a conversation keeps as it grows: its system messages and the first other.
    A long list is not split (one object per element would cost far more than the body):
    its leading bytes stand for its leading messages."""
    if len(raw) > SPLIT_LIST_BYTES:
        return [memoryview(raw)[: LEADING_MESSAGES * prefix_bytes]]
    parts = []
    for item in _raw_list.decode(raw)[:LEADING_MESSAGES]:
        parts.append(memoryview(item)[:prefix_bytes])
        try:
            role = _role.decode(item).role
        except msgspec.DecodeError:  # no message object: it counts as the first other
            role = None
        if role not in _SYSTEM_ROLES:
            break
    return parts


def _digest(label: bytes, parts: Sequence[memoryview]) -> bytes:
    h = hashlib.blake2b(label, digest_size=16)
    for part in parts:
        # Length-prefixed, so that moving bytes between parts changes the key.
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


# --- admission --------------------------------------------------------------------

MAX_IN_FLIGHT = 64
"""Requests per model this node lets through at once: 16 replicas' worth of
llama-server's default 4 slots; beyond the slots llama-server only queues them."""
MAX_QUEUED = 256
"""Requests per model waiting for a slot; beyond it 429."""
QUEUE_WAIT_S = 30.0
"""How long a request waits for a slot before 429."""

LOAD_WAIT_S = 60.0
"""How long a request for a model no node serves waits for one to load it (`--load-wait`)."""


@dataclass(frozen=True)
class Admitted:
    """The request may go now; end it with `Admission.release`."""

    ticket: int


@dataclass(frozen=True)
class Queued:
    """The request waits: a later `release` admits it, or `expire` refuses it."""

    ticket: int
    deadline: float
    """When `expire` refuses it, unless admitted before."""


@dataclass(frozen=True)
class Refused:
    """Answer 429 with Retry-After."""

    ticket: int
    retry_after_s: int
    reason: str


Decision = Admitted | Queued | Refused


@dataclass
class _Gate:
    in_flight: int = 0
    waiting: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Ticket -> (queued at, deadline), oldest first (dicts keep insertion order)."""


class Admission:
    """Per model: at most `limit` requests in flight, then at most `queue_limit`
    waiting first in, first out, each for at most `wait_s`; beyond that, refusals.

    Retry-After is how long the oldest waiter has waited (at least 1 s, at most
    `wait_s`): a burst clears fast, a steady overload says so.
    """

    def __init__(
        self,
        limit: int = MAX_IN_FLIGHT,
        queue_limit: int = MAX_QUEUED,
        wait_s: float = QUEUE_WAIT_S,
    ):
        if limit < 1 or queue_limit < 0 or wait_s < 0:
            raise ValueError("admission needs limit >= 1, queue_limit >= 0, wait_s >= 0")
        self.limit = limit
        self.queue_limit = queue_limit
        self.wait_s = wait_s
        self.gates: dict[str, _Gate] = {}
        """Only models with requests in flight or waiting: a route's name, never a client's."""
        self.tickets = 0

    def request(self, model: str, now: float) -> Decision:
        """A request for `model` (the route's name) arrived."""
        self.tickets += 1
        ticket = self.tickets
        gate = self.gates.setdefault(model, _Gate())
        if gate.in_flight < self.limit and not gate.waiting:
            gate.in_flight += 1
            return Admitted(ticket)
        if len(gate.waiting) < self.queue_limit:
            gate.waiting[ticket] = (now, now + self.wait_s)
            return Queued(ticket, now + self.wait_s)
        refused = Refused(ticket, self._retry_after(gate, now), f"too many requests for {model!r}")
        self._drop_if_idle(model)
        return refused

    def release(self, model: str) -> list[Admitted]:
        """An admitted request for `model` ended: returns who is admitted in its place."""
        gate = self.gates.get(model)
        if gate is None:
            return []
        gate.in_flight = max(0, gate.in_flight - 1)
        admitted = []
        while gate.waiting and gate.in_flight < self.limit:
            ticket = next(iter(gate.waiting))
            del gate.waiting[ticket]
            gate.in_flight += 1
            admitted.append(Admitted(ticket))
        self._drop_if_idle(model)
        return admitted

    def cancel(self, model: str, ticket: int) -> None:
        """A waiting request was given up (its client left); admitted ones `release`."""
        gate = self.gates.get(model)
        if gate is not None:
            gate.waiting.pop(ticket, None)
            self._drop_if_idle(model)

    def expire(self, now: float) -> list[Refused]:
        """Refuse every request whose deadline has come (only this refuses a waiter)."""
        refused = []
        for model, gate in list(self.gates.items()):
            while gate.waiting:
                ticket, (since, deadline) = next(iter(gate.waiting.items()))
                if deadline > now:
                    break
                del gate.waiting[ticket]
                wait = max(1, math.ceil(min(now - since, self.wait_s)))
                reason = f"no slot for {model!r} within {self.wait_s:g} s"
                refused.append(Refused(ticket, wait, reason))
            self._drop_if_idle(model)
        return refused

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do (None: nobody waits)."""
        heads = [next(iter(g.waiting.values()))[1] for g in self.gates.values() if g.waiting]
        return min(heads, default=None)

    def in_flight(self, model: str) -> int:
        gate = self.gates.get(model)
        return gate.in_flight if gate else 0

    def queued(self, model: str) -> int:
        gate = self.gates.get(model)
        return len(gate.waiting) if gate else 0

    def _retry_after(self, gate: _Gate, now: float) -> int:
        oldest = next(iter(gate.waiting.values()))[0] if gate.waiting else now
        return max(1, math.ceil(min(now - oldest, self.wait_s)))

    def _drop_if_idle(self, model: str) -> None:
        gate = self.gates.get(model)
        if gate is not None and gate.in_flight == 0 and not gate.waiting:
            del self.gates[model]
