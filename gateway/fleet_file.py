"""The local fleet `idlegrid up` starts: from flags, or a TOML fleet file.

    [[workers]]
    center = "dc-a"
    gpu = "h100"
    model = "deepseek-r1-distill-qwen-7b"
    count = 4

    [centers.dc-a]          # round-trip times in ms from this center to others
    dc-b = 35

Every mistake is reported with the entry it is in, e.g. `workers[2].count`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path


class FleetFileError(ValueError):
    pass


@dataclass
class WorkerGroup:
    center: str
    gpu: str
    model: str
    count: int = 1
    engine: str = "sim"


@dataclass
class Fleet:
    groups: list[WorkerGroup]
    rtt_ms: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def centers(self) -> list[str]:
        return sorted({g.center for g in self.groups})

    def rtt(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        return self.rtt_ms.get((a, b), self.rtt_ms.get((b, a), 0.0))


def _sim_ids() -> tuple[set[str], set[str]] | None:
    """Known GPU and model profile ids of the simulated engine, if it is installed."""
    try:
        from workers.sim import profiles
    except ImportError:
        return None
    return set(profiles.GPUS), set(profiles.MODELS)


def load_fleet(path: str | Path) -> Fleet:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FleetFileError(f"fleet file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetFileError(f"fleet file {path} is not valid TOML: {exc}") from None
    return parse_fleet(data, str(path))


def parse_fleet(data: dict, where: str = "fleet") -> Fleet:
    unknown = set(data) - {"workers", "centers"}
    if unknown:
        raise FleetFileError(f"{where}: unknown table {sorted(unknown)[0]!r} (expected [[workers]] and [centers])")
    entries = data.get("workers")
    if not isinstance(entries, list) or not entries:
        raise FleetFileError(f"{where}: needs at least one [[workers]] entry")
    known = _sim_ids()
    groups = []
    for i, entry in enumerate(entries):
        name = f"{where}: workers[{i}]"
        if not isinstance(entry, dict):
            raise FleetFileError(f"{name} must be a table")
        extra = set(entry) - {"center", "gpu", "model", "count", "engine"}
        if extra:
            raise FleetFileError(f"{name}: unknown key {sorted(extra)[0]!r}")
        for key in ("center", "gpu", "model"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise FleetFileError(f"{name}.{key} is required and must be a non-empty string")
        count = entry.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise FleetFileError(f"{name}.count must be a positive integer, got {count!r}")
        engine = entry.get("engine", "sim")
        if engine not in ("sim", "vllm"):
            raise FleetFileError(f"{name}.engine must be 'sim' or 'vllm', got {engine!r}")
        if engine == "sim" and known:
            gpus, models = known
            if entry["gpu"] not in gpus:
                raise FleetFileError(f"{name}.gpu: unknown GPU profile {entry['gpu']!r}; known: {', '.join(sorted(gpus))}")
            if entry["model"] not in models:
                raise FleetFileError(f"{name}.model: unknown model profile {entry['model']!r}; known: {', '.join(sorted(models))}")
        groups.append(WorkerGroup(entry["center"], entry["gpu"], entry["model"], count, engine))
    rtt: dict[tuple[str, str], float] = {}
    centers = data.get("centers", {})
    if not isinstance(centers, dict):
        raise FleetFileError(f"{where}: [centers] must be a table")
    for a, row in centers.items():
        if not isinstance(row, dict):
            raise FleetFileError(f"{where}: centers.{a} must be a table of round-trip times in ms")
        for b, ms in row.items():
            if not isinstance(ms, (int, float)) or isinstance(ms, bool) or ms < 0:
                raise FleetFileError(f"{where}: centers.{a}.{b} must be a non-negative number of ms, got {ms!r}")
            rtt[(a, b)] = float(ms)
    return Fleet(groups, rtt)
