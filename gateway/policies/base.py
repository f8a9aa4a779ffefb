"""The one interface every routing policy implements.

A policy gets the request and the workers that could take it (ready, serving
the model, allowed by residency, with headroom) and returns one of them, or
None to leave the request queued. Policies keep only their own small state
(a round-robin cursor, say); the fleet's truth lives in Redis.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from gateway.fleet import RouteRequest, Worker


class Policy(Protocol):
    name: str

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None: ...
