"""GPU telemetry through NVML (``pynvml``, from the nvidia-ml-py package): utilisation, memory,
SM clock and power, sampled by a background thread while a benchmark row runs.

Absent gracefully: without pynvml, without an NVIDIA driver, or on the CPU, ``GpuSampler``
samples nothing and its summary says why. Sampling only reads counters; it never touches the
CUDA context, so it does not disturb what is being measured beyond one thread waking up every
``interval_s``.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLE_INTERVAL_S = 0.05  # NVML's utilisation counter itself averages over 1/6 to 1 s, depending on the GPU


@dataclass
class Samples:
    utilisation_pct: list[float] = field(default_factory=list)
    memory_used_mib: list[float] = field(default_factory=list)
    sm_clock_mhz: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float] | None:
            return {"mean": statistics.fmean(values), "max": max(values)} if values else None

        return {
            "samples": len(self.utilisation_pct),
            "utilisation_pct": stats(self.utilisation_pct),
            "memory_used_mib": stats(self.memory_used_mib),
            "sm_clock_mhz": stats(self.sm_clock_mhz),
            "power_w": stats(self.power_w),
        }


def nvml_handle(device: torch.device) -> tuple[Any, Any] | str:
    """(pynvml module, device handle) for ``device``, or why there is none."""
    if device.type != "cuda":
        return f"device is {device.type}"
    try:
        import pynvml
    except ImportError:
        return "pynvml not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as error:  # pynvml.NVMLError and friends: no driver, no permission
        return f"NVML unavailable ({type(error).__name__}: {error})"
    bus_id = _pci_bus_id(device)
    try:
        if bus_id is not None:
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except Exception:  # an id format this driver does not take: fall back to the index
        pass
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception as error:
        return f"NVML has no handle for {device} ({type(error).__name__}: {error})"


def _pci_bus_id(device: torch.device) -> str | None:
    """The PCI bus id of a CUDA device: NVML numbers devices without CUDA_VISIBLE_DEVICES, so an
    index could name another GPU."""
    props = torch.cuda.get_device_properties(device)
    parts = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if any(part is None for part in parts):
        return None
    return f"{parts[0]:08X}:{parts[1]:02X}:{parts[2]:02X}.0"  # as nvidia-smi prints it


class GpuSampler:
    """``with GpuSampler(device) as sampler: ...``; then ``sampler.summary()``."""

    def __init__(self, device: torch.device, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        found = nvml_handle(device)
        self.unavailable = found if isinstance(found, str) else None
        self._nvml: Any
        self._handle: Any
        self._nvml, self._handle = (None, None) if isinstance(found, str) else found  # None only while unavailable
        self.interval_s = interval_s
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.unavailable is None:
            self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                self._sample()  # one last reading at the end of the row
                return

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        try:
            self.samples.utilisation_pct.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            self.samples.memory_used_mib.append(nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            self.samples.sm_clock_mhz.append(float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)))
            self.samples.power_w.append(nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        except Exception as error:  # a counter this GPU does not expose: stop sampling, say why
            self.unavailable = f"NVML read failed ({type(error).__name__}: {error})"
            self._stop.set()

    def summary(self) -> dict[str, Any]:
        if self.unavailable is not None and not self.samples.utilisation_pct:
            return {"unavailable": self.unavailable}
        return self.samples.summary()


def format_telemetry(summary: dict[str, Any] | None) -> str:
    """One short cell: mean utilisation, max memory, mean SM clock, mean power."""
    if not summary or "unavailable" in summary or not summary.get("samples"):
        return "-"

    def mean(key: str) -> float:
        return summary[key]["mean"]

    return (
        f"{mean('utilisation_pct'):.0f}% {summary['memory_used_mib']['max'] / 1024:.1f}GiB "
        f"{mean('sm_clock_mhz'):.0f}MHz {mean('power_w'):.0f}W"
    )
