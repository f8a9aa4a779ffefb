"""What the gateway learns from finished answers (real Redis): how long a model's
answers run, and how many prompt characters make one of its tokens, so the next
request's reservation counts what it will really hold."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gateway.estimates import AnswerStats


def test_answers_teach_every_gateway_the_answer_length_and_the_prompt_token_size(redis_url):
    async def scenario() -> tuple[list[int], list[int]]:
        redis = aioredis.Redis.from_url(redis_url)
        learner, other = AnswerStats(redis), AnswerStats(redis)
        before = [other.expected_output_tokens("r1", None, 512), other.prompt_tokens("r1", 1_000)]
        # Reasoning answers of ~3,000 tokens, behind prompts that make a token of every
        # 1.5 characters (Chinese text, say): 900 characters were 600 tokens.
        for i in range(60):
            learner.observe("r1", "w1", 3_000 + (i % 3 - 1) * 100, 20.0, True, prompt_chars=900, prompt_tokens=600)
        # A cut-off answer (max_tokens) says nothing about how long answers run.
        learner.observe("r1", "w1", 10, 20.0, False)
        await learner.flush()
        other._refreshed_at = -1e9  # as if its 5 s refresh were due
        await other.refresh()
        after = [other.expected_output_tokens("r1", None, 512), other.prompt_tokens("r1", 1_000)]
        assert other.expected_output_tokens("r1", 100, 512) == 100, "never more than the request's own cap"
        await redis.aclose()
        return before, after

    (output_before, prompt_before), (output_after, prompt_after) = asyncio.run(scenario())
    assert (output_before, prompt_before) == (512, 251), "nothing learned yet: the default, 4 characters a token"
    assert 3_400 <= output_after <= 3_800, "about the mean answer, with a little headroom"
    assert 640 <= prompt_after <= 700, "1,000 characters at ~1.5 a token"
