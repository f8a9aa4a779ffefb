"""Round robin: each candidate in turn, in order of worker id."""

from __future__ import annotations

import random
from typing import Sequence

from gateway.fleet import RouteRequest, Worker


class RoundRobin:
    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:  # rng: same constructor as the others
        # Remember the last worker picked rather than an index, so the cycle
        # stays even when workers join, leave or lose headroom between calls.
        self._last_id: str | None = None

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda worker: worker.id)
        chosen = ordered[0]
        if self._last_id is not None:
            chosen = next((w for w in ordered if w.id > self._last_id), ordered[0])
        self._last_id = chosen.id
        return chosen
