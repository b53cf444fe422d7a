"""The one backoff policy: restarts, redials and download retries (sans-I/O).

Like circus's flapping detection: each failure is recorded at the time the
caller passes; the delay before the next try doubles with every failure
inside `window_s` (from `base_s` up to `max_s`), and after `window_s` without
a failure (or a `reset()` on success) it starts from `base_s` again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_s: float = 0.1
    max_s: float = 10.0
    window_s: float = math.inf
    """Failures older than this are forgotten (infinite: only `reset()` forgets)."""
    recent: list[float] = field(default_factory=list)
    """Times of the failures inside the window."""
    total: int = 0
    """Failures since this policy was made (a process's restart count)."""

    def failed(self, now: float) -> float:
        """Record a failure at `now`; return how long to wait before the next try."""
        self.recent = [t for t in self.recent if now - t < self.window_s]
        self.recent.append(now)
        self.total += 1
        # The exponent is bounded: 2 ** n for a long flapping run would overflow a float.
        return min(self.max_s, self.base_s * 2.0 ** min(len(self.recent) - 1, 64))

    def reset(self) -> None:
        """The last try succeeded: the next failure waits `base_s` again."""
        self.recent.clear()
