"""GPU energy via NVML.

No NVIDIA GPU is present where these tests run, so the GPU itself is faked at
the one boundary that needs hardware: the `pynvml` functions. Everything above
it (unit conversion, device selection, "unknown" when there is no counter) is
the real code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from workers import nvml


class FakeGpus:
    """Answers pynvml calls the way a driver with these GPUs would."""

    def __init__(self, gpus: list[dict]):
        self.gpus = gpus

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", self.by_index)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", self.by_uuid)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: h["name"])
        monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lambda h: self.counter(h, "energy_mj"))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: self.counter(h, "power_mw"))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses",
                            lambda h: [SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in h["pids"]])

    def by_index(self, index: int):
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def by_uuid(self, uuid: str):
        for gpu in self.gpus:
            if gpu["uuid"] == uuid:
                return gpu
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    @staticmethod
    def counter(handle: dict, name: str) -> int:
        if handle.get(name) is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return handle[name]


def h100(**overrides) -> dict:
    gpu = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa", "energy_mj": 123_456_789, "power_mw": 412_345, "pids": []}
    gpu.update(overrides)
    return gpu


def test_without_an_nvidia_driver_energy_is_unknown():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    assert nvml.gpu_energy_reader([0]) is None
    assert nvml.compute_processes([0]) == []


def test_reader_reports_joules_and_watts(monkeypatch):
    gpus = [h100(), h100(uuid="GPU-bbbb", energy_mj=5_000, power_mw=70_000)]
    FakeGpus(gpus).install(monkeypatch)

    reader = nvml.gpu_energy_reader([1])
    assert reader is not None
    assert reader.name == "NVIDIA H100 80GB HBM3"
    assert reader.energy_j() == pytest.approx(5.0)
    assert reader.power_w() == pytest.approx(70.0)

    # The counter is read anew each time: energy only grows while the GPU works.
    gpus[1]["energy_mj"] += 2_500
    assert reader.energy_j() == pytest.approx(7.5)


def test_an_engine_on_several_gpus_is_metered_on_all_of_them(monkeypatch):
    # A tensor-parallel engine on GPUs 1 and 2 of a four-GPU machine: its energy and
    # power are both GPUs', or its tokens per joule would read twice too high.
    gpus = [h100(energy_mj=1_000_000), h100(uuid="GPU-bbbb", energy_mj=5_000, power_mw=300_000),
            h100(uuid="GPU-cccc", energy_mj=7_000, power_mw=200_000), h100(uuid="GPU-dddd", energy_mj=1_000_000)]
    FakeGpus(gpus).install(monkeypatch)
    reader = nvml.gpu_energy_reader(nvml.visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "1,2,3"}))
    assert reader.energy_j() == pytest.approx(12.0)
    assert reader.power_w() == pytest.approx(500.0)
    gpus[2]["energy_mj"] += 3_000
    assert reader.energy_j() == pytest.approx(15.0)
    # One GPU without a counter leaves the sum unknown, not short.
    gpus[2]["energy_mj"] = None
    assert nvml.gpu_energy_reader([1, 2]) is None


def test_gpu_chosen_by_uuid_as_cuda_visible_devices_may_name_it(monkeypatch):
    FakeGpus([h100(), h100(uuid="GPU-bbbb", energy_mj=9_000)]).install(monkeypatch)
    gpus = nvml.visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa"})
    assert gpus == ["GPU-bbbb"]
    assert nvml.gpu_energy_reader(gpus).energy_j() == pytest.approx(9.0)


def test_visible_gpus_are_the_first_the_engine_can_see():
    assert nvml.visible_gpus(1, {}) == [0]
    assert nvml.visible_gpus(4, {}) == [0, 1, 2, 3]
    assert nvml.visible_gpus(1, {"CUDA_VISIBLE_DEVICES": ""}) == [0]
    assert nvml.visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "3,1"}) == [3]
    assert nvml.visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "3, 1,0"}) == [3, 1]
    assert nvml.parse_gpus("0,GPU-aaaa") == [0, "GPU-aaaa"]


@pytest.mark.parametrize("engine_args, gpus", [
    ([], 1), (["--tensor-parallel-size", "4"], 4), (["-tp", "2", "--pipeline-parallel-size=2"], 4), (["--max-num-seqs", "8"], 1),
])
def test_a_vllm_worker_meters_as_many_gpus_as_its_engine_uses(engine_args, gpus, monkeypatch):
    from workers.agent import engine_gpu_count

    assert engine_gpu_count(SimpleNamespace(engine_args=engine_args)) == gpus


def test_gpu_without_energy_counter_is_unknown_not_invented(monkeypatch):
    # Pre-Volta GPUs report power but have no cumulative energy counter.
    FakeGpus([h100(energy_mj=None)]).install(monkeypatch)
    assert nvml.gpu_energy_reader([0]) is None


def test_missing_gpu_index_is_unknown(monkeypatch):
    FakeGpus([h100()]).install(monkeypatch)
    assert nvml.gpu_energy_reader([4]) is None
    assert nvml.gpu_energy_reader(["GPU-zzzz"]) is None


def test_compute_processes_lists_pids_on_those_gpus(monkeypatch):
    FakeGpus([h100(pids=[4242, 4343]), h100(uuid="GPU-bbbb", pids=[5151])]).install(monkeypatch)
    assert nvml.compute_processes([0]) == [4242, 4343]
    assert nvml.compute_processes([1]) == [5151]
    assert nvml.compute_processes([0, 1]) == [4242, 4343, 5151]
    assert nvml.compute_processes([7]) == []
