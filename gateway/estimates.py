"""Running estimates learned from finished answers, shared by all gateways.

- Per model: how long answers run (R1-style reasoning makes this thousands of
  tokens), so a request without `max_tokens` reserves what it will likely use
  rather than a blind default.
- Per worker: the time per output token measured on its own streams, which
  the SLO-aware policy uses where no profile predicts it.

Both are exponentially weighted averages updated in Redis with one Lua call.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gateway import keys

EWMA = """
-- KEYS: hash; ARGV: field, sample, alpha, only_if_exists_key
if ARGV[4] ~= '' and redis.call('EXISTS', ARGV[4]) == 0 then return false end
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '')
local x = tonumber(ARGV[2])
local new = x
if old then new = old * (1 - tonumber(ARGV[3])) + x * tonumber(ARGV[3]) end
redis.call('HSET', KEYS[1], ARGV[1], tostring(new))
return tostring(new)
"""

_REFRESH_S = 5.0


class AnswerStats:
    def __init__(self, redis: Redis, *, alpha: float = 0.1):
        self.redis = redis
        self.alpha = alpha
        self._ewma = redis.register_script(EWMA)
        self._output_tokens: dict[str, float] = {}
        self._refreshed_at = 0.0

    async def observe(self, model: str, worker_id: str, completion_tokens: int, tpot_ms: float | None, finished: bool) -> None:
        # Only answers that ran to their natural end say how long answers are.
        if finished and completion_tokens > 0:
            await self._ewma(keys=[keys.MODEL_STATS], args=[f"{model}:output_tokens", completion_tokens, self.alpha, ""])
        if tpot_ms is not None:
            await self._ewma(keys=[keys.worker(worker_id)], args=["tpot_ms", round(tpot_ms, 3), self.alpha, keys.worker(worker_id)])

    async def refresh(self) -> None:
        if time.monotonic() - self._refreshed_at < _REFRESH_S:
            return
        self._refreshed_at = time.monotonic()
        raw = await self.redis.hgetall(keys.MODEL_STATS)
        for field, value in raw.items():
            name = field.decode()
            if name.endswith(":output_tokens"):
                self._output_tokens[name.rsplit(":", 1)[0]] = float(value)

    def expected_output_tokens(self, model: str, max_tokens: int | None, default: int) -> int:
        """Output tokens a reservation counts: the model's usual answer length,
        never more than the request's own cap."""
        typical = self._output_tokens.get(model)
        expected = int(typical * 1.2) if typical else default  # a little headroom over the mean
        return min(expected, max_tokens) if max_tokens else expected
