"""Least load: the candidate with the fewest requests held or queued."""

from __future__ import annotations

import random
from typing import Sequence

from gateway.fleet import RouteRequest, Worker


def least_loaded(candidates: Sequence[Worker], rng: random.Random) -> Worker | None:
    """The candidate with the smallest queue depth; ties broken at random so
    that equal workers share the load instead of the first one taking it all."""
    if not candidates:
        return None
    lowest = min(worker.queue_depth for worker in candidates)
    return rng.choice([worker for worker in candidates if worker.queue_depth == lowest])


class LeastLoad:
    name = "least_load"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None:
        return least_loaded(candidates, self._rng)
