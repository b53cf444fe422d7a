"""Between nodes: membership, gossip, failure detection and the QUIC links.

`gossip` is the sans-I/O protocol core (membership merge, anti-entropy, which
link to keep, dialing, leave and refute) that both `actors/gossiper.py` and
`simulation` drive; `membership` and `health` are the state and the failure
detector under it. `wire` defines the framed messages, `quic` the admitted
QUIC endpoint and every adaptation of aioquic, `token` the invite token and
`identity` the node key. See docs/design.md, "Gossip and failure detection".
"""
