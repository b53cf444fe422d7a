"""How much memory this node can give to a model (docs/design.md, "Placement").

Order of sources:

1. `--max-vram GB` (`override_gb`): what the node plans with and announces,
   whatever the hardware says. GB here is 10**9 bytes (`GB`), the unit model
   files and download catalogs are sized in. The GPUs are still listed.
2. NVIDIA GPUs through pynvml: total and free summed over every device.
3. No usable NVIDIA GPU (pynvml not installed, `NVMLError` on init, zero
   devices, or every device failing): `RAM_FRACTION` of `MemTotal` from
   `/proc/meminfo` (llama.cpp then runs on the CPU; the rest of RAM is left
   to the OS and the mesh's own processes). Free is `MemAvailable`, capped at
   that budget. Without `/proc/meminfo` (macOS) the page count from
   `os.sysconf` is used; when nothing can be read the budget is 0.

Detection never raises: pynvml misbehaving in any way means "no GPU here".
The planning budget is `total_bytes` (`budget_bytes`); `free_bytes` is
informational (our own llama-server is among the things that use memory).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

GB = 10**9
"""Bytes in the GB of `--max-vram`."""

RAM_FRACTION = 0.75
"""Share of system RAM a GPU-less node plans with."""

MEMINFO_PATH = Path("/proc/meminfo")

MemorySource = Literal["nvml", "ram", "override"]


@dataclass(frozen=True)
class MemoryInfo:
    """This node's memory for models."""

    total_bytes: int
    """The budget: what a model (times the planning overhead) must fit in."""
    free_bytes: int
    """Free right now (informational)."""
    source: MemorySource
    """Where `total_bytes` came from."""
    gpus: tuple[str, ...] = ()
    """Names of the NVIDIA GPUs found, one per device (empty without NVML)."""

    @property
    def budget_bytes(self) -> int:
        return self.total_bytes


def gb_to_bytes(gb: float) -> int:
    """`--max-vram` value to bytes (GB = 10**9); negative values count as 0."""
    return max(0, int(gb * GB))


def _import_pynvml() -> Any:
    """The pynvml module, or None. The `pynvml` shim package warns on import; quiet it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return importlib.import_module("pynvml")
        except Exception as exc:  # ImportError, or a broken install raising anything
            log.debug("pynvml unavailable: %s", exc)
            return None


def _name(raw: object) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return str(raw)


def detect_nvml() -> MemoryInfo | None:
    """Sum of memory over NVIDIA GPUs, or None when there is no usable one. Never raises."""
    nvml = _import_pynvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError (no driver / library), or anything else
        log.debug("nvmlInit failed: %s", exc)
        return None
    try:
        total = free = 0
        names: list[str] = []
        count = int(nvml.nvmlDeviceGetCount())
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                dev_total, dev_free = int(mem.total), int(mem.free)
            except Exception as exc:  # a lost or inaccessible GPU: skip it
                log.warning("GPU %d unreadable through NVML: %s", index, exc)
                continue
            try:
                name = _name(nvml.nvmlDeviceGetName(handle))
            except Exception:
                name = f"GPU {index}"
            total += dev_total
            free += dev_free
            names.append(name)
        if not names:
            return None
        return MemoryInfo(total, min(free, total), "nvml", tuple(names))
    except Exception as exc:
        log.warning("NVML query failed: %s", exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def read_meminfo(path: Path = MEMINFO_PATH) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from a meminfo file, or None when unreadable.

    MemAvailable falls back to MemFree (old kernels), then to MemTotal.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        unit = parts[1].lower() if len(parts) > 1 else ""
        fields[key.strip()] = value * 1024 if unit == "kb" else value
    total = fields.get("MemTotal")
    if not total or total <= 0:
        return None
    available = fields.get("MemAvailable", fields.get("MemFree", total))
    return total, max(0, min(available, total))


def _sysconf_ram() -> tuple[int, int] | None:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        available = total
    return (total, available) if total > 0 else None


def detect_ram(path: Path = MEMINFO_PATH, fraction: float = RAM_FRACTION) -> MemoryInfo:
    """`fraction` of system RAM as the budget; free = available RAM capped at it."""
    ram = read_meminfo(path)
    if ram is None and path == MEMINFO_PATH:
        ram = _sysconf_ram()
    if ram is None:
        log.warning("could not read system memory; planning with 0 bytes")
        return MemoryInfo(0, 0, "ram")
    total, available = ram
    budget = int(total * fraction)
    return MemoryInfo(budget, min(available, budget), "ram")


def detect_memory(
    override_gb: float | None = None,
    *,
    meminfo_path: Path = MEMINFO_PATH,
    ram_fraction: float = RAM_FRACTION,
) -> MemoryInfo:
    """This node's memory: `--max-vram` if given, else the GPUs, else a share of RAM."""
    found = detect_nvml() or detect_ram(meminfo_path, ram_fraction)
    if override_gb is None:
        return found
    total = gb_to_bytes(override_gb)
    return replace(
        found, total_bytes=total, free_bytes=min(found.free_bytes, total), source="override"
    )


def format_bytes(n: float) -> str:
    """`1929903264` -> `1.93 GB` (decimal units, like Hugging Face shows sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
