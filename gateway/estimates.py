"""Running estimates learned from finished answers, shared by all gateways.

- Per model: how long answers run (R1-style reasoning makes this thousands of
  tokens), so a request without `max_tokens` reserves what it will likely use
  rather than a blind default; and how many characters of prompt make a token
  (with the chat template's own tokens), which differs by tokenizer and by
  language (~4 for English BPE, ~1.5 for Chinese), so prompts are counted in
  the engine's tokens without tokenizing them here.
- Per worker: the time per output token measured on its own streams, which
  the SLO-aware policy uses where no profile predicts it.

Both are exponentially weighted averages in Redis. A finished answer only
notes its samples here; `flush` (once a second, from housekeeping) folds all
samples noted since into Redis with one Lua call, so answers cost Redis nothing
on their way out however many finish.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gateway import keys

EWMA = """
-- KEYS: one hash per update. ARGV: 5 per update: field, decay, add, first sample, only_if_exists (1/0).
-- A batch of samples x1..xn applied one by one (v <- v * (1 - alpha) + x * alpha) is
-- v <- v * decay + add; a field without a value starts at the batch's first sample.
-- With only_if_exists, a hash that does not exist (a worker that left) is not created.
for i = 1, #KEYS do
  local j = (i - 1) * 5
  if ARGV[j + 5] == '0' or redis.call('EXISTS', KEYS[i]) == 1 then
    local old = tonumber(redis.call('HGET', KEYS[i], ARGV[j + 1]) or '') or tonumber(ARGV[j + 4])
    redis.call('HSET', KEYS[i], ARGV[j + 1], tostring(old * tonumber(ARGV[j + 2]) + tonumber(ARGV[j + 3])))
  end
end
return #KEYS
"""

_REFRESH_S = 5.0


class AnswerStats:
    def __init__(self, redis: Redis, *, alpha: float = 0.1):
        self.redis = redis
        self.alpha = alpha
        self._ewma = redis.register_script(EWMA)
        self._output_tokens: dict[str, float] = {}
        self._chars_per_token: dict[str, float] = {}
        self._refreshed_at = 0.0
        # (hash key, field, only if the hash exists) -> [decay, add, first sample]: the samples
        # noted since the last flush, folded as they come (see EWMA)
        self._pending: dict[tuple[str, str, bool], list[float]] = {}

    def observe(self, model: str, worker_id: str, completion_tokens: int, tpot_ms: float | None, finished: bool,
                prompt_chars: int = 0, prompt_tokens: int | None = None) -> None:
        """Note one finished answer; Redis learns it at the next `flush`."""
        if prompt_chars > 0 and prompt_tokens:
            self._note((keys.MODEL_STATS, f"{model}:prompt_chars_per_token", False), prompt_chars / prompt_tokens)
        # Only answers that ran to their natural end say how long answers are.
        if finished and completion_tokens > 0:
            self._note((keys.MODEL_STATS, f"{model}:output_tokens", False), float(completion_tokens))
        if tpot_ms is not None:
            self._note((keys.worker(worker_id), "tpot_ms", True), round(tpot_ms, 3))

    def _note(self, average: tuple[str, str, bool], x: float) -> None:
        folded = self._pending.get(average)
        if folded is None:
            folded = self._pending[average] = [1.0, 0.0, x]
        folded[0] *= 1 - self.alpha
        folded[1] = folded[1] * (1 - self.alpha) + x * self.alpha

    async def flush(self) -> None:
        """Fold every sample noted since the last flush into the shared averages (one call).
        Samples noted while Redis is away are lost: they are estimates."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        script_keys: list[str] = []
        args: list[str | int] = []
        for (key, field, only_if_exists), (decay, add, first) in pending.items():
            script_keys.append(key)
            args += [field, repr(decay), repr(add), repr(first), int(only_if_exists)]
        await self._ewma(keys=script_keys, args=args)

    async def refresh(self) -> None:
        if time.monotonic() - self._refreshed_at < _REFRESH_S:
            return
        self._refreshed_at = time.monotonic()
        raw = await self.redis.hgetall(keys.MODEL_STATS)
        for field, value in raw.items():
            name = field.decode()
            model, _, stat = name.rpartition(":")
            if stat == "output_tokens":
                self._output_tokens[model] = float(value)
            elif stat == "prompt_chars_per_token":
                self._chars_per_token[model] = float(value)

    def prompt_tokens(self, model: str, prompt_chars: int) -> int:
        """Tokens a prompt of that many characters makes on this model's engines
        (4 characters a token until answers have said otherwise)."""
        return int(prompt_chars / self._chars_per_token.get(model, 4.0)) + 1

    def expected_output_tokens(self, model: str, max_tokens: int | None, default: int) -> int:
        """Output tokens a reservation counts: the model's usual answer length,
        never more than the request's own cap."""
        typical = self._output_tokens.get(model)
        expected = int(typical * 1.2) if typical else default  # a little headroom over the mean
        return min(expected, max_tokens) if max_tokens else expected
