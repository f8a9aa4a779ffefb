"""When requests are sent: open-loop arrivals at a rate, or a closed loop at a concurrency.

Open loop. Gaps between arrivals are gamma-distributed with shape
`burstiness` and mean `1 / rate`, as `vllm bench serve` does: burstiness 1 is
a Poisson process (exponential gaps); below 1 arrivals come in bursts
(coefficient of variation of the gaps is `1 / sqrt(burstiness)`); above 1
they are more even; infinite burstiness is a fixed interval. Rate `inf`
sends everything at once.

Closed loop. `concurrency` clients each send their next request as soon as
their previous one ends, so exactly that many are in flight until the
requests run out.
"""

from __future__ import annotations

import math
import random


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start of the run, for `n` open-loop arrivals.

    The first request goes at 0; each later one after a gamma-distributed gap.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if burstiness <= 0:
        raise ValueError("burstiness must be positive")
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets = [0.0]
    for _ in range(n - 1):
        if math.isinf(burstiness):
            gap = 1.0 / rate
        else:
            gap = rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        offsets.append(offsets[-1] + gap)
    return offsets


def describe(rate: float | None, burstiness: float, concurrency: int | None) -> str:
    """A short label for plots and the report."""
    if concurrency is not None:
        return f"closed loop, concurrency {concurrency}"
    assert rate is not None
    if math.isinf(rate):
        return "all at once (rate inf)"
    kind = "Poisson" if burstiness == 1.0 else f"gamma, burstiness {burstiness:g}"
    return f"{rate:g} req/s ({kind})"
