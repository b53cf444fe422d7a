"""The gossip protocol (sans-I/O): membership, anti-entropy, links, dialing, leave, refute.

One `GossipCore` per node. Its driver (`actors/gossiper.py` over QUIC, or
`meshllm.mesh.simulation` on a virtual clock) tells it what happened, always
with the current time, and carries out the actions it returns; `next_timer()`
says when `tick()` is due. The core never touches a socket or a clock.

The protocol (docs/design.md, "Gossip and failure detection"):

- every announcement is signed by the node it describes and checked on
  arrival (`membership.Authenticator`); one that fails, or one with no room
  (`Membership.refusal`: a new member beyond `MAX_PEERS`, over its size or
  the table's), is dropped alone and reported (`Rejected`). A signature
  that does not verify also closes the link: honest relays pass on only
  what they verified, and each failed check costs ~0.3 ms;
- a new link (either side) starts with our `Digest` (node id -> generation),
  answered as in anti-entropy below: `Sync` of what we lack (in chunks under
  the frame cap) and a reply `Digest` when the peer lacks something;
- our own change goes to every link at once as `Sync((me,))` (peers learn
  a change at once, not at the next anti-entropy round); news about third parties, the fresh
  part of a `Sync`, is forwarded once to every other link;
- anti-entropy: every `ANTI_ENTROPY_S` a `Fingerprint` (a hash of our digest)
  goes to one random link. Equal fingerprints end the exchange. A different
  one is answered with our `Digest`; a `Digest` is answered with `Sync` of
  what the sender lacks, plus a reply `Digest` when we lack something, which
  is answered with `Sync` in turn. A link's fingerprints, and its digests, are
  answered at most once per `ANSWER_INTERVAL_S` (a digest that claims to lack
  everything would otherwise buy the whole table in a loop), a reply digest
  only after a digest of ours. An announcement that one of our tombstones
  keeps out is answered with `PeerGone`, so a stale copy is removed on the
  other side instead of being offered forever. A mismatch thus always ends
  with both sides equal;
- a `PeerGone` signed by the node itself (a leave) removes it (it leaves a
  tombstone, `membership`) and is forwarded once, never to the removed node
  itself (we close its link, which would discard it). An unsigned one is
  another member's death verdict, which proves nothing: we check the node
  ourselves, with a probe of our own and `CHECK_HELPERS` indirect probes
  through other links at once, and remove it only when none is answered
  within `check_timeout` (then our verdict goes on to our links). Probing
  both ways at once keeps the mesh's convergence after a death close to
  one detection time, not two. A node told that it is gone refutes with a
  newer generation, at most once per `REFUTE_INTERVAL_S` (later verdicts wait
  for the next refute);
  a peer that sends its own announcement while we hold it dead is told so,
  and refutes in turn;
- membership is transitive: a known peer without a link is dialed, by the
  lower node id at once and by the other after `REDIAL_AFTER_S` (both dial
  only when one of them cannot); at most `MAX_DIALS` dials of members run at
  once, each trying the first `DIAL_ADDRESSES` addresses announced. When both
  dial at once, each side keeps the link dialed by the lower node id; a link
  older than `DUPLICATE_RACE_S` may be dead (the peer's Gossiper restarted)
  and the fresh one replaces it;
- an invite token's addresses are dialed until admitted, and again whenever
  that link ends (a seed node that restarted knows nobody), with
  `meshllm.runtime.backoff.Backoff` between failed tries;
- probes of the failure detector (`meshllm.mesh.health`) travel on the links:
  a probe of a peer we have no link to dials it and follows on the new link
  (a dropped probe would get a live peer declared dead); a `ProbeRequest` is
  relayed as a probe of our own and its ack passed back. Nonces are random,
  and an ack counts only from the link probed or the helper asked to relay
  it, and from helpers only `HELPER_SAVES` times in a row: a member acking
  nonces blindly, or lying as a helper, cannot keep a dead node alive.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import wire
from meshllm.mesh.health import random_nonce
from meshllm.mesh.membership import BAD_SIGNATURE, Authenticator, Membership, sign_leave
from meshllm.runtime.backoff import Backoff

ANTI_ENTROPY_S = 2.0
"""How often a fingerprint goes to one random link; also tombstone and relay expiry."""
DUPLICATE_RACE_S = 3.0
"""Two links to one peer opened within this are a dial race, not a stale link."""
REDIAL_AFTER_S = 2.0
"""How long the higher node id waits for the lower one to dial before dialing itself."""
DIAL_TIMEOUT_S = 3.0
"""Time a dial (QUIC handshake and admission) may take."""
REMEMBERED_DIAL_TIMEOUT_S = 2.0
"""Time a dial of a peer remembered from the previous run may take."""
JOIN_BACKOFF_BASE_S = 0.2
JOIN_BACKOFF_MAX_S = 10.0
JOIN_CHECK_S = 1.0
"""How often a join checks that its link to the token's node still stands."""
RELAY_TTL_S = 10.0
"""How long a relayed probe waits for its ack."""
LEAVE_LINGER_S = 0.05
"""Between the leave notices and closing the links, so the notices go out."""
CHECK_TIMEOUT_S = 1.0
"""How long the check of a peer reported dead waits for an ack (the probe timeout)."""
CHECK_HELPERS = 2
"""Other links asked to probe a peer reported dead, besides our own probe."""
ANSWER_INTERVAL_S = ANTI_ENTROPY_S / 2
"""Least time between two answers to a link's `Fingerprint`s, or to its `Digest`s. An honest
peer sends at most one of each per anti-entropy period (on a new link, then when we differ);
a `Digest` claiming to lack everything otherwise buys a whole table for ~30 bytes."""
REFUTE_INTERVAL_S = 1.0
"""Least time between two refutes: a flood of `PeerGone(us)` costs one re-signed announcement
per interval; the newest generation wins anyway, so one refute answers every verdict before it."""
MAX_DIALS = 8
"""Dials of members at once (invite tokens and remembered peers aside)."""
DIAL_ADDRESSES = 2
"""How many of a member's announced addresses a dial tries (members choose them)."""
FORGED_LINK = "it sent an announcement with a forged signature"
"""Why a link is closed on its first announcement that fails its signature check."""
HELPER_SAVES = 2
"""How many times in a row a peer that does not answer our probes is kept alive by helpers'
acks alone. A helper's ack cannot be checked: a hostile helper could otherwise keep a dead
node in the mesh for good (a peer we truly cannot reach is of no use to us either)."""
MAX_RELAYS = 256
"""Relayed probes waiting for their ack; `ProbeRequest`s beyond are ignored."""


# -- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send `msg` on a link."""

    link: int
    """The driver's id of the link."""
    peer_id: str
    """The node at the other end."""
    msg: wire.WireMessage


@dataclass(frozen=True)
class Dial:
    """Connect to the first of `addresses` that admits us; report with `dial_*`."""

    addresses: tuple[str, ...]
    peer_id: str = ""
    """The node expected there ("" for an invite token or a remembered address)."""
    join: int = -1
    """Index of the invite token this dial is for (-1: none)."""
    timeout: float = DIAL_TIMEOUT_S
    """Give up after this many seconds."""


@dataclass(frozen=True)
class CloseLink:
    """Close a link (a duplicate, or the link of a node that is gone)."""

    link: int
    peer_id: str
    reason: str


@dataclass(frozen=True)
class Publish:
    """The set of peers or an announcement changed: show the mesh view to the node."""


@dataclass(frozen=True)
class Suspect:
    """Something failed talking to a peer (its link ended): probe it now."""

    peer_id: str
    reason: str


@dataclass(frozen=True)
class ProbeAnswered:
    """The ack of one of our probes (`nonce`) arrived."""

    nonce: int


@dataclass(frozen=True)
class PeerRemoved:
    """A peer left or was found dead; its link is closed, the mesh told."""

    node_id: str
    generation: int
    """The generation it was removed at (a tombstone keeps older copies out)."""
    reason: str


@dataclass(frozen=True)
class Refuted:
    """The mesh held this node gone; it announced itself again with a newer generation."""

    reason: str


@dataclass(frozen=True)
class Rejected:
    """An announcement from `peer_id` about `node_id` was refused (forged, or no room)."""

    peer_id: str
    node_id: str
    reason: str


@dataclass(frozen=True)
class UnexpectedFrame:
    """A peer sent a frame that has no place on a gossip link; it was dropped."""

    peer_id: str
    kind: str
    """The frame's message type."""


Action = (
    Send
    | Dial
    | CloseLink
    | Publish
    | Suspect
    | ProbeAnswered
    | PeerRemoved
    | Refuted
    | Rejected
    | UnexpectedFrame
)


@dataclass
class _Link:
    link_id: int
    peer_id: str
    dialed: bool
    """We dialed it (else the peer did)."""
    opened_at: float
    answered_at: dict[str, float] = field(default_factory=dict)
    """Kind of frame ("fingerprint", "digest") -> when we last answered one."""
    awaiting_reply: bool = False
    """We sent a `Digest` on it: one reply `Digest` is answered."""


@dataclass
class _Awaited:
    """A probe of ours: the peer probed, and the links its ack may come from."""

    target: str
    peers: frozenset[str]
    """The peer probed and the helpers asked to relay the probe."""
    expiry: float


@dataclass
class JoinState:
    """One invite token: its addresses are dialed until admitted, and again when that link ends."""

    addresses: tuple[str, ...]
    backoff: Backoff = field(
        default_factory=lambda: Backoff(base_s=JOIN_BACKOFF_BASE_S, max_s=JOIN_BACKOFF_MAX_S)
    )
    next_at: float = 0.0
    """When to dial again, or check that the link still stands."""
    dialing: bool = False
    joined: str | None = None
    """The node the token's address led to last time."""


class GossipCore:
    """One node's side of the gossip protocol."""

    def __init__(
        self,
        me: wire.PeerAnnouncement,
        now: float,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        joins: tuple[tuple[str, ...], ...] = (),
        remembered: tuple[str, ...] = (),
        rng: random.Random | None = None,
        check_timeout: float = CHECK_TIMEOUT_S,
        nonces: Callable[[], int] = random_nonce,
    ) -> None:
        self.key = key
        """Signs our announcement and our leave; None only in tests of the protocol alone,
        where announcements are neither signed nor checked."""
        self.members = Membership(me, key)
        self.auth = Authenticator()
        self.rng = rng or random.Random()
        self.links: dict[str, int] = {}
        """peer id -> the driver's id of our link to it."""
        self._links: dict[int, _Link] = {}
        self.dialing: set[str] = set()
        """Peers being dialed (one dial at a time per peer)."""
        self.unlinked_since: dict[str, float] = {}
        self.relays: dict[int, tuple[str, int, float, str]] = {}
        """our nonce -> (peer that asked, its nonce, expiry, peer probed) of a relayed probe."""
        self.nonces = nonces
        """Nonces of our own probes (random: `random_nonce`; a seeded source in simulation)."""
        self.awaiting: dict[int, _Awaited] = {}
        """nonce of a probe of ours -> who may ack it. An ack from any other link proves
        nothing."""
        self.helper_saves: dict[str, int] = {}
        """peer -> acks of our probes of it in a row that came through helpers (`HELPER_SAVES`)."""
        self.check_timeout = check_timeout
        self.checks: dict[str, tuple[frozenset[int], float]] = {}
        """peer reported dead by another member -> (nonces of our probes of it, deadline)."""
        self.unsent_probes: dict[str, int] = {}
        """peer id -> nonce of a probe that waits for the link being dialed."""
        self.joins = [JoinState(tuple(addresses), next_at=now) for addresses in joins]
        self.remembered = remembered
        self.stopping = False
        self.refute_at = -math.inf
        """When the next refute may go out (`REFUTE_INTERVAL_S`)."""
        self.refute_due: str | None = None
        """The reason of a verdict on us that waits for `refute_at`."""
        # Nodes start at different moments; a random phase keeps their rounds apart.
        self.next_anti_entropy = now + self.rng.uniform(0, ANTI_ENTROPY_S)

    @property
    def node_id(self) -> str:
        return self.members.node_id

    # -- what the driver tells us ------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """The node is up: publish ourselves, dial remembered peers and invite tokens."""
        out: list[Action] = [Publish()]
        for address in self.remembered:
            out.append(Dial((address,), timeout=REMEMBERED_DIAL_TIMEOUT_S))
        out += self.tick(now)
        return out

    def link_opened(
        self, link: int, peer_id: str, dialed: bool, now: float, *, synced: bool = False
    ) -> list[Action]:
        """An admitted link to `peer_id` is up (`synced`: both sides hold the same view)."""
        out: list[Action] = []
        if self.stopping:
            return [CloseLink(link, peer_id, "stopping")]
        if peer_id == self.node_id:
            return [CloseLink(link, peer_id, "a link to this node itself")]
        old_id = self.links.get(peer_id)
        if old_id is not None:
            old = self._links[old_id]
            racing = now - old.opened_at < DUPLICATE_RACE_S
            mine = self.node_id
            keep_new = not racing or (dialed and mine < peer_id) or (not dialed and peer_id < mine)
            if not keep_new:
                return [CloseLink(link, peer_id, "duplicate link")]
            del self._links[old_id]
            out.append(CloseLink(old_id, peer_id, "duplicate link"))
        self.links[peer_id] = link
        self._links[link] = _Link(link, peer_id, dialed, now)
        self.unlinked_since.pop(peer_id, None)
        if not synced:
            self._links[link].awaiting_reply = True
            # Our digest, not our table: the peer answers with what we lack (and its own
            # digest if it lacks something), so a newcomer's links after the first carry
            # ~27 bytes per member instead of a whole signed announcement each.
            out.append(Send(link, peer_id, wire.Digest(self.members.digest())))
        if (nonce := self.unsent_probes.pop(peer_id, None)) is not None:
            out.append(Send(link, peer_id, wire.Probe(nonce)))
        return out

    def _close(self, link: int, peer_id: str, reason: str, now: float) -> CloseLink:
        """Close a link ourselves: frames still on their way from it are ignored."""
        del self._links[link]
        del self.links[peer_id]
        if peer_id in self.members.peers:
            self.unlinked_since[peer_id] = now
        return CloseLink(link, peer_id, reason)

    def link_closed(self, link: int, now: float) -> list[Action]:
        """A link ended (either side closed it, or it timed out)."""
        info = self._links.pop(link, None)
        if info is None:
            return []  # a duplicate we dropped, or one replaced since
        del self.links[info.peer_id]
        if self.stopping:
            return []
        for join in self.joins:
            if join.joined == info.peer_id and not join.dialing:
                join.next_at = min(join.next_at, now + join.backoff.failed(now))
        if info.peer_id not in self.members.peers:
            return []
        self.unlinked_since[info.peer_id] = now
        return [Suspect(info.peer_id, "link")]

    def dial_succeeded(self, dial: Dial, link: int, peer_id: str, now: float) -> list[Action]:
        """`dial` reached `peer_id` and was admitted: the link is up."""
        self.dialing.discard(dial.peer_id)
        if 0 <= dial.join < len(self.joins):
            join = self.joins[dial.join]
            join.dialing, join.joined = False, peer_id
            join.backoff.reset()
            join.next_at = now + JOIN_CHECK_S
        return self.link_opened(link, peer_id, True, now)

    def dial_failed(self, dial: Dial, now: float) -> list[Action]:
        """No address of `dial` admitted us in time."""
        self.dialing.discard(dial.peer_id)
        if 0 <= dial.join < len(self.joins):
            join = self.joins[dial.join]
            join.dialing = False
            join.next_at = now + join.backoff.failed(now)
        return []

    def frame_received(self, link: int, msg: wire.WireMessage, now: float) -> list[Action]:
        """A frame arrived on a link."""
        info = self._links.get(link)
        if info is None or self.stopping:
            return []  # the link was replaced or dropped on our side
        src = info.peer_id
        out: list[Action] = []
        match msg:
            case wire.Sync(announcements=anns):
                self._on_sync(link, src, anns, now, out)
            case wire.Fingerprint(value=value):
                if value != self.members.fingerprint() and self._answer(info, "fingerprint", now):
                    info.awaiting_reply = True
                    out.append(Send(link, src, wire.Digest(self.members.digest())))
            case wire.Digest(generations=gens, reply=reply):
                # A reply answers our own digest (once); a digest of the peer's own, at most
                # one per `ANSWER_INTERVAL_S`: each may cost us the whole table.
                if reply:
                    if not info.awaiting_reply:
                        return out
                    info.awaiting_reply = False
                elif not self._answer(info, "digest", now):
                    return out
                if missing := self.members.newer_than(gens):
                    out += [Send(link, src, sync) for sync in wire.sync_frames(missing)]
                if not reply and self.members.lacks(gens):
                    out.append(Send(link, src, wire.Digest(self.members.digest(), reply=True)))
            case wire.PeerGone() as gone:
                self._on_gone(src, gone, now, out)
            case wire.Probe(nonce=nonce):
                out.append(Send(link, src, wire.ProbeAck(nonce)))
            case wire.ProbeAck(nonce=nonce):
                self._on_ack(src, nonce, out)
            case wire.ProbeRequest(target=target, nonce=nonce):
                if (to := self.links.get(target)) is not None and len(self.relays) < MAX_RELAYS:
                    relay_nonce = self.nonces()
                    self.relays[relay_nonce] = (src, nonce, now + RELAY_TTL_S, target)
                    out.append(Send(to, target, wire.Probe(relay_nonce)))
            case _:
                out.append(UnexpectedFrame(src, type(msg).__name__))
        return out

    def probe(self, peer_id: str, nonce: int, now: float) -> list[Action]:
        """The failure detector probes `peer_id` directly."""
        self._await(nonce, peer_id, peer_id, now)
        if (link := self.links.get(peer_id)) is not None:
            return [Send(link, peer_id, wire.Probe(nonce))]
        ann = self.members.peers.get(peer_id)
        if ann is None:
            return []
        # No link (it ended while we were frozen or cut off): a dropped probe would
        # get a live peer declared dead. Dial it; the probe follows on the new link.
        self.unsent_probes[peer_id] = nonce
        out: list[Action] = []
        self._dial(peer_id, ann.addresses, out)
        return out

    def probe_via(self, via: str, target: str, nonce: int, now: float) -> list[Action]:
        """The failure detector asks `via` to probe `target` for us."""
        if (link := self.links.get(via)) is not None:
            self._await(nonce, target, via, now)
            return [Send(link, via, wire.ProbeRequest(target, nonce))]
        return []

    def _on_ack(self, src: str, nonce: int, out: list[Action]) -> None:
        """An ack counts only from the peer probed (or a helper asked to relay): from any
        other link it would keep a dead node alive on a member's word."""
        relay = self.relays.get(nonce)
        if relay is not None:
            if relay[3] == src:
                del self.relays[nonce]
                self.helper_saves.pop(src, None)
                if (back := self.links.get(relay[0])) is not None:
                    out.append(Send(back, relay[0], wire.ProbeAck(relay[1])))
            return
        awaited = self.awaiting.get(nonce)
        if awaited is None or src not in awaited.peers or not self._believe(awaited.target, src):
            return
        del self.awaiting[nonce]
        if not self._check_answered(nonce):
            out.append(ProbeAnswered(nonce))

    def _await(self, nonce: int, target: str, peer_id: str, now: float) -> None:
        """An ack of `nonce`, our probe of `target`, may come from `peer_id` (until
        `RELAY_TTL_S` from now)."""
        peers = self.awaiting[nonce].peers if nonce in self.awaiting else frozenset[str]()
        self.awaiting[nonce] = _Awaited(target, peers | {peer_id}, now + RELAY_TTL_S)

    def _believe(self, target: str, src: str) -> bool:
        """Whether an ack of our probe of `target`, from `src`, shows that it is alive: always
        from `target` itself; from a helper, `HELPER_SAVES` times in a row at most."""
        if src == target:
            self.helper_saves.pop(target, None)
            return True
        saves = self.helper_saves.get(target, 0) + 1
        if saves > HELPER_SAVES:
            return False
        self.helper_saves[target] = saves
        return True

    def peer_died(self, node_id: str, now: float) -> list[Action]:
        """The failure detector found `node_id` dead: remove it and tell the mesh."""
        out: list[Action] = []
        if (ann := self.members.peers.get(node_id)) is not None:
            self._remove(node_id, ann.generation, "did not answer probes", now, out)
        return out

    def update_self(self, **changes: object) -> list[Action]:
        """Our own announcement changes (e.g. we start serving): tell every link at once."""
        if not self.members.update_self(**changes):
            return []
        out: list[Action] = [Publish()]
        self._forward(wire.Sync((self.members.me,)), out)
        return out

    def leave(self) -> list[Action]:
        """A graceful stop: `PeerGone` for ourselves to every link; close them after a linger."""
        self.stopping = True
        me = self.members.me
        out: list[Action] = []
        gone = wire.PeerGone(me.node_id, me.generation, "left")
        self._forward(gone if self.key is None else sign_leave(gone, self.key), out)
        return out

    def next_timer(self) -> float:
        """When `tick` is next due."""
        due = [j.next_at for j in self.joins if not j.dialing]
        due += [deadline for _, deadline in self.checks.values()]
        if self.refute_due is not None:
            due.append(self.refute_at)
        return min([self.next_anti_entropy, *due])

    def tick(self, now: float) -> list[Action]:
        """Everything due at `now`: an anti-entropy round, redials, join checks."""
        out: list[Action] = []
        if self.stopping:
            return out
        for node_id, (_, deadline) in list(self.checks.items()):
            if now >= deadline:
                del self.checks[node_id]
                if (ann := self.members.peers.get(node_id)) is not None:
                    reason = "reported gone, and did not answer our probes"
                    self._remove(node_id, ann.generation, reason, now, out)
        if self.refute_due is not None and now >= self.refute_at:
            self._refute(self.refute_due, now, out)
        if now >= self.next_anti_entropy:
            self.next_anti_entropy = now + ANTI_ENTROPY_S
            self.members.expire(now)
            self.relays = {k: v for k, v in self.relays.items() if v[2] > now}
            self.awaiting = {k: v for k, v in self.awaiting.items() if v.expiry > now}
            if self.links:
                peer_id = self.rng.choice(list(self.links))
                fingerprint = wire.Fingerprint(self.members.fingerprint())
                out.append(Send(self.links[peer_id], peer_id, fingerprint))
            self._dial_unlinked(now, out)
        for index, join in enumerate(self.joins):
            if join.dialing or now < join.next_at:
                continue
            if join.joined is not None and join.joined in self.links:
                join.next_at = now + JOIN_CHECK_S
            else:
                join.dialing = True
                out.append(Dial(join.addresses, join=index))
        return out

    # -- inside ------------------------------------------------------------------------

    def _on_sync(
        self,
        link: int,
        src: str,
        anns: tuple[wire.PeerAnnouncement, ...],
        now: float,
        out: list[Action],
    ) -> None:
        fresh: list[wire.PeerAnnouncement] = []
        for ann in anns:
            if self.key is not None and (refusal := self.auth.refusal(ann)) is not None:
                out.append(Rejected(src, ann.node_id, refusal))
                if refusal == BAD_SIGNATURE:
                    # Honest relays pass on only what they verified: this link forges, and
                    # each failed check costs ~0.3 ms. The rest of its frame is not read.
                    out.append(self._close(link, src, FORGED_LINK, now))
                    break
                continue
            if (refusal := self.members.refusal(ann)) is not None:
                out.append(Rejected(src, ann.node_id, refusal))
                continue
            stone = self.members.buried(ann, now)
            if stone is not None:
                # We hold it gone: say so, rather than let the sender offer it forever. If
                # it is the sender itself (frozen, cut off: it never got the PeerGone), it
                # refutes with a newer generation.
                reason = "declared dead" if ann.node_id == src else "gone"
                out.append(Send(link, src, wire.PeerGone(ann.node_id, stone, reason)))
            elif self.members.merge(ann, now):
                # A newer copy of ourselves means we were outranked and bumped: pass on
                # the bumped one.
                fresh.append(self.members.me if ann.node_id == self.node_id else ann)
        if fresh:
            for sync in wire.sync_frames(fresh):
                self._forward(sync, out, exclude=src)
            self._changed(now, out)

    def _answer(self, info: _Link, kind: str, now: float) -> bool:
        """True (and noted) if a `kind` frame on this link may be answered now."""
        if now - info.answered_at.get(kind, -math.inf) < ANSWER_INTERVAL_S:
            return False
        info.answered_at[kind] = now
        return True

    def _on_gone(self, src: str, gone: wire.PeerGone, now: float, out: list[Action]) -> None:
        """A leave signed by the node removes it; anything else only makes us check it."""
        node_id = gone.node_id
        if node_id == self.node_id:
            self._remove(node_id, gone.generation, gone.reason, now, out)
            return
        known = self.members.peers.get(node_id)
        if self.key is None or self.auth.is_leave(gone, known):
            self._remove(node_id, gone.generation, gone.reason, now, out, exclude=src, msg=gone)
        elif known is not None and gone.generation >= known.generation:
            self._check(node_id, now, out)

    def _check(self, node_id: str, now: float, out: list[Action]) -> None:
        """Another member holds `node_id` dead: probe it ourselves, directly and through
        others at once; `tick` removes it if no ack came by the deadline."""
        if node_id in self.checks:
            return
        nonces: list[int] = []
        if (link := self.links.get(node_id)) is not None:
            nonces.append(self.nonces())
            self._await(nonces[-1], node_id, node_id, now)
            out.append(Send(link, node_id, wire.Probe(nonces[-1])))
        # The verdict's sender may be among them: a false "alive" from it costs nothing,
        # the failure detector keeps probing.
        helpers = sorted(set(self.links) - {node_id})
        for via in self.rng.sample(helpers, min(CHECK_HELPERS, len(helpers))):
            nonces.append(self.nonces())
            self._await(nonces[-1], node_id, via, now)
            out.append(Send(self.links[via], via, wire.ProbeRequest(node_id, nonces[-1])))
        # With nobody to ask (no link to it, no other peer) the deadline alone decides:
        # the verdict's sender and we both failed to reach it.
        self.checks[node_id] = (frozenset(nonces), now + self.check_timeout)

    def _check_answered(self, nonce: int) -> bool:
        """True if `nonce` was a probe of a check: the peer is alive, the check is over."""
        for node_id, (nonces, _) in self.checks.items():
            if nonce in nonces:
                del self.checks[node_id]
                return True
        return False

    def _remove(
        self,
        node_id: str,
        generation: int,
        reason: str,
        now: float,
        out: list[Action],
        exclude: str = "",
        msg: wire.PeerGone | None = None,
    ) -> None:
        """Remove a node and pass the news on: `msg` (a signed leave) as it came, else
        our own verdict."""
        if node_id == self.node_id:
            if now < self.refute_at:
                self.refute_due = reason  # `tick` refutes at `refute_at`
            else:
                self._refute(reason, now, out)
            return
        self.checks.pop(node_id, None)
        self.unsent_probes.pop(node_id, None)
        self.helper_saves.pop(node_id, None)
        if not self.members.remove(node_id, generation, now):
            return
        out.append(PeerRemoved(node_id, generation, reason))
        self.unlinked_since.pop(node_id, None)
        # Not to the removed node itself: closing its link would discard the notice.
        link = self.links.pop(node_id, None)
        if link is not None:
            del self._links[link]
        notice = msg or wire.PeerGone(node_id, generation, reason[:200])
        self._forward(notice, out, exclude=exclude)
        if link is not None:
            out.append(CloseLink(link, node_id, reason))
        self._changed(now, out)

    def _refute(self, reason: str, now: float, out: list[Action]) -> None:
        """Announce ourselves with a newer generation: it outranks every verdict so far."""
        self.refute_due = None
        self.refute_at = now + REFUTE_INTERVAL_S
        self.members.remove(self.node_id, 0, now)
        out.append(Refuted(reason))
        self._forward(wire.Sync((self.members.me,)), out)

    def _changed(self, now: float, out: list[Action]) -> None:
        out.append(Publish())
        self._dial_unlinked(now, out)

    def _forward(self, msg: wire.WireMessage, out: list[Action], exclude: str = "") -> None:
        for peer_id, link in self.links.items():
            if peer_id != exclude:
                out.append(Send(link, peer_id, msg))

    def _dial(self, peer_id: str, addresses: tuple[str, ...], out: list[Action]) -> None:
        """Dial a member: at most `MAX_DIALS` at once, its first `DIAL_ADDRESSES` addresses
        (members choose them: a hostile one would have us send handshakes anywhere)."""
        if peer_id in self.dialing or not addresses or len(self.dialing) >= MAX_DIALS:
            return
        self.dialing.add(peer_id)
        out.append(Dial(addresses[:DIAL_ADDRESSES], peer_id=peer_id))

    def _dial_unlinked(self, now: float, out: list[Action]) -> None:
        for peer_id, ann in self.members.peers.items():
            if len(self.dialing) >= MAX_DIALS:
                return
            if peer_id in self.links or peer_id in self.dialing or not ann.addresses:
                continue
            since = self.unlinked_since.setdefault(peer_id, now)
            # The lower node id dials; the other waits a little before dialing too.
            if self.node_id < peer_id or now - since > REDIAL_AFTER_S:
                self._dial(peer_id, ann.addresses, out)
