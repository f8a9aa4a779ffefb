"""GPU and model profiles, and the performance and power model built on them.

Everything here is a plain function of published numbers, so that a simulated
fleet behaves like real GPUs in the ways a scheduler can notice: how many
sequences fit, how long prefill and each decode step take, and how much power
the GPU draws while doing it.

Sources
-------
GPUs (datasheets; "idle_w" and the host link rate used to move weights when
sleeping were measured on an H100 and are assumptions for the others):

- H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 700 W, 81,559 MiB
  (NVIDIA H100 datasheet; DESIGN field notes). Measured on one (torch 2.11,
  CUDA 13, NVML energy counter): 75 W idle, 55 GB/s pinned host-to-device
  copies (PCIe Gen5 x16), 3.0 TB/s device copies, 766 TFLOP/s bf16 GEMM.
- H200 SXM 141GB: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16 (same Hopper die),
  700 W, 143,771 MiB (NVIDIA H200 datasheet; DESIGN field notes).
- H20 96GB: 4.0 TB/s, ~148 TFLOP/s dense bf16, 400 W (DESIGN field notes).
- A800 80GB SXM (A100-derived): 2.039 TB/s, 312 TFLOP/s dense bf16, 400 W
  (NVIDIA A100 80GB datasheet; A800 differs only in NVLink rate).
- L40S 48GB: 864 GB/s GDDR6, 362 TFLOP/s dense bf16, 350 W (NVIDIA L40S
  datasheet).
- Ascend 910B 64GB: ~1.6 TB/s HBM2e, ~313 TFLOP/s fp16/bf16, ~400 W (public
  reports on the Atlas 800T A2 / 910B3; Huawei publishes few figures, so these
  are the least certain numbers here).
- RTX 4090 24GB: 1,008 GB/s GDDR6X, 165 TFLOP/s dense bf16 with fp32
  accumulate, 450 W (NVIDIA Ada architecture whitepaper).

Models: layers, hidden size, attention and KV heads, head_dim and MLP size from
the `config.json` of each `deepseek-ai/DeepSeek-R1-Distill-Qwen-*` checkpoint
(Qwen2.5 architecture, bf16). The KV cache holds K and V for every layer and KV
head: `2 * layers * kv_heads * head_dim * 2 bytes` per token. Default context
32,768 tokens: the generation limit DeepSeek's model card uses for R1.

Step times (a roofline with measured efficiencies):

- decode step  = (weight bytes + KV bytes of every token attended) / (HBM
  bandwidth * 0.7)  +  2 * params * tokens in the step / (bf16 FLOP/s * 0.5)
  +  a small per-step overhead. DESIGN field notes: real engines reach 60-80% of
  the memory roofline; a bare decode-shaped step (the 7B model's bf16 weight
  matrices times one token per sequence, no attention) took 5.3 ms on the H100
  above, 80% of it, and real steps add attention, norms and sampling. That bare
  step overlaps compute with memory (6.4 ms at 256 sequences), but end-to-end
  vLLM numbers fit the sum of the two terms, which is what this model uses: a
  Llama-3.1-8B profile on an H100 gives 1,030 /
  4,940 / 10,040 tokens/s at 8 / 64 / 512 sequences of ~1k tokens against
  ML.ENERGY's measured 1,070 / 5,147 / 9,806, and 2.1 / 8.1 / 14.6 tokens/J
  against their 2.2 / 8.4 / 14.3; a Qwen3-8B profile with the KV cache full of
  ~4k-token reasoning contexts gives 2,770 tokens/s and 4.4 tokens/J against
  their 3,117 and 4.5 on GPQA (both checked in tests/test_sim_engine.py).
- prefill is the same formula with many tokens in the step, so it is
  compute-bound: 2 * params * prompt tokens / (FLOP/s * 0.5).

Power: ML.ENERGY measured an H100 serving Llama-3.1-8B at 486 / 610 / 688 W with
8 / 64 / 512 sequences per step: 0.66 / 0.86 / 0.98 of its 75-700 W range. At
one sequence the bare decode step above drew 467 W (0.63): streaming the
weights costs most of the power whatever the batch. Every GPU uses that curve
(interpolated in log(batch)) over its own idle..max range, indexed by the
tokens processed in a step, so a prefill step of thousands of tokens runs near
TDP.

Sleep: level 1 copies the weights to host memory and back over the host link
(55 GB/s measured on the H100's PCIe Gen5; 25 GB/s assumed for Gen4 cards);
level 2 drops them and wake-up reloads them from disk or page cache at an
assumed 2 GB/s.

Reasoning lengths: lognormal per model. The DESIGN field notes give ~7.8k mean
output tokens for a reasoning model on hard questions (Qwen3-8B on GPQA);
mixed chat traffic thinks less, and small SFT-distilled models are known to
think longer than larger ones (they stop late and repeat themselves, arXiv
2505.07961). The means below (3,000-4,500 reasoning tokens, ~450 answer
tokens) are assumptions shaped by those facts, not measurements.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

GIB = 1024**3

MEMORY_EFFICIENCY = 0.7  # share of the HBM roofline a decode step reaches
COMPUTE_EFFICIENCY = 0.5  # model FLOPs utilisation of the GEMMs
STEP_OVERHEAD_S = 0.0002  # scheduler, sampling and launch time per step
STEP_OVERHEAD_PER_SEQ_S = 0.000004
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
ACTIVATION_RESERVE_BYTES = 1.5 * GIB  # activations, CUDA graphs, allocator slack
BLOCK_SIZE = 16  # vLLM's KV block size on CUDA
MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's default token budget per step (online serving)
DISK_LOAD_BYTES_PER_S = 2e9  # re-reading weights after sleep level 2 (page cache / NVMe)

# Power curve: (sequences or tokens in a step, fraction of idle..max power).
# Calibrated on ML.ENERGY's H100 points; see the module docstring.
_POWER_CURVE = ((1, 0.627), (8, 0.658), (64, 0.856), (512, 0.981), (4096, 1.0))
_POWER_LOGS = [math.log(b) for b, _ in _POWER_CURVE]


@dataclass(frozen=True)
class GpuProfile:
    id: str
    name: str
    hbm_bytes_per_s: float
    bf16_flops: float
    memory_gib: float
    idle_w: float
    max_w: float
    host_link_bytes_per_s: float  # weights to/from host memory (sleep level 1)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


@dataclass(frozen=True)
class ModelProfile:
    id: str
    hf_id: str
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_model_len: int = 32768
    mean_reasoning_tokens: float = 3500.0
    reasoning_sigma: float = 0.9
    mean_answer_tokens: float = 450.0
    answer_sigma: float = 0.6

    @property
    def params(self) -> int:
        """Parameter count, from the architecture (Qwen2: biases on q, k and v)."""
        h, kv = self.hidden_size, self.kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h + h + 2 * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.layers * per_layer + embeddings + h

    @property
    def weight_bytes(self) -> int:
        return 2 * self.params  # bf16

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


GPUS: dict[str, GpuProfile] = {
    g.id: g
    for g in (
        GpuProfile("h100", "NVIDIA H100 SXM5 80GB", 3.35e12, 989e12, 81559 / 1024, 75, 700, 55e9),
        GpuProfile("h200", "NVIDIA H200 SXM 141GB", 4.8e12, 989e12, 143771 / 1024, 75, 700, 55e9),
        GpuProfile("h20", "NVIDIA H20 96GB", 4.0e12, 148e12, 97871 / 1024, 60, 400, 55e9),
        GpuProfile("a800", "NVIDIA A800 SXM4 80GB", 2.039e12, 312e12, 81920 / 1024, 55, 400, 25e9),
        GpuProfile("l40s", "NVIDIA L40S 48GB", 0.864e12, 362e12, 46068 / 1024, 35, 350, 25e9),
        GpuProfile("910b", "Huawei Ascend 910B 64GB", 1.6e12, 313e12, 64.0, 90, 400, 25e9),
        GpuProfile("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 1.008e12, 165.2e12, 24564 / 1024, 20, 450, 25e9),
    )
}

MODELS: dict[str, ModelProfile] = {
    m.id: m
    for m in (
        ModelProfile(
            "deepseek-r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            layers=28, hidden_size=1536, attention_heads=12, kv_heads=2, head_dim=128,
            intermediate_size=8960, vocab_size=151936, mean_reasoning_tokens=4500,
        ),
        ModelProfile(
            "deepseek-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
            layers=28, hidden_size=3584, attention_heads=28, kv_heads=4, head_dim=128,
            intermediate_size=18944, vocab_size=152064, mean_reasoning_tokens=3800,
        ),
        ModelProfile(
            "deepseek-r1-distill-qwen-14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
            layers=48, hidden_size=5120, attention_heads=40, kv_heads=8, head_dim=128,
            intermediate_size=13824, vocab_size=152064, mean_reasoning_tokens=3300,
        ),
        ModelProfile(
            "deepseek-r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
            layers=64, hidden_size=5120, attention_heads=40, kv_heads=8, head_dim=128,
            intermediate_size=27648, vocab_size=152064, mean_reasoning_tokens=3000,
        ),
    )
}

# Not served by default: the model ML.ENERGY measured, used to check the
# performance and power model against their numbers.
LLAMA_3_1_8B = ModelProfile(
    "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct",
    layers=32, hidden_size=4096, attention_heads=32, kv_heads=8, head_dim=128,
    intermediate_size=14336, vocab_size=128256, max_model_len=131072,
)


class ProfileError(ValueError):
    """An unknown profile id, or a model that does not fit on the GPU."""


def get_gpu(gpu_id: str) -> GpuProfile:
    try:
        return GPUS[gpu_id.lower()]
    except KeyError:
        raise ProfileError(f"unknown gpu {gpu_id!r}; known gpus: {', '.join(GPUS)}") from None


def get_model(model_id: str) -> ModelProfile:
    try:
        return MODELS[model_id.lower()]
    except KeyError:
        raise ProfileError(f"unknown model {model_id!r}; known models: {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class PerfModel:
    """Step times, KV capacity and power of one model on one GPU."""

    gpu: GpuProfile
    model: ModelProfile
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION

    def __post_init__(self) -> None:
        if self.num_gpu_blocks < 1:
            raise ProfileError(
                f"model {self.model.id} ({self.model.weight_bytes / GIB:.1f} GiB of bf16 weights) "
                f"does not fit on gpu {self.gpu.id} ({self.gpu.memory_gib:.0f} GiB)"
            )

    @property
    def kv_cache_bytes(self) -> float:
        usable = self.gpu.memory_bytes * self.gpu_memory_utilization
        return usable - self.model.weight_bytes - ACTIVATION_RESERVE_BYTES

    @property
    def num_gpu_blocks(self) -> int:
        return max(0, int(self.kv_cache_bytes // (BLOCK_SIZE * self.model.kv_bytes_per_token)))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * BLOCK_SIZE

    @property
    def _bytes_per_s(self) -> float:
        return self.gpu.hbm_bytes_per_s * MEMORY_EFFICIENCY

    @property
    def _flops(self) -> float:
        return self.gpu.bf16_flops * COMPUTE_EFFICIENCY

    def step_seconds(self, tokens: int, kv_tokens: int, sequences: int) -> float:
        """One engine step: `tokens` computed (decode and prefill together),
        attending over `kv_tokens` cached tokens, for `sequences` sequences."""
        memory = (self.model.weight_bytes + kv_tokens * self.model.kv_bytes_per_token) / self._bytes_per_s
        compute = 2 * self.model.params * tokens / self._flops
        return memory + compute + STEP_OVERHEAD_S + STEP_OVERHEAD_PER_SEQ_S * sequences

    def decode_tokens_per_s(self, batch: int, context: int) -> float:
        """Steady decode throughput with `batch` sequences of `context` tokens each."""
        return batch / self.step_seconds(batch, batch * context, batch)

    def power_watts(self, tokens_in_step: int) -> float:
        """Modelled board power while running a step of that many tokens."""
        if tokens_in_step <= 0:
            return self.gpu.idle_w
        return self.gpu.idle_w + (self.gpu.max_w - self.gpu.idle_w) * _power_fraction(tokens_in_step)

    # Predicted time per output token: tpot ≈ base + per_1k_kv * (KV tokens / 1000)
    # + per_seq * sequences. The gateway's packing policy reads the first two.
    @property
    def tpot_base_ms(self) -> float:
        return 1000 * (self.model.weight_bytes / self._bytes_per_s + STEP_OVERHEAD_S)

    @property
    def tpot_ms_per_1k_kv(self) -> float:
        return 1000 * 1000 * self.model.kv_bytes_per_token / self._bytes_per_s

    @property
    def tpot_ms_per_seq(self) -> float:
        return 1000 * (2 * self.model.params / self._flops + STEP_OVERHEAD_PER_SEQ_S)

    def sleep_seconds(self, level: int) -> float:
        """Time to leave the GPU: level 1 copies weights to host memory, level 2 drops them."""
        if level == 1:
            return self.model.weight_bytes / self.gpu.host_link_bytes_per_s
        return 0.05 if level == 2 else 0.0

    def wake_seconds(self, level: int) -> float:
        """Time to come back: level 1 copies weights back, level 2 reloads them."""
        if level == 1:
            return self.model.weight_bytes / self.gpu.host_link_bytes_per_s
        if level == 2:
            return self.model.weight_bytes / DISK_LOAD_BYTES_PER_S
        return 0.0


def _power_fraction(tokens: int) -> float:
    x = math.log(max(1, tokens))
    i = bisect.bisect_right(_POWER_LOGS, x)
    if i >= len(_POWER_CURVE):
        return 1.0
    (x0, y0), (x1, y1) = (_POWER_LOGS[i - 1], _POWER_CURVE[i - 1][1]), (_POWER_LOGS[i], _POWER_CURVE[i][1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
