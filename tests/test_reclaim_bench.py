"""`python -m benchmarks.reclaim`: the storm's schedule, and a small live run
(real gateway, Redis, sim worker agents, vllm-router where installed) leaving
results.json, a plot and a README that says what ran."""

from __future__ import annotations

import json
from pathlib import Path

import workers.vllm_launch
from benchmarks import reclaim
from benchmarks.policy_compare import vllm_router_binary


def test_storm_reclaims_30_percent_each_period_and_returns_them_half_a_period_later():
    events = reclaim.storm_schedule(10, periods=5, period=60.0, share=0.3, seed=7)
    reclaims = [e for e in events if e[1] == "reclaim"]
    returns = [e for e in events if e[1] == "return"]
    assert [t for t, _, _ in reclaims] == [15.0, 75.0, 135.0, 195.0, 255.0]
    assert [t for t, _, _ in returns] == [45.0, 105.0, 165.0, 225.0, 285.0]
    assert all(len(idx) == 3 == len(set(idx)) and set(idx) <= set(range(10)) for _, _, idx in events)
    assert [idx for _, _, idx in reclaims] == [idx for _, _, idx in returns]  # the same workers come back
    assert len({tuple(idx) for _, _, idx in reclaims}) > 1  # a fresh share each wave
    assert events == reclaim.storm_schedule(10, periods=5, period=60.0, share=0.3, seed=7)  # repeatable


def test_small_live_run_leaves_results_plot_and_readme(tmp_path: Path):
    out = tmp_path / "out"
    argv = ["--workers", "3", "--cycles", "2", "--period", "4", "--periods", "1", "--time-scale", "20",
            "--rate", "1", "--no-vllm", "--out", str(out)]
    assert reclaim.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    sim = results["timings"]["sim"]
    assert len(sim["cycles"]) == 2
    for cycle in sim["cycles"]:
        assert 0 < cycle["reclaim_seconds"] < 5 and 0 < cycle["wake_seconds"] < 5
        assert cycle["unlink_to_ready_s"] >= 1.0  # the agent waits --wake-after 1 before waking
    assert sim["reclaim_seconds"]["min"] <= sim["reclaim_seconds"]["median"] <= sim["reclaim_seconds"]["max"]
    storm = results["storm"]["idlegrid"]
    assert storm["sent"] == storm["completed"] == 4 and storm["tokens_lost"] == 0
    router = results["storm"]["vllm-router"]
    assert ("completed" in router) == (vllm_router_binary() is not None)

    readme = (out / "README.md").read_text()
    assert f"Run: `python -m benchmarks.reclaim {' '.join(argv)}` on {results['config']['when']}" in readme
    assert "1 of 3 workers (33%) are reclaimed and returned 2 s later" in readme
    assert "Not run: `--no-vllm`." in readme
    assert "| idlegrid | 4 | 4 | 0 | 0 | 0 |" in readme
    assert (out / "reclaim.png").stat().st_size > 10_000


def test_without_vllm_the_readme_says_why_the_real_engine_was_not_run(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(workers.vllm_launch, "vllm_missing_reason", lambda: "vLLM is not installed")
    assert reclaim.main(["--vllm-only", "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "Not run: vLLM is not installed." in readme
    assert "### 1a. Simulated engines\n\nNot run (`--vllm-only`)." in readme
    assert json.loads((tmp_path / "results.json").read_text())["timings"]["vllm"] == {"skipped": "vLLM is not installed"}
