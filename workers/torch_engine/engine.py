"""A real engine: the simulated engine's scheduler, stepping a real model.

`TorchEngine` is a `SimEngine` whose steps are computed rather than modelled.
The scheduler is the simulator's (continuous batching under max_num_seqs and a
per-step token budget, chunked prefill, pause and sleep as vLLM does them); each
step, instead of sleeping for a modelled time, runs the step's prefill chunks
and one batched decode forward on the GPU, in a worker thread so the HTTP loop
stays live, and each sequence's next token is the model's greedy pick. Time is
wall time. Energy is not modelled at all: the worker agent meters the GPU
through NVML, as it does for vLLM.

Every running sequence owns one slot of the KV cache, max_model_len tokens
long, so the cache never runs short and nothing is preempted. Sleep level 1
frees the KV cache and moves the weights to host memory; level 2 drops the
weights as well, and wake_up rebuilds them from the seed (the same weights).
Unlike vLLM, a pause with mode=abort gives sequences decoding at that moment
no last token: the step under way has not picked it yet.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.sim.engine import SimEngine, SimRequest, _Step
from workers.sim.profiles import BLOCK_SIZE, MAX_NUM_BATCHED_TOKENS
from workers.sim.tokens import END_THINK, EOS, PIECE_IDS

from .model import Chunk, ModelConfig, ModelRunner, get_config

log = logging.getLogger(__name__)

# What the model may say: the tokenizer's words, punctuation and line breaks, the
# end of reasoning and end of sentence; so its gibberish decodes to readable text.
OUTPUT_IDS = (*sorted(PIECE_IDS.values()), END_THINK, EOS)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TorchConfig:
    model: str = "tiny"  # the model shape, a name in model.CONFIGS
    device: str = "auto"  # auto: cuda if there is one, else cpu
    dtype: str | None = None  # default bfloat16 on CUDA, float32 on CPU
    port: int = 0  # 0: any free port
    host: str = "127.0.0.1"
    seed: int = 0  # of the weights
    max_num_seqs: int = 64
    max_model_len: int = 2048
    api_key: str | None = None
    served_model_name: str | None = None  # default torch-<config>
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS

    @property
    def gpu_memory_utilization(self) -> None:
        """vLLM sizes its KV cache by this; here max_num_seqs x max_model_len does."""
        return None


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer and /metrics read about the model (as they read a sim ModelProfile)."""

    id: str
    shape: ModelConfig
    kv_bytes_per_token: int
    hf_id: str | None = None  # random weights: no checkpoint

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab_size


@dataclass(frozen=True)
class Device:
    id: str  # cuda:0, cpu
    name: str  # NVIDIA H100 80GB HBM3, or the CPU


class NextToken:
    """A request's `state` (the simulator's `SequenceState`): the model's pick from the last step."""

    __slots__ = ("token",)

    def __init__(self) -> None:
        self.token: int | None = None

    def next_token(self) -> int:
        assert self.token is not None, "no step has picked a token yet"
        return self.token

    def feed(self, token: int) -> None:
        pass  # the KV cache holds the context


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class TorchEngine(SimEngine):
    """A random-weight Llama on one device, served like a vLLM engine. Start it with `start()` inside a running loop."""

    time_scale = 1.0  # wall time
    lag_seconds = 0.0  # a real engine cannot run late on its own clock
    power_w = None  # measured by the worker agent (NVML), not here

    def __init__(self, config: TorchConfig | None = None, **overrides) -> None:
        config = config or TorchConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown TorchEngine option {key!r}")
            setattr(config, key, value)
        if config.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if config.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if config.dtype is not None and config.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {config.dtype!r}; known: {', '.join(DTYPES)}")
        self.config = config
        shape = get_config(config.model)
        device = resolve_device(config.device)
        dtype = DTYPES[config.dtype] if config.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.gpu = Device(str(device), torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU")
        self.model = ServedModel(f"torch-{shape.name}", shape, shape.kv_bytes_per_token(dtype))
        self.model_name = config.served_model_name or self.model.id
        self.max_model_len = config.max_model_len
        self.dtype = dtype
        started = time.perf_counter()
        self.runner = ModelRunner(shape, max_num_seqs=config.max_num_seqs, max_len=config.max_model_len,
                                  device=device, dtype=dtype, seed=config.seed, output_ids=OUTPUT_IDS)
        self.build_seconds = time.perf_counter() - started
        # A slot of max_model_len tokens per sequence: the scheduler's blocks never run out.
        self.num_gpu_blocks = config.max_num_seqs * -(-config.max_model_len // BLOCK_SIZE)
        self._init_batch()
        self._slots: dict[SimRequest, int] = {}
        self._free_slots = list(range(config.max_num_seqs))  # a heap: the lowest free slot first, so a batch's slots stay close
        self._idle = asyncio.Event()  # no forward pass under way
        self._idle.set()
        self.steps_total = 0
        self.busy_seconds = 0.0  # wall time in forward passes

    def new_sequence(self, prompt_ids: Sequence[int], seed: int | None) -> NextToken:
        return NextToken()  # greedy: the seed changes nothing

    def energy_now(self) -> None:
        return None  # the GPU's meter is read by the worker agent

    # --- the step loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            step = self._schedule()
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._in_flight = step
            chunks = self._chunks(step)
            self._idle.clear()
            started = time.perf_counter()
            try:
                picks = await asyncio.to_thread(self.runner.step, chunks)
            except Exception:
                log.exception("a forward pass failed; ending the %d request(s) in it", len(step.work))
                self._fail(step)
                continue
            finally:
                self._idle.set()
            self.busy_seconds += time.perf_counter() - started
            self.steps_total += 1
            for (request, _), token in zip(step.work, picks):
                request.state.token = token
            self._apply(step)

    def _price(self, step: _Step) -> None:
        pass  # the step's time is measured, and its energy metered by NVML

    def _chunks(self, step: _Step) -> list[Chunk]:
        """The step's work as the model's input: each request's next tokens in its slot."""
        for request in [r for r in self._slots if not r.in_batch]:  # finished, aborted or sent back to wait
            heapq.heappush(self._free_slots, self._slots.pop(request))
        chunks = []
        for request, count in step.work:
            slot = self._slots.get(request)
            if slot is None:
                slot = self._slots[request] = heapq.heappop(self._free_slots)
            chunks.append(Chunk(slot, request.computed, _tokens(request, request.computed, count)))
        return chunks

    def _fail(self, step: _Step) -> None:
        self._in_flight = None
        for request, _ in step.work:
            if request.in_batch:
                self.running.remove(request)
                self._finish(request, "abort")
        self._check_drained()

    def _abort_in_flight(self) -> None:
        # The simulator hands sequences decoding in the step under way that step's
        # token, as vLLM does; here the model has not picked it yet, so they get none.
        self._in_flight = None
        super()._abort_in_flight()

    # --- sleep: real memory, really freed ---------------------------------------------

    async def _leave_gpu(self, level: int) -> None:
        await self._idle.wait()  # the forward pass under way still reads the weights and cache
        started = time.perf_counter()
        await asyncio.to_thread(self.runner.offload, level)
        log.info("asleep at level %d in %.2fs", level, time.perf_counter() - started)

    async def _return_to_gpu(self, level: int) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(self.runner.restore)
        log.info("awake after %.2fs", time.perf_counter() - started)


def _tokens(request: SimRequest, start: int, count: int) -> list[int]:
    """Tokens start..start+count-1 of the request's prompt followed by its output."""
    prompt = request.prompt_ids
    head = prompt[start:start + count]
    tail = request.output_ids[max(0, start - len(prompt)):max(0, start + count - len(prompt))]
    return head + tail
