"""GPU energy and power from NVML, or nothing where there is no NVIDIA GPU.

The worker agent reports energy so the gateway can count tokens per joule. We
read NVML's cumulative energy counter (`nvmlDeviceGetTotalEnergyConsumption`,
millijoules since the driver loaded) rather than integrating sampled power: the
counter is what the hardware accumulates, so no sample is ever missed. Where
NVML, the driver or the counter is absent we return None and the agent reports
energy as unknown; a number is never invented.

A worker is one engine, and an engine may span several GPUs (vLLM's tensor and
pipeline parallelism): its energy is the sum over all of them, or its tokens per
joule would be overstated that many times over.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import pynvml

log = logging.getLogger(__name__)


class GpuEnergyReader:
    """Reads an engine's GPUs' cumulative energy (J) and present power draw (W), summed."""

    def __init__(self, handles: list, name: str):
        self._handles = handles
        self.name = name  # the first GPU's: an engine's GPUs are all of one kind

    def energy_j(self) -> float:
        return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1000.0

    def power_w(self) -> float:
        return sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0


def _device_handle(index: int | str):
    """A device handle by index, or by UUID ("GPU-…") as CUDA_VISIBLE_DEVICES may name it."""
    pynvml.nvmlInit()  # reference-counted by NVML; cheap to repeat
    if isinstance(index, str) and not index.isdigit():
        return pynvml.nvmlDeviceGetHandleByUUID(index)
    return pynvml.nvmlDeviceGetHandleByIndex(int(index))


def gpu_energy_reader(gpus: Sequence[int | str]) -> GpuEnergyReader | None:
    """A reader for the GPUs `gpus`, or None where NVML, one of them or its energy
    counter is absent (a sum with a GPU missing would be no fleet's energy)."""
    try:
        handles = [_device_handle(index) for index in gpus]
        name = pynvml.nvmlDeviceGetName(handles[0])
        if isinstance(name, bytes):
            name = name.decode()
        reader = GpuEnergyReader(handles, name)
        # Pre-Volta GPUs have no energy counter; find out now, not on every heartbeat.
        reader.energy_j()
        reader.power_w()
    except pynvml.NVMLError as exc:
        log.debug("no NVML energy for GPUs %s: %s", list(gpus), exc)
        return None
    return reader


def compute_processes(gpus: Sequence[int | str]) -> list[int]:
    """Pids of the compute processes on the GPUs `gpus` (none where NVML or a GPU is absent)."""
    pids: list[int] = []
    for index in gpus:
        try:
            handle = _device_handle(index)
            pids += [proc.pid for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except pynvml.NVMLError as exc:
            log.debug("cannot list compute processes on GPU %s: %s", index, exc)
    return sorted(set(pids))


def parse_gpus(text: str) -> list[int | str]:
    """GPUs as CUDA_VISIBLE_DEVICES and --gpu-index name them: "0,1" or "GPU-…" UUIDs."""
    return [int(g) if g.isdigit() else g for g in (part.strip() for part in text.split(",")) if g]


def visible_gpus(count: int = 1, environ: dict[str, str] | None = None) -> list[int | str]:
    """The `count` GPUs an engine uses (as vLLM picks them): the first of
    CUDA_VISIBLE_DEVICES, else the first of the machine."""
    environ = os.environ if environ is None else environ
    visible = parse_gpus(environ.get("CUDA_VISIBLE_DEVICES", ""))
    return visible[:count] if visible else list(range(count))
