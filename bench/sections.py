"""The registry of benchmark sections, in the order `python -m bench all` runs them.

A new section is a module in `bench/` exposing `SECTION = Section(name, help, run)`
plus one line here.
"""

from __future__ import annotations

from bench import (
    affinity,
    convergence,
    gossip_traffic,
    placement,
    probes,
    proxy,
    remote,
    router,
    split,
    tunnel,
    versions,
)
from bench.common import Section

SECTIONS: dict[str, Section] = {
    s.name: s
    for s in (
        proxy.SECTION,
        remote.SECTION,
        tunnel.SECTION,
        split.SECTION,
        convergence.SECTION,
        probes.SECTION,
        gossip_traffic.SECTION,
        versions.SECTION,
        router.SECTION,
        affinity.SECTION,
        placement.SECTION,
    )
}
