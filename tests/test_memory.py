"""Memory detection: NVML through a fake pynvml module, the RAM fallback, `--max-vram`."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshllm.placement import memory
from meshllm.placement.memory import GB, RAM_FRACTION, MemoryInfo, detect_memory, gb_to_bytes

GIB = 1 << 30


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeMem:
    total: int
    free: int
    used: int = 0


@dataclass
class FakeNVML:
    """Stands in for pynvml: devices as (name, total, free); errors where told."""

    devices: list[tuple[str | bytes, int, int]] = field(default_factory=list)
    init_error: bool = False
    count_error: bool = False
    broken_devices: set[int] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        mod.nvmlInit = self.init  # type: ignore[attr-defined]
        mod.nvmlShutdown = self.shutdown  # type: ignore[attr-defined]
        mod.nvmlDeviceGetCount = self.count  # type: ignore[attr-defined]
        mod.nvmlDeviceGetHandleByIndex = self.handle  # type: ignore[attr-defined]
        mod.nvmlDeviceGetMemoryInfo = self.meminfo  # type: ignore[attr-defined]
        mod.nvmlDeviceGetName = self.name  # type: ignore[attr-defined]
        return mod

    def init(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def count(self) -> int:
        if self.count_error:
            raise FakeNVMLError("Unknown Error")
        return len(self.devices)

    def handle(self, index: int) -> int:
        if index in self.broken_devices:
            raise FakeNVMLError("GPU is lost")
        return index

    def meminfo(self, handle: int) -> FakeMem:
        _, total, free = self.devices[handle]
        return FakeMem(total, free, total - free)

    def name(self, handle: int) -> str | bytes:
        return self.devices[handle][0]


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeNVML) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        "MemTotal:       16000000 kB\n"
        "MemFree:         1000000 kB\n"
        "MemAvailable:    8000000 kB\n"
        "Buffers:          100000 kB\n"
        "HugePages_Total:       0\n"
    )
    return path


def ram_budget(kb: int) -> int:
    return int(kb * 1024 * RAM_FRACTION)


def test_one_gpu_is_read_through_nvml(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    fake = FakeNVML([(b"NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB)])
    install(monkeypatch, fake)
    info = detect_memory(meminfo_path=meminfo)
    assert info == MemoryInfo(80 * GIB, 79 * GIB, "nvml", ("NVIDIA H100 80GB HBM3",))
    assert info.budget_bytes == 80 * GIB
    assert fake.calls == ["init", "shutdown"]


def test_two_gpus_are_summed(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    fake = FakeNVML([("RTX 4090", 24 * GIB, 20 * GIB), ("RTX 3090", 24 * GIB, 23 * GIB)])
    install(monkeypatch, fake)
    info = detect_memory(meminfo_path=meminfo)
    assert info.source == "nvml"
    assert info.total_bytes == 48 * GIB
    assert info.free_bytes == 43 * GIB
    assert info.gpus == ("RTX 4090", "RTX 3090")


def test_zero_gpus_fall_back_to_ram(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    fake = FakeNVML([])
    install(monkeypatch, fake)
    info = detect_memory(meminfo_path=meminfo)
    assert info == MemoryInfo(ram_budget(16000000), 8000000 * 1024, "ram", ())
    assert fake.calls == ["init", "shutdown"]


def test_nvml_error_on_init_falls_back_to_ram(
    monkeypatch: pytest.MonkeyPatch, meminfo: Path
) -> None:
    fake = FakeNVML([("GPU", 8 * GIB, 8 * GIB)], init_error=True)
    install(monkeypatch, fake)
    info = detect_memory(meminfo_path=meminfo)
    assert info.source == "ram"
    assert info.total_bytes == ram_budget(16000000)
    assert fake.calls == ["init"]


def test_nvml_error_on_count_falls_back_and_shuts_down(
    monkeypatch: pytest.MonkeyPatch, meminfo: Path
) -> None:
    fake = FakeNVML([("GPU", 8 * GIB, 8 * GIB)], count_error=True)
    install(monkeypatch, fake)
    assert detect_memory(meminfo_path=meminfo).source == "ram"
    assert fake.calls == ["init", "shutdown"]


def test_a_lost_gpu_is_skipped(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    fake = FakeNVML([("A", 8 * GIB, 8 * GIB), ("B", 16 * GIB, 4 * GIB)], broken_devices={0})
    install(monkeypatch, fake)
    info = detect_memory(meminfo_path=meminfo)
    assert (info.source, info.total_bytes, info.free_bytes, info.gpus) == (
        "nvml",
        16 * GIB,
        4 * GIB,
        ("B",),
    )


def test_every_gpu_lost_falls_back_to_ram(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    fake = FakeNVML([("A", 8 * GIB, 8 * GIB)], broken_devices={0})
    install(monkeypatch, fake)
    assert detect_memory(meminfo_path=meminfo).source == "ram"


def test_pynvml_not_installed_falls_back_to_ram(
    monkeypatch: pytest.MonkeyPatch, meminfo: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    info = detect_memory(meminfo_path=meminfo)
    assert info.source == "ram"
    assert info.total_bytes == ram_budget(16000000)


def test_a_pynvml_without_the_functions_falls_back(
    monkeypatch: pytest.MonkeyPatch, meminfo: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))
    assert detect_memory(meminfo_path=meminfo).source == "ram"


def test_ram_fallback_uses_memfree_without_memavailable(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 4000000 kB\nMemFree: 1000000 kB\n")
    info = memory.detect_ram(path)
    assert info == MemoryInfo(ram_budget(4000000), 1000000 * 1024, "ram")


def test_ram_free_is_capped_at_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 4000000 kB\nMemAvailable: 3900000 kB\n")
    info = memory.detect_ram(path, fraction=0.5)
    assert info.total_bytes == 2000000 * 1024
    assert info.free_bytes == info.total_bytes


def test_unreadable_meminfo_gives_a_zero_budget(tmp_path: Path) -> None:
    assert memory.detect_ram(tmp_path / "missing") == MemoryInfo(0, 0, "ram")
    garbage = tmp_path / "garbage"
    garbage.write_text("nothing useful\nMemTotal: lots\n")
    assert memory.detect_ram(garbage) == MemoryInfo(0, 0, "ram")


def test_read_meminfo(meminfo: Path) -> None:
    assert memory.read_meminfo(meminfo) == (16000000 * 1024, 8000000 * 1024)


def test_the_real_machine_does_not_crash() -> None:
    info = detect_memory()
    assert info.source in ("nvml", "ram")
    assert info.total_bytes >= 0
    assert info.free_bytes >= 0


def test_override_replaces_the_gpu_total(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    install(monkeypatch, FakeNVML([("H100", 80 * GIB, 70 * GIB)]))
    info = detect_memory(24, meminfo_path=meminfo)
    assert info == MemoryInfo(24 * GB, 24 * GB, "override", ("H100",))
    big = detect_memory(100, meminfo_path=meminfo)
    assert (big.total_bytes, big.free_bytes) == (100 * GB, 70 * GIB)


def test_override_without_a_gpu(monkeypatch: pytest.MonkeyPatch, meminfo: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    info = detect_memory(0.5, meminfo_path=meminfo)
    assert info == MemoryInfo(GB // 2, GB // 2, "override", ())
    assert detect_memory(0, meminfo_path=meminfo).total_bytes == 0


def test_gb_to_bytes() -> None:
    assert gb_to_bytes(1) == 10**9
    assert gb_to_bytes(1.5) == 1_500_000_000
    assert gb_to_bytes(-3) == 0
