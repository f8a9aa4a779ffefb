"""SLO packing, the default: fill each GPU up to its latency SLO, then the next.

A GPU decoding a big batch makes many more tokens per joule than several GPUs
decoding small ones (ML.ENERGY: 2.2 -> 14.3 tokens/J on an H100 from batch 8
to 512), and a GPU left with no work can go back to training. So among the
workers whose predicted time per output token, with this request added, still
meets the SLO, pick the fullest (relative to its own capacity). Only when none
meets it, spill to the one that would decode fastest.

The prediction (`gateway.headroom.predicted_tpot_ms`) is each GPU's own speed
model: a fixed cost per decode step, a cost per KV token read (each request
counted at its prompt plus half its expected output, the KV it holds on average
over its life) and a cost per sequence in the batch. The last is what stops a
GPU with little compute for its bandwidth (an H20) at a smaller batch than its
KV cache alone would suggest.

Centers: a GPU in the gateway's own center is preferred whenever one meets the
SLO. When none has room, the request goes to another center only if the round
trip to it (`request.center_rtt_ms`, configured and then measured) is less than
the expected wait for room at home (`request.local_wait_ms`, behind the requests
queued ahead of it); otherwise it waits in the admission queue.
"""

from __future__ import annotations

import random
from typing import Sequence

from gateway.fleet import RouteRequest, Worker
from gateway.headroom import fill_fraction, predicted_tpot_ms
from gateway.policies.least_load import least_loaded

DEFAULT_TPOT_SLO_MS = 60.0
# Pack to this share of the SLO, not to the SLO itself. The prediction is an
# average: a GPU filled exactly to the line runs half its answers over it (a step
# carrying a burst of arriving prompts, answers longer than expected), and a
# margin keeps them under for the price of a few sequences per GPU. Measured at
# batch 256 (benchmarks/results/policies-batch256/): packing to the line met the
# SLO for 94% of requests, the H20 that took the spill-over running p50 57 ms.
FILL_TO = 0.9


class SloPack:
    name = "slo_pack"

    def __init__(self, rng: random.Random | None = None, *, tpot_slo_ms: float = DEFAULT_TPOT_SLO_MS,
                 fill_to: float = FILL_TO) -> None:
        self._rng = rng or random.Random()
        self.tpot_slo_ms = tpot_slo_ms
        self.line_ms = tpot_slo_ms * fill_to

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None:
        if not candidates:
            return None
        predicted = {worker.id: predicted_tpot_ms(worker, request) for worker in candidates}
        meeting = [w for w in candidates if predicted[w.id] is not None and predicted[w.id] <= self.line_ms]
        if meeting:
            local = [w for w in meeting if request.center and w.center == request.center]
            if local:
                # Fullest first; among equally full (say, all idle) the fastest,
                # then by id so every gateway packs onto the same GPU.
                return min(local, key=lambda w: (-fill_fraction(w), predicted[w.id], w.id))
            # Nothing at home has room: leave the center only where the round
            # trip added is less than the wait for room at home.
            away = meeting
            if request.local_wait_ms is not None:
                away = [w for w in meeting if request.center_rtt_ms.get(w.center, 0.0) < request.local_wait_ms]
                if not away:
                    return None  # wait in line at home: it is quicker
            return min(away, key=lambda w: (-fill_fraction(w), request.center_rtt_ms.get(w.center, 0.0), predicted[w.id], w.id))
        # Workers we cannot predict yet (no profile, no stream measured):
        # spread over them rather than pack blind.
        unknown = [w for w in candidates if predicted[w.id] is None]
        if unknown:
            return least_loaded(unknown, self._rng)
        return min(candidates, key=lambda w: (predicted[w.id], w.id))
