"""GPU energy and power from NVML, or nothing where there is no NVIDIA GPU.

The worker agent reports energy so the gateway can count tokens per joule. We
read NVML's cumulative energy counter (`nvmlDeviceGetTotalEnergyConsumption`,
millijoules since the driver loaded) rather than integrating sampled power: the
counter is what the hardware accumulates, so no sample is ever missed. Where
NVML, the driver or the counter is absent we return None and the agent reports
energy as unknown; a number is never invented.
"""

from __future__ import annotations

import logging
import os

import pynvml

log = logging.getLogger(__name__)


class GpuEnergyReader:
    """Reads one GPU's cumulative energy (J) and present power draw (W)."""

    def __init__(self, handle, name: str):
        self._handle = handle
        self.name = name

    def energy_j(self) -> float:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def power_w(self) -> float:
        return pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0


def _device_handle(index: int | str):
    """A device handle by index, or by UUID ("GPU-…") as CUDA_VISIBLE_DEVICES may name it."""
    pynvml.nvmlInit()  # reference-counted by NVML; cheap to repeat
    if isinstance(index, str) and not index.isdigit():
        return pynvml.nvmlDeviceGetHandleByUUID(index)
    return pynvml.nvmlDeviceGetHandleByIndex(int(index))


def gpu_energy_reader(index: int | str = 0) -> GpuEnergyReader | None:
    """A reader for GPU `index`, or None where NVML, that GPU or its energy counter is absent."""
    try:
        handle = _device_handle(index)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode()
        reader = GpuEnergyReader(handle, name)
        # Pre-Volta GPUs have no energy counter; find out now, not on every heartbeat.
        reader.energy_j()
        reader.power_w()
    except pynvml.NVMLError as exc:
        log.debug("no NVML energy for GPU %s: %s", index, exc)
        return None
    return reader


def compute_processes(index: int | str = 0) -> list[int]:
    """Pids of the compute processes on GPU `index` (empty where NVML or the GPU is absent)."""
    try:
        handle = _device_handle(index)
        return [proc.pid for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
    except pynvml.NVMLError as exc:
        log.debug("cannot list compute processes on GPU %s: %s", index, exc)
        return []


def visible_gpu_index(environ: dict[str, str] | None = None) -> int | str:
    """The GPU this worker's engine will use: the first of CUDA_VISIBLE_DEVICES, else 0."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if not visible:
        return 0
    return int(visible) if visible.isdigit() else visible
