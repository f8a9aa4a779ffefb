"""Routing policies and headroom on hand-built fleet snapshots.

Policies are plain functions of (request, candidate snapshots), so these tests
build `Worker` objects directly; the seeded RNGs make every run identical,
and the bounds on counts are several standard deviations wide. One test checks
that the reservation counters policies read are kept right by Redis itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.fleet import DRAINING, READY, SLEEPING, STARTING, RouteRequest, Worker
from gateway.headroom import candidates, has_headroom, predicted_tpot_ms
from gateway.policies import DEFAULT_POLICY, POLICIES, make_policy
from gateway.policies.least_load import LeastLoad
from gateway.policies.power_of_two import PowerOfTwo
from gateway.policies.prefix_affinity import PrefixAffinity
from gateway.policies.random_choice import RandomChoice
from gateway.policies.round_robin import RoundRobin
from gateway.policies.slo_pack import SloPack
from gateway.registry import Registry
from workers.sim.profiles import PerfModel, get_gpu, get_model

NOW = 1_000_000.0
MODEL = "deepseek-r1-distill-qwen-7b"


def make_worker(id: str, **fields) -> Worker:
    defaults = dict(
        center="a",
        model=MODEL,
        engine_url=f"http://{id}.invalid",
        state=READY,
        max_num_seqs=64,
        kv_capacity_tokens=200_000,
        last_heartbeat=NOW,
    )
    return Worker(id=id, **{**defaults, **fields})


def make_request(**fields) -> RouteRequest:
    defaults = dict(model=MODEL, prompt_tokens=1_000, max_output_tokens=4_000)
    return RouteRequest(**{**defaults, **fields})


def reserve(worker: Worker, request: RouteRequest) -> None:
    """What the gateway's atomic reservation does to the snapshot."""
    worker.reserved_requests += 1
    worker.reserved_tokens += request.reserved_tokens
    worker.reserved_average_kv_tokens += request.average_kv_tokens


def route_many(policy, fleet: list[Worker], request: RouteRequest, n: int) -> Counter:
    """Route `n` requests one after another, reserving each, like the gateway."""
    picks: Counter = Counter()
    for _ in range(n):
        chosen = policy.choose(request, candidates(fleet, request, NOW))
        assert chosen is not None
        reserve(chosen, request)
        picks[chosen.id] += 1
    return picks


# --- headroom and candidates ---------------------------------------------


def test_max_num_seqs_limits_headroom():
    request = make_request()
    assert has_headroom(make_worker("w", max_num_seqs=4, reserved_requests=3), request)
    assert not has_headroom(make_worker("w", max_num_seqs=4, reserved_requests=4), request)


def test_kv_capacity_limits_headroom_when_known():
    request = make_request()  # 5,000 tokens
    assert has_headroom(make_worker("w", kv_capacity_tokens=10_000, reserved_tokens=5_000), request)
    assert not has_headroom(make_worker("w", kv_capacity_tokens=10_000, reserved_tokens=5_001), request)
    # Capacity counts full sizes, though a request holds only about half of it on average:
    # a worker is never promised more KV than it has.
    assert not has_headroom(make_worker("w", kv_capacity_tokens=10_000, reserved_tokens=5_001,
                                        reserved_average_kv_tokens=3_001), request)
    # Unknown capacity: only max_num_seqs and the engine's KV usage bound it.
    assert has_headroom(make_worker("w", kv_capacity_tokens=0, reserved_tokens=10**9), request)


def test_engine_kv_usage_above_threshold_means_no_headroom():
    request = make_request()
    assert has_headroom(make_worker("w", kv_usage=0.5), request)
    assert not has_headroom(make_worker("w", kv_usage=0.95), request)
    assert not has_headroom(make_worker("w", kv_usage=0.5), request, kv_threshold=0.4)


def test_candidates_keep_only_ready_fresh_matching_workers():
    fleet = [
        make_worker("ok"),
        make_worker("draining", state=DRAINING),
        make_worker("sleeping", state=SLEEPING),
        make_worker("starting", state=STARTING),
        make_worker("other-model", model="deepseek-r1-distill-qwen-32b"),
        make_worker("stale", last_heartbeat=NOW - 16),
        make_worker("just-fresh", last_heartbeat=NOW - 15),
        make_worker("full", max_num_seqs=2, reserved_requests=2),
    ]
    chosen = candidates(fleet, make_request(), NOW, heartbeat_ttl=15)
    assert sorted(w.id for w in chosen) == ["just-fresh", "ok"]


def test_residency_is_never_violated_even_when_allowed_centers_are_full():
    fleet = [
        make_worker("eu-1", center="eu", max_num_seqs=1, reserved_requests=1),
        make_worker("us-1", center="us"),
        make_worker("cn-1", center="cn"),
    ]
    assert candidates(fleet, make_request(allowed_centers=("eu",)), NOW) == []
    fleet[0].reserved_requests = 0
    for name in POLICIES:
        policy = make_policy(name, rng=random.Random(0))
        request = make_request(allowed_centers=("eu",), center="us")
        for _ in range(20):
            chosen = policy.choose(request, candidates(fleet, request, NOW))
            assert chosen is not None and chosen.center == "eu", name
    both = make_request(allowed_centers=("eu", "cn"))
    assert sorted(w.id for w in candidates(fleet, both, NOW)) == ["cn-1", "eu-1"]


def test_predicted_tpot_grows_with_kv_held_on_average_and_with_sequences():
    # 10 requests reserved at 5,000 tokens each, 3,000 on average over their lives.
    worker = make_worker("w", tpot_base_ms=20.0, tpot_ms_per_1k_kv=0.5, tpot_ms_per_seq=0.25,
                         reserved_requests=10, reserved_tokens=50_000, reserved_average_kv_tokens=30_000)
    # Their prompts are 10,000 tokens and their answers 40,000 (the two sums tell them
    # apart), so a quarter of a prompt token is computed per decoded token, per sequence.
    assert predicted_tpot_ms(worker, None) == pytest.approx(20 + 15 + 0.25 * 10 * 1.25)
    # One more: its prompt plus half its output (1,000 + 2,000 tokens), and one more sequence.
    assert predicted_tpot_ms(worker, make_request()) == pytest.approx(20 + 16.5 + 0.25 * 11 * 1.25)
    # Short answers behind long prompts: the same sequences cost more, all of it prefill.
    prompt_heavy = make_worker("p", tpot_base_ms=20.0, tpot_ms_per_1k_kv=0.0, tpot_ms_per_seq=0.25,
                               reserved_requests=10, reserved_tokens=10 * 500, reserved_average_kv_tokens=10 * 450)
    assert predicted_tpot_ms(prompt_heavy, None) == pytest.approx(20 + 0.25 * 10 * (1 + 400 / 100))
    # The engine reporting more than we reserved (load from elsewhere) counts.
    worker.kv_usage, worker.running = 0.4, 20  # 80,000 of 200,000 tokens
    assert predicted_tpot_ms(worker, None) == pytest.approx(20 + 40 + 0.25 * 20 * 1.25)
    # A record without the average (written before it was tracked) counts full sizes.
    assert predicted_tpot_ms(make_worker("old", tpot_base_ms=20.0, tpot_ms_per_1k_kv=0.5, reserved_tokens=40_000)) == 40.0
    assert predicted_tpot_ms(make_worker("m", tpot_ms=33.0), make_request()) == 33.0
    assert predicted_tpot_ms(make_worker("unknown"), make_request()) is None


def test_redis_reservations_keep_full_and_average_kv_for_the_snapshot(redis_url):
    """Reserve, renew, release and expiry (the Lua scripts) keep both counters right,
    and a call retried after a lost reply counts once."""
    request = make_request()  # 5,000 tokens, 3,000 on average

    async def scenario() -> list[tuple[int, int, int]]:
        client = aioredis.Redis.from_url(redis_url)
        registry = Registry(client, heartbeat_ttl=60)
        dying = Registry(client, heartbeat_ttl=60, lease_s=0.2)  # a gateway about to die: it never renews
        await registry.register(make_worker("w"))
        worker = await registry.get("w")

        async def counters() -> tuple[int, int, int]:
            w = await registry.get("w")
            return w.reserved_requests, w.reserved_tokens, w.reserved_average_kv_tokens

        seen = []
        assert (await registry.reserve(worker, "r1", request.reserved_tokens, request.average_kv_tokens)).ok
        assert (await registry.reserve(worker, "r2", 1_000)).ok  # no average given: counts in full
        assert (await registry.reserve(worker, "r2", 1_000)).ok  # the same call again (a retry): counted once
        assert (await dying.reserve(worker, "lost", 7_000)).ok
        seen.append(await counters())
        await asyncio.sleep(0.4)
        await registry.renew("w", ["r1", "r2", "lost"])  # too late for `lost`: its lease ran out
        assert (await registry.reserve(worker, "r3", request.reserved_tokens, request.average_kv_tokens)).ok
        seen.append(await counters())
        await registry.release("w", "r1")
        await registry.release("w", "r1")  # again: nothing more to give back
        seen.append(await counters())
        await client.aclose()
        return seen

    assert asyncio.run(scenario()) == [(3, 13_000, 11_000), (3, 11_000, 7_000), (2, 6_000, 4_000)]


def test_a_reservation_costs_redis_the_same_however_many_a_worker_holds(redis_url):
    """Reserving and releasing do not re-read every live reservation: with 1,000 held
    on a worker a call costs Redis about what it does with none (measured as Redis'
    own CPU time per call, which a busy machine does not inflate the way it does
    wall time)."""

    def usec_per_call(live: int) -> float:
        async def scenario() -> float:
            client = aioredis.Redis.from_url(redis_url)
            registry = Registry(client, heartbeat_ttl=60)
            name = f"w{live}"
            await registry.register(make_worker(name, max_num_seqs=10_000, kv_capacity_tokens=0))
            worker = await registry.get(name)
            for i in range(live):
                assert (await registry.reserve(worker, f"live-{i}", 100)).ok
            await client.config_resetstat()
            for i in range(200):
                assert (await registry.reserve(worker, f"r{i}", 100)).ok
                await registry.release(name, f"r{i}")
            stats = (await client.info("commandstats"))["cmdstat_evalsha"]
            assert (await registry.get(name)).reserved_requests == live
            await client.aclose()
            return stats["usec_per_call"]

        return asyncio.run(scenario())

    empty, busy = usec_per_call(0), usec_per_call(1_000)
    assert busy < 3 * empty + 10, (empty, busy)  # re-summing 1,000 entries per call cost ~70x


# --- registry --------------------------------------------------------------


def test_registry_names_every_policy_and_rejects_unknown_ones():
    assert set(POLICIES) == {"round_robin", "random", "least_load", "power_of_two", "prefix_affinity", "slo_pack"}
    assert DEFAULT_POLICY == "slo_pack"
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown policy 'fastest'.*round_robin.*slo_pack"):
        make_policy("fastest")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_a_candidate_or_none(name):
    policy = make_policy(name, rng=random.Random(1))
    request = make_request(prefix_key="hello")
    assert policy.choose(request, []) is None
    fleet = [make_worker(f"w{i}", tpot_base_ms=20.0, tpot_ms_per_1k_kv=0.5) for i in range(3)]
    for _ in range(10):
        assert policy.choose(request, fleet) in fleet


# --- round robin, random, least load ---------------------------------------


def test_round_robin_cycles_evenly_in_id_order():
    fleet = [make_worker("c"), make_worker("a"), make_worker("b")]
    policy = RoundRobin()
    picks = [policy.choose(make_request(), fleet).id for _ in range(9)]
    assert picks == ["a", "b", "c"] * 3


def test_round_robin_keeps_cycling_when_a_worker_drops_out():
    a, b, c = make_worker("a"), make_worker("b"), make_worker("c")
    policy = RoundRobin()
    assert policy.choose(make_request(), [a, b, c]).id == "a"
    assert policy.choose(make_request(), [a, c]).id == "c"  # b has no headroom now
    assert policy.choose(make_request(), [a, b, c]).id == "a"


def test_random_spreads_uniformly():
    fleet = [make_worker(f"w{i}") for i in range(3)]
    policy = RandomChoice(rng=random.Random(7))
    picks = Counter(policy.choose(make_request(), fleet).id for _ in range(3000))
    assert all(850 <= picks[w.id] <= 1150 for w in fleet), picks


def test_least_load_picks_the_emptiest_and_spreads_ties():
    fleet = [
        make_worker("busy", running=10),
        make_worker("idle-1", running=1),
        make_worker("idle-2", reserved_requests=1),
        make_worker("queued", running=1, waiting=3),
    ]
    policy = LeastLoad(rng=random.Random(3))
    picks = Counter(policy.choose(make_request(), fleet).id for _ in range(1000))
    assert set(picks) == {"idle-1", "idle-2"}
    assert 400 <= picks["idle-1"] <= 600, picks


# --- power of two choices ------------------------------------------------


def test_power_of_two_never_picks_the_most_loaded_of_three():
    fleet = [
        make_worker("light", reserved_tokens=0),
        make_worker("medium", reserved_tokens=20_000),
        make_worker("heavy", reserved_tokens=100_000),
    ]
    policy = PowerOfTwo(rng=random.Random(11))
    picks = Counter(policy.choose(make_request(), fleet).id for _ in range(1500))
    assert picks["heavy"] == 0
    # "light" wins both pairs it is drawn in: 2/3 of the time (sd ~18).
    assert 920 <= picks["light"] <= 1080, picks


def test_power_of_two_judges_load_against_each_gpus_capacity():
    big = make_worker("big", kv_capacity_tokens=400_000, reserved_tokens=40_000)  # 10% full
    small = make_worker("small", kv_capacity_tokens=50_000, reserved_tokens=20_000)  # 40% full
    policy = PowerOfTwo(rng=random.Random(5))
    assert {policy.choose(make_request(), [big, small]).id for _ in range(50)} == {"big"}


# --- prefix affinity -------------------------------------------------------


def test_prefix_affinity_sends_the_same_prefix_to_the_same_worker_from_any_gateway():
    fleet = [make_worker(f"w{i}") for i in range(5)]
    request = make_request(prefix_key="You are a careful math tutor. " * 40)
    first = PrefixAffinity(rng=random.Random(1)).choose(request, fleet)
    for seed in range(10):  # a fresh policy per call stands for another gateway process
        shuffled = fleet[:]
        random.Random(seed).shuffle(shuffled)
        assert PrefixAffinity(rng=random.Random(seed)).choose(request, shuffled) is first


def test_prefix_affinity_routes_on_the_leading_blocks_only():
    fleet = [make_worker(f"w{i}") for i in range(8)]
    system = "".join(f"rule {i}: think step by step. " for i in range(60))  # > 4 blocks
    policy = PrefixAffinity()
    # A conversation growing turn by turn keeps its worker (and its cache).
    conversation = system
    homes = set()
    for turn in range(10):
        conversation += f"user: what is {turn}+{turn}? assistant: {2 * turn}. "
        homes.add(policy.choose(make_request(prefix_key=conversation), fleet).id)
    assert len(homes) == 1


def test_prefix_affinity_spreads_different_prefixes():
    fleet = [make_worker(f"w{i}") for i in range(4)]
    policy = PrefixAffinity()
    picks = Counter(policy.choose(make_request(prefix_key=f"tenant {i} system prompt"), fleet).id for i in range(400))
    assert all(70 <= picks[w.id] <= 130 for w in fleet), picks  # 100 each expected, sd ~9


def test_prefix_affinity_gives_bigger_gpus_more_prefixes():
    big = make_worker("big", kv_capacity_tokens=300_000)
    small = make_worker("small", kv_capacity_tokens=100_000)
    policy = PrefixAffinity()
    picks = Counter(policy.choose(make_request(prefix_key=f"prompt {i}"), [big, small]).id for i in range(1000))
    assert 700 <= picks["big"] <= 800, picks  # 3/4 expected, sd ~14


def test_balance_guard_moves_a_hot_prefix_off_an_overloaded_worker():
    fleet = [make_worker(f"w{i}", running=2) for i in range(3)]
    request = make_request(prefix_key="the one prompt everybody sends")
    policy = PrefixAffinity(rng=random.Random(2), balance_abs_threshold=8, balance_rel_threshold=1.5)
    home = policy.choose(request, fleet)
    home.running = 9  # a little busier: affinity wins
    assert policy.choose(request, fleet) is home
    home.running = 40  # piled up: the guard sends the prefix elsewhere
    moved = {policy.choose(request, fleet).id for _ in range(50)}
    assert home.id not in moved and len(moved) == 2


def test_prefix_affinity_without_a_prefix_uses_least_load():
    fleet = [make_worker("busy", running=5), make_worker("idle")]
    assert PrefixAffinity().choose(make_request(prefix_key=""), fleet).id == "idle"


# --- SLO packing -------------------------------------------------------------

# An H100-like and an H20-like worker: TPOT = base + per_1k_kv * KV/1000 + per_seq * sequences.
# The H20 has a sixth of the H100's compute, so each sequence costs it ten times more.
FAST = dict(gpu="h100", tpot_base_ms=10.0, tpot_ms_per_1k_kv=0.3, tpot_ms_per_seq=0.05, kv_capacity_tokens=300_000)
SLOW = dict(gpu="h20", tpot_base_ms=25.0, tpot_ms_per_1k_kv=0.6, tpot_ms_per_seq=0.5, kv_capacity_tokens=150_000)
# Each request of make_request() (3,000 KV tokens on average; 1,000 prompt tokens per 4,000
# answered, so 1.25 tokens computed per decoded one) adds 1.5 + 0.5 x 1.25 ms: 18 requests
# make 58.25 ms, a 19th 60.375.
SAME = dict(tpot_base_ms=20.0, tpot_ms_per_1k_kv=0.5, tpot_ms_per_seq=0.5)


def holding(n: int, request: RouteRequest | None = None) -> dict:
    """Snapshot fields of a worker holding `n` reservations of `request`."""
    request = request or make_request()
    return dict(reserved_requests=n, reserved_tokens=n * request.reserved_tokens,
                reserved_average_kv_tokens=n * request.average_kv_tokens)


def test_slo_pack_fills_one_gpu_to_its_slo_before_touching_the_next():
    fleet = [make_worker(name, **SAME) for name in ("a", "b", "c")]
    picks = route_many(SloPack(tpot_slo_ms=60, fill_to=1.0), fleet, make_request(), 24)
    # 18 requests take "a" to 58.25 ms; the rest go to "b".
    assert picks == Counter({"a": 18, "b": 6})
    assert fleet[2].reserved_requests == 0  # a whole GPU left idle for training
    assert all(predicted_tpot_ms(w) <= 60 for w in fleet)


def test_slo_pack_packs_to_a_margin_under_the_slo_by_default():
    fleet = [make_worker(name, **SAME) for name in ("a", "b", "c")]
    # A 50 ms SLO is packed to 45 ms: 11 requests (43.4 ms) per GPU, where the
    # line itself would take 14 (49.75 ms).
    assert route_many(SloPack(tpot_slo_ms=50), fleet, make_request(), 24) == Counter({"a": 11, "b": 11, "c": 2})
    fleet = [make_worker(name, **SAME) for name in ("a", "b", "c")]
    assert route_many(SloPack(tpot_slo_ms=50, fill_to=1.0), fleet, make_request(), 24) == Counter({"a": 14, "b": 10})


def test_slo_pack_prefers_the_busiest_worker_that_still_meets_the_slo():
    fleet = [
        make_worker("idle", **SAME),
        make_worker("half", **holding(8), **SAME),
        make_worker("full", **holding(18), **SAME),  # one more breaks 60 ms
    ]
    assert SloPack().choose(make_request(), fleet).id == "half"


def test_slo_pack_spills_to_the_lowest_predicted_tpot_when_no_worker_meets_the_slo():
    fleet = [
        make_worker("slow-busy", reserved_average_kv_tokens=50_000, reserved_requests=20, **SLOW),  # 25 + 31.8 + 13.1 ms
        make_worker("fast-busy", reserved_average_kv_tokens=170_000, reserved_requests=40, **FAST),  # 10 + 51.9 + 2.6 ms
        make_worker("measured", tpot_ms=80.0),
    ]
    assert SloPack(tpot_slo_ms=60, fill_to=1.0).choose(make_request(), fleet).id == "fast-busy"


def test_slo_pack_packs_fast_gpus_deeper_than_slow_ones():
    fleet = [make_worker("h20", **SLOW), make_worker("h100", **FAST)]
    picks = route_many(SloPack(tpot_slo_ms=60, fill_to=1.0), fleet, make_request(), 60)
    # The H100 is empty-first (faster) and meets 60 ms up to 51 requests (0.9 + 0.0625 ms
    # each); the H20 (2.5x the cost per request: 1.8 + 0.625 ms) would only up to 14.
    assert picks == Counter({"h100": 51, "h20": 9})
    assert all(predicted_tpot_ms(w) <= 60 for w in fleet)


def sim_profiled(id: str, gpu: str, **fields) -> tuple[Worker, PerfModel]:
    """A worker with the speed model a simulated engine of the 7B model on `gpu`
    enrolls with, and that engine's own roofline model to check it against."""
    perf = PerfModel(get_gpu(gpu), get_model(MODEL))
    worker = make_worker(id, gpu=gpu, max_num_seqs=256, kv_capacity_tokens=perf.kv_capacity_tokens,
                         tpot_base_ms=perf.tpot_base_ms, tpot_ms_per_1k_kv=perf.tpot_ms_per_1k_kv,
                         tpot_ms_per_seq=perf.tpot_ms_per_seq, **fields)
    return worker, perf


def modeled_tpot_ms(perf: PerfModel, worker: Worker) -> float:
    """What the engine would really decode at: its roofline at the worker's batch, each
    request holding its lifetime-average KV."""
    batch = worker.reserved_requests
    return perf.step_seconds(batch, worker.reserved_average_kv_tokens, batch) * 1000


R1 = make_request(prompt_tokens=120, max_output_tokens=4_000)  # a short question, a long reasoning answer


def test_slo_pack_spills_from_an_h20_whose_batch_is_too_big_for_its_compute():
    h20, h20_perf = sim_profiled("h20", "h20", **holding(230, R1))
    h100, _ = sim_profiled("h100", "h100", **holding(100, R1))
    policy = SloPack(tpot_slo_ms=60, fill_to=1.0)
    # 231 R1 sequences hold little KV for an H20's cache, but its GEMMs make each step
    # take over 60 ms; the prediction sees it, and the request goes to the H100.
    assert h20_perf.step_seconds(231, 231 * R1.average_kv_tokens, 231) * 1000 > 60
    assert predicted_tpot_ms(h20, R1) > 60
    assert policy.choose(R1, [h20, h100]) is h100
    # Without the per-sequence term (the speed model before it), the H20 looked half
    # idle and, being the fuller GPU, got the request.
    blind = dataclasses.replace(h20, tpot_ms_per_seq=None)
    assert predicted_tpot_ms(blind, R1) < 20
    assert policy.choose(R1, [blind, h100]) is blind


def test_slo_pack_keeps_every_gpu_within_the_slo_its_engine_really_decodes_at():
    (h20, h20_perf), (h100, h100_perf) = sim_profiled("h20", "h20"), sim_profiled("h100", "h100")
    picks = route_many(SloPack(tpot_slo_ms=60, fill_to=1.0), [h20, h100], R1, 300)
    # The H20 takes what its compute allows at 60 ms, the H100 the rest.
    assert 200 <= picks["h20"] <= 220 and picks["h100"] == 300 - picks["h20"], picks
    assert 55 < modeled_tpot_ms(h20_perf, h20) <= 60
    assert modeled_tpot_ms(h100_perf, h100) <= 60


def test_slo_pack_prefers_the_requests_own_center_when_it_meets_the_slo():
    far = make_worker("far", center="eu", **holding(10), **SAME)
    near = make_worker("near", center="us", **SAME)
    policy = SloPack()
    assert policy.choose(make_request(center="us"), [far, near]) is near
    near.reserved_requests, near.reserved_average_kv_tokens = 20, 60_000  # local GPU can no longer meet the SLO
    assert policy.choose(make_request(center="us"), [far, near]) is far
    assert policy.choose(make_request(), [far, near]) is far  # no center: pure packing


def test_slo_pack_uses_unprofiled_workers_only_when_known_ones_miss_the_slo():
    known = make_worker("known", **SAME)
    blind = make_worker("blind")  # no profile, no measured stream yet
    policy = SloPack()
    assert policy.choose(make_request(), [blind, known]) is known
    known.reserved_average_kv_tokens = 90_000
    assert policy.choose(make_request(), [blind, known]) is blind


# --- centers: leave home only when the wait saved beats the round trip -------


def test_slo_pack_prefers_home_then_waits_or_travels_by_round_trip():
    policy = SloPack()
    home = make_worker("home", center="bj", tpot_base_ms=10, tpot_ms_per_seq=0.05)
    near = make_worker("near", center="sh", tpot_base_ms=10, tpot_ms_per_seq=0.05)
    far = make_worker("far", center="gz", tpot_base_ms=10, tpot_ms_per_seq=0.05)
    rtt = {"bj": 0.0, "sh": 30.0, "gz": 45.0}

    # Room at home: home, however idle the others are.
    request = make_request(center="bj", center_rtt_ms=rtt, local_wait_ms=0.0)
    assert policy.choose(request, [near, far, home]).id == "home"

    # Home is full and a slot frees there in 20 ms: cheaper than any trip, so wait (None).
    request = make_request(center="bj", center_rtt_ms=rtt, local_wait_ms=20.0)
    assert policy.choose(request, [near, far]) is None
    # A slot frees in 40 ms: sh (30 ms away) is worth it, gz (45 ms) is not.
    request = make_request(center="bj", center_rtt_ms=rtt, local_wait_ms=40.0)
    assert policy.choose(request, [far]) is None
    assert policy.choose(request, [near, far]).id == "near"
    # A long wait at home (or no home worker at all): the nearer of equally full centers.
    for wait in (5_000.0, None):
        request = make_request(center="bj", center_rtt_ms=rtt, local_wait_ms=wait)
        assert policy.choose(request, [far, near]).id == "near"


def test_expected_wait_counts_the_slots_freeing_at_home_and_the_line_ahead():
    from gateway.headroom import expected_wait_ms

    request = make_request(max_output_tokens=1_000)
    assert expected_wait_ms([], request) is None
    roomy = make_worker("roomy", max_num_seqs=8, tpot_base_ms=20)
    assert expected_wait_ms([roomy], request) == 0.0
    # Full at 8 sequences of ~1,000 tokens at 20 ms/token: one finishes every 20 s / 8.
    full = make_worker("full", max_num_seqs=8, reserved_requests=8, tpot_base_ms=20)
    assert expected_wait_ms([full], request) == pytest.approx(20 * 1_000 / 8)
    # With 3 requests queued ahead, the 4th slot to free is this request's.
    assert expected_wait_ms([full], request, ahead=3) == pytest.approx(4 * 20 * 1_000 / 8)
    # Two full workers free slots at the sum of their rates: 8 + 4 every 20 s.
    busier = make_worker("busier", max_num_seqs=4, reserved_requests=4, tpot_base_ms=20)
    assert expected_wait_ms([full, busier], request) == pytest.approx(20 * 1_000 / 12)
    # Room now for the one ahead but not for this request too: it waits for the next
    # slot to free, on full (8 running) or on roomy (then running the one ahead).
    assert expected_wait_ms([roomy, full], request, ahead=0) == 0.0
    assert expected_wait_ms([roomy, full], request, ahead=1) == pytest.approx(20 * 1_000 / 9)
    unknown = make_worker("unknown", max_num_seqs=8, reserved_requests=8)
    assert expected_wait_ms([unknown], request) is None, "no speed known: nothing to weigh"
