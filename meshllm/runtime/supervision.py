"""Restart policy against flapping (sans-I/O: the caller passes the clock).

Like circus's flapping detection: each death is recorded; the delay before the
next start doubles with every death inside `window_s` (from `base_s` up to
`max_s`), and a process that stayed up for `window_s` starts from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    base_s: float = 0.1
    max_s: float = 10.0
    window_s: float = 30.0
    deaths: list[float] = field(default_factory=list)
    restarts: int = 0

    def on_death(self, now: float) -> float:
        """Record a death at `now`; return how long to wait before starting again."""
        self.deaths = [t for t in self.deaths if now - t < self.window_s]
        self.deaths.append(now)
        self.restarts += 1
        # The exponent is bounded: 2 ** n for a long flapping run would overflow a float.
        return min(self.max_s, self.base_s * 2.0 ** min(len(self.deaths) - 1, 64))

    def reset(self) -> None:
        self.deaths.clear()
