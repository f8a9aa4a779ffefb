"""Power of two choices: sample two candidates, take the less loaded.

Nearly as good as looking at every worker, and it does not send a whole burst
to the single emptiest worker when several gateways act on the same snapshot.
"""

from __future__ import annotations

import random
from typing import Sequence

from gateway.fleet import RouteRequest, Worker
from gateway.headroom import fill_fraction


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None:
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = self._rng.sample(list(candidates), 2)
        # Load is reserved tokens relative to each worker's own capacity, so a
        # big GPU is not judged as full as a small one holding the same tokens.
        return min((first, second), key=lambda w: (fill_fraction(w), w.reserved_tokens))
