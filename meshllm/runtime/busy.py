"""Give the machine back when its owner needs it (`meshllm up --pause-when-busy PERCENT`).

`BusyWatcher` is the decision, sans-I/O: fed one sample at a time (how much of the
machine other processes use, in percent, and the time), it says when to pause and when
to resume, with hysteresis so that nothing flaps: pause after the use stayed over
PERCENT for `busy_for_s`, resume after it stayed under PERCENT minus `margin` for
`calm_for_s`. A pause it did not make (`meshllm ctl pause`) is not its to undo.

The rest is the thin reading of the machine: CPU from /proc/stat less this node's own
processes (/proc/PID/stat of the root and every descendant: actors, llama-server), and
GPU, where pynvml works, from the per-process utilisation NVML reports, less ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("meshllm.busy")

BUSY_FOR_S = 30.0
"""How long other processes must stay over the threshold before the node pauses."""
CALM_FOR_S = 60.0
"""How long they must stay under the threshold less `MARGIN` before it resumes."""
MARGIN = 10.0
"""Percentage points under the threshold that count as calm (the hysteresis band)."""
SAMPLE_S = 2.0
"""Seconds between samples."""

Action = Literal["pause", "resume"]


@dataclass
class BusyWatcher:
    """Decides pause and resume from samples of other processes' use (sans-I/O)."""

    percent: float
    """Pause when other processes use more than this share of the machine (CPU or GPU)."""
    busy_for_s: float = BUSY_FOR_S
    calm_for_s: float = CALM_FOR_S
    margin: float = MARGIN
    paused: bool = False
    """This watcher paused the node (and has not resumed it since)."""
    since: float | None = None
    """When the current run of busy (running) or calm (paused) samples began."""

    def observe(self, use: float, now: float) -> Action | None:
        """One sample: `use`, the busiest of other processes' CPU and GPU use, in percent."""
        if not self.paused:
            if use <= self.percent:
                self.since = None
                return None
            if self.since is None:
                self.since = now
            if now - self.since < self.busy_for_s:
                return None
            self.paused, self.since = True, None
            return "pause"
        if use >= self.percent - self.margin:
            self.since = None
            return None
        if self.since is None:
            self.since = now
        if now - self.since < self.calm_for_s:
            return None
        self.paused, self.since = False, None
        return "resume"

    def reset(self) -> None:
        """The node was resumed by hand (`meshllm ctl resume`): watch afresh."""
        self.paused, self.since = False, None


# -- reading the machine -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU ticks: the whole machine's busy and total, and this node's own."""

    busy: int
    total: int
    own: dict[int, int]
    """pid -> utime + stime of each of this node's processes."""


def machine_ticks(proc_stat: str) -> tuple[int, int]:
    """(busy, total) ticks from /proc/stat's `cpu` line (idle and iowait are not busy)."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:]]
            # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time
            # is already counted in user and nice.
            total = sum(ticks[:8])
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            return total - idle, total
    raise ValueError("no cpu line in /proc/stat")


def process_ticks(pid_stat: str) -> int:
    """utime + stime of one process from /proc/PID/stat (its children count apart)."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = pid_stat[pid_stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def parent_of(pid_stat: str) -> int:
    return int(pid_stat[pid_stat.rindex(")") + 2 :].split()[1])


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every process below it, from a pid -> parent pid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def others_percent(before: CpuSample, after: CpuSample) -> float:
    """Share of the whole machine's CPU (all cores) that other processes used in between."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    # Own ticks are counted per process in 1/CLK_TCK like /proc/stat's, so they compare;
    # per process, so that one that ended in between (llama-server on a pause) takes
    # nothing off (what it used since the last sample is missed, once).
    own = sum(ticks - before.own.get(pid, 0) for pid, ticks in after.own.items())
    others = (after.busy - before.busy) - own
    return max(0.0, min(100.0, 100.0 * others / total))


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def sample_cpu(root_pid: int) -> CpuSample:
    """The machine's ticks now, and those of `root_pid` and its descendants."""
    busy, total = machine_ticks(_read("/proc/stat"))
    stats: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError):
                stats[int(entry)] = _read(f"/proc/{entry}/stat")
    parents = {}
    for pid, text in stats.items():
        with contextlib.suppress(ValueError, IndexError):
            parents[pid] = parent_of(text)
    own = {}
    for pid in descendants(root_pid, parents):
        with contextlib.suppress(KeyError, ValueError, IndexError):
            own[pid] = process_ticks(stats[pid])
    return CpuSample(busy, total, own)


class GpuSampler:
    """Other processes' GPU use through NVML, where pynvml works; None otherwise.

    NVML reports recent per-process SM utilisation (`nvmlDeviceGetProcessUtilization`);
    the busiest device's sum over processes that are not this node's is the sample.
    """

    def __init__(self, nvml: Any = None) -> None:
        """`nvml`: the pynvml module (a fake in tests); by default imported if present."""
        if nvml is None:
            from meshllm.placement.memory import _import_pynvml

            nvml = _import_pynvml()
        self.nvml: Any = nvml
        self.handles: list[Any] = []
        self.seen: dict[int, int] = {}
        if self.nvml is None:
            return
        try:
            self.nvml.nvmlInit()
            count = self.nvml.nvmlDeviceGetCount()
            self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:  # any NVML failure means: no GPU to watch
            log.debug("no GPU to watch: %s", exc)
            self.handles = []

    def others_percent(self, own: set[int]) -> float | None:
        if not self.handles:
            return None
        busiest: float | None = None
        for i, handle in enumerate(self.handles):
            try:
                samples = self.nvml.nvmlDeviceGetProcessUtilization(handle, self.seen.get(i, 0))
            except Exception as exc:  # NVML_ERROR_NOT_FOUND: no samples since the last call
                if "Not Found" not in str(exc):
                    log.debug("GPU %d: no utilisation samples: %s", i, exc)
                busiest = busiest or 0.0
                continue
            if samples:
                self.seen[i] = max(s.timeStamp for s in samples)
            use = gpu_others_percent([(s.pid, s.smUtil) for s in samples], own)
            busiest = use if busiest is None else max(busiest, use)
        return busiest


def gpu_others_percent(samples: list[tuple[int, int]], own: set[int]) -> float:
    """(pid, SM %) samples of one GPU since the last look: each other process's mean,
    summed (a process may have several samples in the window), at most 100."""
    by_pid: dict[int, list[int]] = {}
    for pid, util in samples:
        if pid not in own:
            by_pid.setdefault(pid, []).append(util)
    return min(100.0, sum(sum(u) / len(u) for u in by_pid.values()))
