"""The simulated engine's core: a continuous-batching scheduler on a modelled GPU.

One asyncio task per engine runs the batch, like vLLM's engine core: each step
it admits waiting requests while there are free sequence slots and KV blocks,
computes one decode token for every running sequence plus prefill chunks up to
the step's token budget, sleeps for the modelled step time (divided by the time
scale), then appends the next token to each sequence and wakes whoever is
reading it. HTTP handlers never run per token; they drain whatever tokens have
arrived when they get to run. When the process cannot keep up with the time
scale, steps run back to back in short bursts, so readers find several tokens
at once and send fewer, larger chunks (vLLM's API server coalesces the same way
when it falls behind); the simulated clock then runs late, and `lag_seconds`
says by how much.

Time: the engine keeps a simulated clock. A busy step advances it by the
modelled step time; idle periods advance it by wall time x time scale. Energy
integrates the modelled power over that clock, so tokens per joule mean the
same at any time scale.

Lifecycle follows vLLM (`VLLM_SERVER_DEV_MODE=1`, see docs/engine-contract.md):
pause `abort` ends every running and waiting request with finish_reason "abort"
(a sequence mid-step still gets that step's token), `wait` lets them finish,
`keep` freezes them; while paused, new requests are accepted and held (counted
as neither running nor waiting) until resume. Sleep pauses (abort by default),
then moves the weights off the GPU for the modelled time; wake_up brings them
back and resumes. Unlike vLLM, whose /resume would schedule work on a sleeping
GPU, resume does nothing until wake_up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from .profiles import BLOCK_SIZE, MAX_NUM_BATCHED_TOKENS, PerfModel, ProfileError, get_gpu, get_model
from .tokens import EOS, LengthDistribution, SequenceState

UNPAUSED, PAUSED_NEW, PAUSED_ALL = "unpaused", "paused_new", "paused_all"
PAUSE_MODES = ("abort", "wait", "keep")
FINISH_REASONS = ("stop", "length", "abort")
MAX_LAG_S = 0.05  # wall time the step loop may fall behind before it stops catching up
BURST_AFTER_LAG_S = 0.01  # behind by more than this, steps run back to back in bursts...
MAX_BURST_S = 0.002  # ...of at most this much wall time...
MAX_BURST_STEPS = 16  # ...and this many steps, so a lagging stream still comes in chunks of a few tokens


@dataclass
class SimConfig:
    gpu: str = "h100"
    model: str = "deepseek-r1-distill-qwen-1.5b"
    port: int = 0  # 0: any free port
    host: str = "127.0.0.1"
    time_scale: float = 1.0
    seed: int = 0
    max_num_seqs: int = 256
    max_model_len: int | None = None  # default: the model profile's
    api_key: str | None = None
    extra_latency_ms: float = 0.0  # a center's round trip, added to every response
    served_model_name: str | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS


class SimRequest:
    """One sequence in the engine. Tokens land in `output_ids`; readers wait on `_ready`."""

    __slots__ = (
        "id", "prompt_ids", "max_tokens", "ignore_eos", "state", "output_ids",
        "finish_reason", "computed", "blocks", "counted_prompt", "in_batch", "_ready", "_delivered",
    )

    def __init__(self, request_id: str, prompt_ids: list[int], max_tokens: int, ignore_eos: bool, state: SequenceState):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.state = state
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.computed = 0  # tokens whose KV is in the cache
        self.blocks = 0
        self.counted_prompt = False
        self.in_batch = False  # in the engine's running list
        self._ready = asyncio.Event()
        self._delivered = 0

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Step:
    work: list[tuple[SimRequest, int]] = field(default_factory=list)  # (request, tokens computed)
    tokens: int = 0
    kv_tokens: int = 0
    seconds: float = 0.0
    power_w: float = 0.0


class SimEngine:
    """A simulated vLLM engine on one GPU. Start it with `start()` inside a running loop."""

    def __init__(self, config: SimConfig | None = None, **overrides) -> None:
        config = config or SimConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown SimEngine option {key!r}")
            setattr(config, key, value)
        if config.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if config.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.config = config
        self.gpu = get_gpu(config.gpu)
        self.model = get_model(config.model)
        self.perf = PerfModel(self.gpu, self.model, config.gpu_memory_utilization)
        self.max_model_len = config.max_model_len or self.model.max_model_len
        if self.max_model_len > self.perf.kv_capacity_tokens:
            raise ProfileError(
                f"max_model_len {self.max_model_len} is more than the {self.perf.kv_capacity_tokens} "
                f"tokens of KV cache that {self.model.id} leaves on {self.gpu.id}"
            )
        self.model_name = config.served_model_name or self.model.id
        self.lengths = LengthDistribution(
            self.model.mean_reasoning_tokens, self.model.reasoning_sigma,
            self.model.mean_answer_tokens, self.model.answer_sigma, self.max_model_len,
        )
        self.time_scale = float(config.time_scale)
        self.num_gpu_blocks = self.perf.num_gpu_blocks
        self._init_batch()

        # The simulated clock and the energy it carries.
        self.sim_seconds = 0.0
        self.busy_seconds = 0.0  # simulated time spent running steps
        self.lag_seconds = 0.0  # wall time the steps ran late because the CPU could not keep up
        self.energy_j = 0.0
        self.power_w = self.gpu.idle_w
        self._idle_since: float | None = time.monotonic()
        self._anchor_wall = 0.0
        self._anchor_sim = 0.0

    def _init_batch(self) -> None:
        """The empty batch, lifecycle state and counters (engines that run a real
        model on a real GPU share these; see workers.torch_engine)."""
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.held: list[SimRequest] = []  # arrived while paused
        self.free_blocks = self.num_gpu_blocks
        self.pause_state = UNPAUSED
        self.sleep_level = 0
        self._drain_waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._in_flight: _Step | None = None  # the step being "computed" right now

        # Counters, as vLLM's /metrics exposes them.
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0
        self.finished_total = dict.fromkeys(FINISH_REASONS, 0)

    # --- requests ---------------------------------------------------------------------

    def new_sequence(self, prompt_ids: Sequence[int], seed: int | None) -> SequenceState:
        return SequenceState(self.lengths, self.config.seed if seed is None else seed, prompt_ids)

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> SimRequest:
        """Queue a request. `max_tokens` must already fit in max_model_len."""
        state = self.new_sequence(prompt_ids, seed)
        request = SimRequest(request_id, prompt_ids, max_tokens, ignore_eos, state)
        if self.pause_state == UNPAUSED:
            self.waiting.append(request)
            self._wake.set()
        else:
            self.held.append(request)
        return request

    async def stream(self, request: SimRequest) -> AsyncIterator[tuple[list[int], str | None]]:
        """Yield (new token ids, finish reason or None) until the request finishes."""
        while True:
            produced = len(request.output_ids)
            if request._delivered < produced or request.finished:
                new = request.output_ids[request._delivered:produced]
                request._delivered = produced
                yield new, request.finish_reason
                if request.finished:
                    return
            else:
                request._ready.clear()
                await request._ready.wait()

    async def result(self, request: SimRequest) -> SimRequest:
        """Wait until the request finishes."""
        while not request.finished:
            request._ready.clear()
            await request._ready.wait()
        return request

    def abort(self, request: SimRequest) -> None:
        """End a request now (client gone): its slot and KV blocks free at once."""
        if request.finished:
            return
        if request.in_batch:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.held:
            self.held.remove(request)
        self._finish(request, "abort")
        self._check_drained()

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-engine-{self.model_name}")

    async def stop(self) -> None:
        for request in [*self.running, *self.waiting, *self.held]:
            self._finish(request, "abort")
        self.running.clear()
        self.waiting.clear()
        self.held.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.config.port}"

    @property
    def is_paused(self) -> bool:
        return self.pause_state != UNPAUSED

    @property
    def is_sleeping(self) -> bool:
        return self.sleep_level > 0

    async def pause(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"Invalid pause mode: {mode}")
        if mode == "keep":
            self.pause_state = PAUSED_ALL
            return
        self.pause_state = PAUSED_NEW
        if mode == "abort":
            self._abort_in_flight()
        elif self.running or self.waiting:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def resume(self) -> None:
        if self.is_sleeping:
            return  # vLLM resumes scheduling only once the weights are back
        self.pause_state = UNPAUSED
        self.waiting.extend(self.held)
        self.held.clear()
        self._wake.set()

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        await self.pause(mode)
        if level < 1 or self.is_sleeping:
            return
        await self._leave_gpu(level)
        self.sleep_level = level
        # The KV cache is gone: kept requests recompute their context on wake-up.
        for request in self.running:
            request.computed = request.blocks = 0
            request.in_batch = False
        self.waiting.extendleft(reversed(self.running))
        self.running.clear()
        self.free_blocks = self.num_gpu_blocks

    async def wake_up(self) -> None:
        if self.is_sleeping:
            await self._return_to_gpu(self.sleep_level)
            self.sleep_level = 0
        self.resume()

    async def _leave_gpu(self, level: int) -> None:
        """Free the GPU for sleep `level`: here, the modelled time to move or drop the weights."""
        await asyncio.sleep(self.perf.sleep_seconds(level) / self.time_scale)

    async def _return_to_gpu(self, level: int) -> None:
        """Undo `_leave_gpu(level)`: here, the modelled time to bring the weights back."""
        await asyncio.sleep(self.perf.wake_seconds(level) / self.time_scale)

    # --- what /metrics reports --------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)  # like vLLM, requests held by a pause count as neither running nor waiting

    @property
    def kv_cache_usage(self) -> float:
        return (self.num_gpu_blocks - self.free_blocks) / self.num_gpu_blocks

    def energy_now(self) -> float:
        """Joules so far, including the idle time up to this moment."""
        self._account_idle()
        return self.energy_j

    # --- the step loop ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        yielded_at, burst = loop.time(), 0
        while True:
            step = self._schedule()
            if step is None:
                self._go_idle()
                self._wake.clear()
                await self._wake.wait()
                yielded_at, burst = loop.time(), 0
                continue
            now = loop.time()
            if self._idle_since is not None:
                self._account_idle()
                self._idle_since = None
                self._anchor_wall, self._anchor_sim = now, self.sim_seconds
            self._in_flight = step
            self.power_w = step.power_w
            self.sim_seconds += step.seconds
            self.busy_seconds += step.seconds
            self.energy_j += step.power_w * step.seconds
            delay = self._anchor_wall + (self.sim_seconds - self._anchor_sim) / self.time_scale - now
            burst += 1
            if delay > 0:
                await asyncio.sleep(delay)
                yielded_at, burst = loop.time(), 0
            else:
                if delay < -MAX_LAG_S:  # the CPU cannot keep up: run late rather than burst later
                    self.lag_seconds -= delay
                    self._anchor_wall, self._anchor_sim = now, self.sim_seconds
                if delay > -BURST_AFTER_LAG_S or now - yielded_at > MAX_BURST_S or burst >= MAX_BURST_STEPS:
                    # Let readers run after each step. Only when well behind schedule do
                    # steps run in bursts, so readers find several tokens waiting and send
                    # fewer, larger chunks (as vLLM's API server does when it falls behind).
                    await asyncio.sleep(0)
                    yielded_at, burst = loop.time(), 0
            self._apply(step)

    def _go_idle(self) -> None:
        if self._idle_since is None:
            self._idle_since = time.monotonic()
        self.power_w = self.gpu.idle_w

    def _account_idle(self) -> None:
        if self._idle_since is None:
            return
        now = time.monotonic()
        seconds = (now - self._idle_since) * self.time_scale
        self._idle_since = now
        self.sim_seconds += seconds
        self.energy_j += self.gpu.idle_w * seconds

    def _schedule(self) -> _Step | None:
        if self.pause_state == PAUSED_ALL or self.is_sleeping:
            return None
        step = _Step()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            tokens = min(request.context_len - request.computed, budget)
            if not self._reserve(request, request.computed + tokens):
                continue  # it was preempted itself, and was the last one running
            step.work.append((request, tokens))
            budget -= tokens
            index += 1
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            tokens = min(request.context_len - request.computed, budget)
            needed = -(-(request.computed + tokens) // BLOCK_SIZE) - request.blocks
            if needed > self.free_blocks:
                break
            self.waiting.popleft()
            self.running.append(request)
            request.in_batch = True
            self._take_blocks(request, needed)
            step.work.append((request, tokens))
            budget -= tokens
        if not step.work:
            return None
        step.tokens = sum(tokens for _, tokens in step.work)
        step.kv_tokens = sum(request.computed + tokens for request, tokens in step.work)
        self._price(step)
        return step

    def _price(self, step: _Step) -> None:
        """The step's modelled time and power."""
        step.seconds = self.perf.step_seconds(step.tokens, step.kv_tokens, len(step.work))
        step.power_w = self.perf.power_watts(step.tokens)

    def _reserve(self, request: SimRequest, tokens: int) -> bool:
        """Blocks for `tokens` of KV, preempting the newest requests if needed (as vLLM does)."""
        needed = -(-tokens // BLOCK_SIZE) - request.blocks
        while needed > self.free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        self._take_blocks(request, needed)
        return True

    def _take_blocks(self, request: SimRequest, count: int) -> None:
        if count > 0:
            request.blocks += count
            self.free_blocks -= count

    def _preempt(self, request: SimRequest) -> None:
        self.running.remove(request)
        request.in_batch = False
        self.free_blocks += request.blocks
        request.blocks = request.computed = 0
        self.waiting.appendleft(request)
        self.preemptions_total += 1

    def _apply(self, step: _Step) -> None:
        self._in_flight = None
        for request, tokens in step.work:
            if not request.in_batch:
                continue  # aborted while the step ran
            request.computed += tokens
            if request.computed < request.context_len:
                continue  # a prefill chunk; more to come
            reason = self._emit_token(request)
            if reason is None:
                request._ready.set()
            else:
                self.running.remove(request)
                self._finish(request, reason)
        self._check_drained()

    def _emit_token(self, request: SimRequest) -> str | None:
        """Append the request's next token; return why it finished, if it did."""
        if not request.counted_prompt:
            request.counted_prompt = True
            self.prompt_tokens_total += len(request.prompt_ids)
        token = request.state.next_token()
        request.state.feed(token)
        request.output_ids.append(token)
        self.generation_tokens_total += 1
        if token == EOS and not request.ignore_eos:
            return "stop"
        if len(request.output_ids) >= request.max_tokens or request.context_len >= self.max_model_len:
            return "length"
        return None

    def _abort_in_flight(self) -> None:
        """pause/sleep with mode=abort: every scheduled request ends now. A sequence
        decoding in the step under way still gets that step's token, as in vLLM,
        whose abort chunk carries the last token."""
        step, self._in_flight = self._in_flight, None
        decoding = {id(r) for r, tokens in (step.work if step else ()) if r.computed + tokens >= r.context_len}
        for request in [*self.running, *self.waiting]:
            reason = self._emit_token(request) if id(request) in decoding and request.in_batch else None
            self._finish(request, reason or "abort")
        self.running.clear()
        self.waiting.clear()
        self._check_drained()

    def _finish(self, request: SimRequest, reason: str) -> None:
        if request.finished:
            return
        request.in_batch = False
        request.finish_reason = reason
        self.free_blocks += request.blocks
        request.blocks = 0
        self.finished_total[reason] += 1
        request._ready.set()

    def _check_drained(self) -> None:
        if self._drain_waiters and not self.running and not self.waiting:
            for waiter in self._drain_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._drain_waiters.clear()
