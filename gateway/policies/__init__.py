"""Routing policies, by name (`--policy`, per-API-key defaults)."""

from __future__ import annotations

import random

from gateway.policies.base import Policy
from gateway.policies.least_load import LeastLoad
from gateway.policies.power_of_two import PowerOfTwo
from gateway.policies.prefix_affinity import PrefixAffinity
from gateway.policies.random_choice import RandomChoice
from gateway.policies.round_robin import RoundRobin
from gateway.policies.slo_pack import SloPack

DEFAULT_POLICY = "slo_pack"

POLICIES: dict[str, type] = {
    cls.name: cls for cls in (RoundRobin, RandomChoice, LeastLoad, PowerOfTwo, PrefixAffinity, SloPack)
}


def make_policy(name: str, *, rng: random.Random | None = None) -> Policy:
    """A fresh policy instance; ValueError naming the choices for an unknown name."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
    return cls(rng=rng)


__all__ = ["DEFAULT_POLICY", "POLICIES", "Policy", "make_policy"]
