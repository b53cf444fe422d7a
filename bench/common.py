"""Shared pieces of the benchmark sections: statistics, machine info, CPU time, output."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Context:
    """What every section gets from the command line."""

    quick: bool
    results_dir: Path
    plot: bool = True
    profile: bool = False
    # llama-server settings for the nodes a section starts (0: llama-server's default).
    llama_threads: int = 1
    llama_threads_http: int = 96
    # The source tree the nodes run from (None: this repository).
    node_repo: Path | None = None
    # The other source tree of the `versions` section.
    base_repo: Path | None = None

    def node_args(self) -> list[str]:
        """Extra `meshllm up` arguments every benchmarked node gets."""
        args: list[str] = []
        if self.llama_threads > 0:
            args += ["--llama-arg=--threads", f"--llama-arg={self.llama_threads}"]
        if self.llama_threads_http > 0:
            args += ["--llama-arg=--threads-http", f"--llama-arg={self.llama_threads_http}"]
        return args

    def llama_settings(self) -> dict[str, int | str]:
        def show(n: int) -> int | str:
            return n if n > 0 else "default"

        return {"threads": show(self.llama_threads), "threads_http": show(self.llama_threads_http)}


@dataclass(frozen=True)
class Section:
    """One part of the benchmark: `python -m bench NAME` runs it, `all` runs every one.

    `run` starts whatever nodes it needs (and always stops them), writes its
    JSON (and PNG) under `ctx.results_dir`, and returns the table to print.
    """

    name: str
    help: str
    run: Callable[[Context], str]
    in_all: bool = True


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=REPO,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _llama_server_version() -> str | None:
    try:
        from meshllm.runtime.binaries import find_binary

        path = find_binary("llama-server")
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    return lines[0].split(":", 1)[1].strip() if lines else None


def machine_info() -> dict[str, Any]:
    import meshllm

    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_bytes": mem_total,
        "python": sys.version.split()[0],
        "meshllm": meshllm.__version__,
        "git_commit": _git_commit(),
        "llama_server": _llama_server_version(),
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")
    tmp.replace(path)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-flavoured markdown table, which also reads well in a terminal."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None (and a word) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def machine_note(r: dict[str, Any]) -> str:
    """The closing line of a table: the machine, its load, the run's kind and time."""
    return (
        f"{r['machine']['cpus']} CPUs ({r['machine']['cpu']}), load {r['loadavg_before']}, "
        + (
            f"llama-server --threads {r['llama_server_settings']['threads']} "
            f"--threads-http {r['llama_server_settings']['threads_http']}, "
            if "llama_server_settings" in r
            else ""
        )
        + f"{'quick run, ' if r['quick'] else ''}{r['started']}"
    )


def publish(
    ctx: Context,
    name: str,
    result: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> str:
    """Render a section's table into its result, write `name`.json (and .png); the table."""
    text = render(result)
    result["table"] = text
    write_json(ctx.results_dir / f"{name}.json", result)
    if ctx.plot:
        plot(result, ctx.results_dir / f"{name}.png")
    return text


class RunRecord:
    """When and where a section ran: started at construction, closed by `header()`."""

    def __init__(self, section: str, quick: bool) -> None:
        self.section = section
        self.quick = quick
        self.started = now_iso()
        self.t0 = time.monotonic()
        self.load_before = loadavg()
        self.machine = machine_info()

    def header(self) -> dict[str, Any]:
        """The fields every section's JSON starts with."""
        return {
            "section": self.section,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "started": self.started,
            "finished": now_iso(),
            "duration_s": round(time.monotonic() - self.t0, 1),
            "quick": self.quick,
            "machine": self.machine,
            "loadavg_before": self.load_before,
            "loadavg_after": loadavg(),
        }
