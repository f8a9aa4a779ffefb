"""The issue-3 policy benchmark (`python -m benchmarks.policy_compare`): its capacity
math on the simulator's profiles, and a real smoke run (simulated engines, a real
gateway on a real Redis, vllm-router when installed) that leaves the table, the
plots and per-configuration results a reader of the committed run relies on."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import policy_compare as pc
from workers.sim.profiles import PerfModel, get_gpu, get_model

MODEL = "deepseek-r1-distill-qwen-7b"


def perf(gpu: str) -> PerfModel:
    return PerfModel(get_gpu(gpu), get_model(MODEL))


# --- capacity and workload -----------------------------------------------------------


def test_capacity_batch_is_the_largest_meeting_the_tpot_slo():
    h20 = perf("h20")
    cap = pc.gpu_capacity(h20, prompt_mean=120, output_mean=4000, output_sq_mean=4000**2 * 1.5,
                          tpot_slo_ms=60.0, max_num_seqs=256)
    assert cap.limited_by == "tpot_slo"
    assert cap.tpot_ms <= 60.0
    context = 120 + 4000**2 * 1.5 / (2 * 4000)
    one_more = cap.batch + 1
    computed = round(one_more * (1 + 120 / 4000))  # decodes plus the prompts arriving to replace finished ones
    assert h20.step_seconds(computed, int(one_more * context), one_more) * 1000 > 60.0
    assert cap.tokens_per_s == pytest.approx(cap.batch / (cap.tpot_ms / 1000))


def test_capacity_counts_the_prefill_of_arriving_prompts():
    """Short outputs behind long prompts: the fleet decodes less than a decode-only count says."""
    h20 = perf("h20")
    decode_heavy = pc.gpu_capacity(h20, prompt_mean=10, output_mean=100, output_sq_mean=100**2, tpot_slo_ms=60.0, max_num_seqs=256)
    prefill_heavy = pc.gpu_capacity(h20, prompt_mean=400, output_mean=100, output_sq_mean=100**2, tpot_slo_ms=60.0, max_num_seqs=256)
    # Same KV context per running sequence would favour neither; 390 more prompt tokens per
    # 100 decoded cost compute in every step, so the SLO batch and the throughput both drop.
    assert prefill_heavy.batch < decode_heavy.batch
    assert prefill_heavy.tokens_per_s < 0.5 * decode_heavy.tokens_per_s


def test_capacity_is_capped_by_max_num_seqs_and_by_the_kv_cache():
    short = pc.gpu_capacity(perf("h100"), 120, 100, 100**2, 60.0, max_num_seqs=32)
    assert (short.batch, short.limited_by) == (32, "max_num_seqs")
    # Whole reservations of prompt + output must fit in 90% of the KV cache.
    huge = pc.gpu_capacity(perf("910b"), 120, 30000, 30000**2, 1e9, max_num_seqs=256)
    assert huge.limited_by == "kv_cache"
    assert huge.batch == int(0.9 * perf("910b").kv_capacity_tokens // 30120)


def test_scaled_r1_workload_is_repeatable_and_scaled():
    settings = pc.FULL
    lengths = settings.output_lengths
    a = pc.r1_requests(400, lengths, seed=3, text_seed="x")
    b = pc.r1_requests(400, lengths, seed=3, text_seed="y")
    assert [r.output_len for r in a] == [r.output_len for r in b]  # same lengths...
    assert a[0].messages != b[0].messages  # ...fresh prompt text
    outputs = [r.output_len for r in a]
    assert lengths.low <= min(outputs) and max(outputs) <= lengths.high
    assert lengths.high == round(settings.output_cap_medians * lengths.median)
    # Prompts scale too, down to the R1 instruction plus one word.
    short = dataclasses.replace(settings, prompt_scale=1 / 128)
    scaled = pc.r1_requests(400, lengths, seed=3, text_seed="x", prompts=short.prompt_lengths)
    assert [r.output_len for r in scaled] == outputs
    words = [len(r.messages[0]["content"].split()) for r in scaled]
    assert min(words) == len(pc.R1_INSTRUCTION.split()) + 1
    assert sum(words) < sum(len(r.messages[0]["content"].split()) for r in a) / 5
    assert statistics.median(outputs) == pytest.approx(4000 * settings.output_scale, rel=0.2)


def test_targets_compare_slo_pack_with_round_robin_and_the_best_vllm_router():
    rows = [
        {"config": "idlegrid-slo_pack", "load": 0.8, "goodput_req_s": 3.0, "tokens_per_joule": 6.0},
        {"config": "idlegrid-round_robin", "load": 0.8, "goodput_req_s": 2.0, "tokens_per_joule": 4.0},
        {"config": "vllm-router-round_robin", "load": 0.8, "goodput_req_s": 1.0, "tokens_per_joule": 5.0},
        {"config": "vllm-router-cache_aware", "load": 0.8, "goodput_req_s": 2.5, "tokens_per_joule": 5.0},
        {"config": "idlegrid-slo_pack", "load": 0.5, "goodput_req_s": 99.0, "tokens_per_joule": 99.0},
    ]
    t = pc.targets(rows)
    assert t["slo_pack_vs_round_robin_goodput"] == pytest.approx(1.5)
    assert t["best_vllm_router"] == "vllm-router-cache_aware"
    assert t["slo_pack_vs_best_vllm_router_goodput"] == pytest.approx(1.2)
    assert t["slo_pack_vs_round_robin_tokens_per_joule"] == pytest.approx(1.5)


def test_unknown_policy_is_one_clear_error():
    with pytest.raises(SystemExit, match="unknown idlegrid policy 'fastest'"):
        pc.main(["--quick", "--policies", "fastest"])
    with pytest.raises(SystemExit, match="unknown vllm-router policy 'kv_aware'"):
        pc.main(["--quick", "--router-policies", "kv_aware"])


# --- a real run ----------------------------------------------------------------------


def test_quick_run_leaves_table_plots_and_results(tmp_path: Path):
    router = pc.vllm_router_binary() is not None
    out = tmp_path / "out"
    assert pc.main(["--quick", "--out", str(out), "--policies", "round_robin,slo_pack",
                    "--router-policies", "round_robin" if router else ""]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated"] is True
    configs = ["idlegrid-round_robin", "idlegrid-slo_pack"] + (["vllm-router-round_robin"] if router else [])
    assert [row["config"] for row in summary["table"]] == configs
    for row in summary["table"]:
        # The smoke load is served (a 2-core machine shared with other jobs may time out a
        # straggler in the gateway's queue), and every column a reader compares is filled in.
        assert row["sent"] > 0 and row["completed"] >= 0.9 * row["sent"], row
        assert row["goodput_req_s"] > 0 and 0 < row["slo_met_fraction"] <= 1
        assert row["p99_ttft_ms"] >= row["p50_ttft_ms"] > 0
        assert row["tokens_per_joule"] > 0 and row["steady_engine_tokens_per_s"] > 0
        assert 0 <= row["idle_gpus"] < row["gpus"] == 4
        results = json.loads((out / row["config"] / "results.json").read_text())
        run = results["runs"][0]
        assert run["energy_source"] == "modeled"
        assert {w["center"] for w in run["energy_by_worker"]} == {"bj", "sh", "gz"}
        lines = (out / row["config"] / "requests.jsonl").read_text().splitlines()
        assert len(lines) == row["sent"]
    # The gateway names the worker of every request; vllm-router does not.
    first = json.loads((out / "idlegrid-slo_pack" / "requests.jsonl").read_text().splitlines()[0])
    assert first["worker"].split("-")[0] in {"bj", "sh", "gz"}
    assert summary["targets_at_80"]["slo_pack_vs_round_robin_goodput"] > 0

    readme = (out / "README.md").read_text()
    assert "Simulated" in readme and "TTFT ≤ 2000 ms and TPOT ≤ 60 ms" in readme
    for config in configs:
        assert f"| {config} | 80% |" in readme
    for plot in ("policies_vs_load.png", "at_80_percent.png"):
        with Image.open(out / plot) as image:
            assert image.size[0] > 500


def test_a_router_that_cannot_run_is_reported_not_fatal(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(pc, "vllm_router_binary", lambda: None)
    out = tmp_path / "out"
    assert pc.main(["--quick", "--out", str(out), "--policies", "", "--router-policies", "round_robin"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {"vllm-router-round_robin": f"RuntimeError: {pc.VLLM_ROUTER_MISSING}"}
    assert "could not run: RuntimeError: vllm-router is not installed" in (out / "README.md").read_text()
