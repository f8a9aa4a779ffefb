"""Random: any candidate, uniformly. A baseline for the benchmarks."""

from __future__ import annotations

import random
from typing import Sequence

from gateway.fleet import RouteRequest, Worker


class RandomChoice:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None:
        if not candidates:
            return None
        return self._rng.choice(list(candidates))
