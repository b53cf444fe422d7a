"""Failure detection (sans-I/O), SWIM-style: direct probes, then indirect ones.

Every `interval` the detector probes the next peer in a shuffled round-robin.
No ack within `timeout` makes the peer *suspect*: up to `indirect` other peers
are asked to probe it for us. No ack through them within another `timeout`
and the peer is declared dead. A suspicion raised from outside (the link
closed, a tunnel stream failed) starts the same procedure at once.

Each node sends about one probe and one ack per interval whatever the mesh
size, so traffic per node stays flat as the mesh grows; detection of a
killed node takes about interval + 2 x timeout after its first missed probe.
Gentler settings for slow links (every 15 s, 5 s timeout) are `--probe-interval 15
--probe-timeout 5`.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_INTERVAL_S = 0.5
"""A node's probe interval unless told otherwise (`--probe-interval`)."""
DEFAULT_TIMEOUT_S = 1.0
"""A node's probe timeout unless told otherwise (`--probe-timeout`)."""
SLOW_INTERVAL_S = 15.0
"""A gentler probe interval for slow or wide-area links."""
SLOW_TIMEOUT_S = 5.0
"""A gentler probe timeout for slow or wide-area links."""


def random_nonce() -> int:
    """A nonce nobody can guess, so an ack proves that the probe reached its peer (a member
    that acked counted-up nonces blindly kept a killed node alive)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class SendProbe:
    node_id: str
    nonce: int


@dataclass(frozen=True)
class SendProbeRequest:
    via: str
    target: str
    nonce: int


@dataclass(frozen=True)
class DeclareDead:
    node_id: str


Action = SendProbe | SendProbeRequest | DeclareDead


@dataclass
class ProbeStats:
    """What the detector did since it started (cumulative), for `/metrics`."""

    sent: int = 0
    """Direct probes."""
    answered: int = 0
    """Acks that cleared a pending probe, directly or through a helper."""
    timed_out: int = 0
    """Direct probes with no ack within the timeout (the peer became suspect)."""
    indirect_sent: int = 0
    """Requests to a helper to probe a suspect for us."""
    declared_dead: int = 0


@dataclass
class _Pending:
    nonce: int
    deadline: float
    indirect: bool = False
    sent: float = 0.0


@dataclass
class FailureDetector:
    interval: float = DEFAULT_INTERVAL_S
    timeout: float = DEFAULT_TIMEOUT_S
    indirect: int = 2
    rng: random.Random = field(default_factory=random.Random)
    members: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)
    next_probe_at: float = 0.0
    nonces: Callable[[], int] = field(default=random_nonce)
    """Where probe nonces come from (random; a seeded source in simulation)."""
    rtt_ms: dict[str, float] = field(default_factory=dict)
    """Round trip to each member, in ms, from its direct acks (smoothed as TCP does,
    1/8 of each new sample): what split planning calls near."""
    stats: ProbeStats = field(default_factory=ProbeStats)

    def set_members(self, members: set[str]) -> None:
        self.members = set(members)
        self.order = [m for m in self.order if m in self.members]
        for gone in set(self.pending) - self.members:
            del self.pending[gone]
        for gone in set(self.rtt_ms) - self.members:
            del self.rtt_ms[gone]

    def _probe(self, node_id: str, now: float) -> SendProbe:
        nonce = self.nonces()
        self.stats.sent += 1
        self.pending[node_id] = _Pending(nonce, now + self.timeout, sent=now)
        return SendProbe(node_id, nonce)

    def suspect(self, node_id: str, now: float) -> list[Action]:
        """Probe `node_id` now (unless a probe is already out)."""
        if node_id not in self.members or node_id in self.pending:
            return []
        return [self._probe(node_id, now)]

    def on_ack(self, nonce: int, now: float | None = None) -> None:
        """An ack for `nonce` came back, directly or through a helper; at `now`, a direct
        one also measures the round trip."""
        for node_id, pending in self.pending.items():
            if pending.nonce == nonce:
                del self.pending[node_id]
                self.stats.answered += 1
                if now is not None and not pending.indirect:
                    sample = max(0.0, now - pending.sent) * 1000.0
                    old = self.rtt_ms.get(node_id)
                    self.rtt_ms[node_id] = sample if old is None else old + (sample - old) / 8
                return

    def tick(self, now: float) -> list[Action]:
        """Everything due at `now`: the next round-robin probe and expired waits."""
        actions: list[Action] = []
        for node_id, pending in list(self.pending.items()):
            if now < pending.deadline:
                continue
            if pending.indirect:
                del self.pending[node_id]
                self.stats.declared_dead += 1
                actions.append(DeclareDead(node_id))
                continue
            self.stats.timed_out += 1
            pending.indirect = True
            pending.deadline = now + self.timeout
            helpers = sorted(self.members - {node_id} - set(self.pending))
            for via in self.rng.sample(helpers, min(self.indirect, len(helpers))):
                self.stats.indirect_sent += 1
                actions.append(SendProbeRequest(via, node_id, pending.nonce))
        if now >= self.next_probe_at:
            self.next_probe_at = now + self.interval
            target = self._next_target()
            if target is not None:
                actions.append(self._probe(target, now))
        return actions

    def _next_target(self) -> str | None:
        if not self.order:
            self.order = sorted(self.members)
            self.rng.shuffle(self.order)
        while self.order:
            candidate = self.order.pop()
            if candidate in self.members and candidate not in self.pending:
                return candidate
        return None

    def next_deadline(self) -> float:
        deadlines = [p.deadline for p in self.pending.values()]
        return min([self.next_probe_at, *deadlines])
