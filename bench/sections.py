"""The registry of benchmark sections, in the order `python -m bench all` runs them.

A new section (issue 3: the remote path through a tunnel, convergence) is a
module in `bench/` exposing `SECTION = Section(name, help, run)` plus one line here.
"""

from __future__ import annotations

from bench import proxy, versions
from bench.common import Section

SECTIONS: dict[str, Section] = {s.name: s for s in (proxy.SECTION, versions.SECTION)}
