"""gateway/relay.py on real engine bytes: SSE parsing, the reasoning rename,
token tracking, the id rewrite, `</think>` across chunks, usage and errors.

Two sources of bytes, both real: vLLM 0.32's own chunks as captured in
docs/engine-contract.md (copied verbatim below), and whole streams from a
simulated engine served over loopback HTTP, which speaks the same format.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Iterable

import httpx
import pytest

from gateway.relay import (
    ClientStream,
    Collector,
    EngineFailed,
    EventStreamResponse,
    Piece,
    Progress,
    ThinkSplitter,
    pieces_from_chat,
    pieces_from_completion,
    prompt_ids_of,
    sse_events,
)
from workers.sim import EnginesInThread, SimEngine
from workers.sim.tokens import END_THINK

MODEL = "deepseek-r1-distill-qwen-1.5b"
THINK_END_ID = 513  # the tiny vLLM model's `</think>`

# vLLM 0.32.0 (CPU) streaming chat with return_token_ids, from docs/engine-contract.md:
# role chunk with prompt ids, reasoning, the `</think>` chunk (empty delta), content,
# the EOS chunk with finish_reason "stop", usage, [DONE]. (Middle chunks elided there.)
VLLM_CHAT = b"""\
data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":[0,2,511,4,3,512,202],"prompt_text":null}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{"reasoning":"ine"},"logprobs":null,"finish_reason":null,"token_ids":[321]}]}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{"reasoning":"Id"},"logprobs":null,"finish_reason":null,"token_ids":[353]}]}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":null,"token_ids":[513]}]}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{"content":"GP"},"logprobs":null,"finish_reason":null,"token_ids":[350]}]}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null,"token_ids":[511]}]}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null,"token_ids":[1]}]}

data: {"id":"chatcmpl-ab3b713ac7884472","object":"chat.completion.chunk","created":1795351757,"model":"tiny-r1","choices":[],"usage":{"prompt_tokens":7,"total_tokens":111,"completion_tokens":104,"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"vllm-0.32.0-20c952d2"}

data: [DONE]

"""

# Resuming across `</think>` through /v1/completions (no reasoning parser there): the
# tag arrives inside the text of one chunk, between reasoning and answer text.
VLLM_COMPLETION_ACROSS_THINK = b"""\
data: {"id":"cmpl-b4af51b80ee31f21","object":"text_completion","created":1795351770,"model":"tiny-r1","choices":[{"index":0,"text":" Fr","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[0,2,511,4,3,512,202,321,417],"token_ids":[316]}]}

data: {"id":"cmpl-b4af51b80ee31f21","object":"text_completion","created":1795351770,"model":"tiny-r1","choices":[{"index":0,"text":"WhatId</think>GP^","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[359,353,513,350,65]}]}

data: {"id":"cmpl-b4af51b80ee31f21","object":"text_completion","created":1795351770,"model":"tiny-r1","choices":[{"index":0,"text":"Pa","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":[355]}]}

data: {"id":"cmpl-b4af51b80ee31f21","object":"text_completion","created":1795351770,"model":"tiny-r1","choices":[],"usage":{"prompt_tokens":9,"total_tokens":16,"completion_tokens":7},"system_fingerprint":"vllm-0.32.0-20c952d2"}

data: [DONE]

"""

# The engine process killed mid-stream: one chunk, an error event, [DONE].
VLLM_ENGINE_DIED = b"""\
data: {"id":"chatcmpl-b9472e8ec1c39248","object":"chat.completion.chunk","created":1795352984,"model":"tiny-r1","choices":[{"index":0,"delta":{"reasoning":" can"},"logprobs":null,"finish_reason":null,"token_ids":[434]}]}

data: {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.", "type": "InternalServerError", "param": null, "code": 500}}

data: [DONE]

"""


async def arriving(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A body that arrives in exactly these network pieces."""
    for piece in pieces:
        yield piece


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


async def events_of(data: bytes | list[bytes]) -> list[dict]:
    return [e async for batch in sse_events(arriving([data] if isinstance(data, bytes) else data)) for e in batch]


@pytest.fixture(scope="module")
def sim_url():
    with EnginesInThread([SimEngine(time_scale=1000, max_model_len=2048, seed=7)]) as fleet:
        yield fleet.urls[0]


def capture(url: str, path: str, body: dict) -> bytes:
    """The raw body bytes of one streamed answer, as the engine sent them."""
    request = {**body, "model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", url + path, json=request, timeout=30) as r:
        assert r.status_code == 200
        return b"".join(r.iter_raw())


# --- SSE parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("piece_size", [1, 7, 64, 100_000])
async def test_events_are_the_same_however_the_network_splits_the_bytes(piece_size):
    whole = await events_of(VLLM_CHAT)
    assert len(whole) == 8  # seven choice chunks and the usage chunk; [DONE] ends it
    assert await events_of(split_every(VLLM_CHAT, piece_size)) == whole


async def test_crlf_comments_and_multiline_data_are_read_as_sse_defines_them():
    lines = VLLM_CHAT.split(b"\n\n")
    keepalive = b": ping\n\n"
    folded = b'data: {"id":"x","object":"chat.completion.chunk",\ndata: "choices":[]}\n\n'
    crlf = (lines[0] + b"\n\n" + keepalive + folded + b"\n\n".join(lines[1:])).replace(b"\n", b"\r\n")
    events = await events_of(split_every(crlf, 5))
    assert events[0]["prompt_token_ids"] == [0, 2, 511, 4, 3, 512, 202]
    assert events[1] == {"id": "x", "object": "chat.completion.chunk", "choices": []}
    assert len(events) == 9


async def test_nothing_after_done_is_read():
    assert len(await events_of(VLLM_CHAT + VLLM_CHAT)) == 8


async def test_the_events_of_one_network_read_come_together():
    assert [len(batch) async for batch in sse_events(arriving([VLLM_CHAT]))] == [8]
    events = VLLM_CHAT.split(b"\n\n")
    reads = [events[0] + b"\n\n", events[1] + b"\n\n", b"\n\n".join(events[2:])]
    assert [len(batch) async for batch in sse_events(arriving(reads))] == [1, 1, 6]


@pytest.mark.parametrize("piece_size", [13, 100_000])
async def test_error_event_after_output_is_an_engine_failure(piece_size):
    seen = []
    with pytest.raises(EngineFailed) as failure:
        async for batch in sse_events(arriving(split_every(VLLM_ENGINE_DIED, piece_size))):
            seen.extend(batch)
    assert "EngineCore encountered an issue" in failure.value.reason
    assert failure.value.status == 502
    assert [p.token_ids for p in pieces_from_chat(seen[0])] == [[434]]  # what came before is kept


async def test_an_event_that_is_not_json_is_an_engine_failure():
    with pytest.raises(EngineFailed, match="not JSON"):
        await events_of(b'data: {"choices": [\n\ndata: [DONE]\n\n')


async def test_a_long_burst_does_not_hold_the_event_loop():
    """Thousands of events already buffered (an engine far ahead of us) must not
    starve other streams, Redis replies and heartbeats of the gateway."""
    chunk = VLLM_CHAT.split(b"\n\n")[1] + b"\n\n"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    events = await events_of([chunk * 2000 + b"data: [DONE]\n\n"])
    task.cancel()
    assert len(events) == 2000
    assert ticks - before >= 2000 // 64  # the ticker ran many times during the burst


# --- chat: the reasoning rename, token tracking, the id rewrite, usage -------------------


async def test_vllm_chat_reasoning_becomes_reasoning_content_for_the_client():
    client = ClientStream("chat", "tiny-r1", "req42", include_usage=True, return_token_ids=False)
    out = []
    for event in await events_of(VLLM_CHAT):
        for piece in pieces_from_chat(event):
            out.append(client.chunk(piece))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0] == {"role": "assistant"}
    assert deltas[1] == {"reasoning_content": "ine"} and deltas[2] == {"reasoning_content": "Id"}
    assert deltas[3] == {"content": ""}  # the `</think>` token: no text, still a chunk
    assert deltas[4] == {"content": "GP"}
    assert all("reasoning" not in d for d in deltas)
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


async def test_every_token_id_is_tracked_including_think_end_and_eos():
    progress = Progress()
    for event in await events_of(split_every(VLLM_CHAT, 50)):
        if progress.prompt_token_ids is None:
            progress.prompt_token_ids = prompt_ids_of(event)
        if event.get("usage"):
            progress.prompt_tokens = event["usage"]["prompt_tokens"]
        for piece in pieces_from_chat(event):
            progress.record(piece, 1.0)
    assert progress.prompt_token_ids == [0, 2, 511, 4, 3, 512, 202]
    assert progress.output_token_ids == [321, 353, THINK_END_ID, 350, 511, 1]
    assert progress.content_started and not progress.reasoning_open
    assert progress.finish_reason == "stop"
    assert not progress.tokens_untracked


async def test_engine_ids_are_replaced_by_one_id_for_the_whole_answer():
    client = ClientStream("chat", "my-model", "abc123", include_usage=True, return_token_ids=True)
    events = await events_of(VLLM_CHAT)
    sent = []
    for i, event in enumerate(events):
        for piece in pieces_from_chat(event):
            sent.append(json.loads(client.event(piece, prompt_ids_of(event) if i == 0 else None)[6:]))
    assert {c["id"] for c in sent} == {"chatcmpl-abc123"}
    assert {c["model"] for c in sent} == {"my-model"}
    assert sent[0]["prompt_token_ids"] == [0, 2, 511, 4, 3, 512, 202]
    assert all("prompt_token_ids" not in c for c in sent[1:])
    assert [c["choices"][0]["token_ids"] for c in sent[1:]] == [[321], [353], [513], [350], [511], [1]]


def test_event_bytes_are_exactly_the_chunk_serialized():
    pieces = [
        Piece(0, "", "", None, None, {"role": "assistant"}),
        Piece(0, "think", "", [5], None),
        Piece(0, "", "", [513], None),
        Piece(1, "", "answer", [6, 7], "length", None, {"content": []}),
        Piece(0, "", "", None, None, {"tool_calls": [{"id": "t"}]}),
    ]
    for kind in ("chat", "completions"):
        for ids in (True, False):
            client = ClientStream(kind, "m", "id", include_usage=False, return_token_ids=ids)
            for piece in pieces:
                for prompt in (None, [1, 2, 3]):
                    assert client.event(piece, prompt) == client.sse(client.chunk(piece, prompt))


async def test_usage_comes_from_tracked_tokens_and_the_engine_prompt_count():
    client = ClientStream("chat", "tiny-r1", "r", include_usage=True, return_token_ids=False)
    progress = Progress()
    collector = Collector(client)
    for event in await events_of(VLLM_CHAT):
        if event.get("usage"):
            progress.prompt_tokens = event["usage"]["prompt_tokens"]
        for piece in pieces_from_chat(event):
            progress.record(piece, 1.0)
            collector.add(piece)
    usage = client.usage_chunk(progress)
    assert usage["choices"] == [] and usage["id"] == "chatcmpl-r"
    assert usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}
    answer = collector.response(progress)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "GPHello", "reasoning_content": "ineId"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == usage["usage"]


async def test_an_answer_cut_off_while_reasoning_has_null_content_as_from_vllm():
    client = ClientStream("chat", "tiny-r1", "r", include_usage=False, return_token_ids=False)
    progress = Progress()
    collector = Collector(client)
    for event in await events_of(VLLM_CHAT):
        for piece in pieces_from_chat(event):
            if piece.content:
                break  # max_tokens reached before `</think>`
            progress.record(piece, 1.0)
            collector.add(piece)
    message = collector.response(progress)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "reasoning_content": "ineId"}


# --- `</think>` across chunks (resumed answers) ------------------------------------------------


async def test_think_end_inside_a_completion_chunk_splits_reasoning_from_answer():
    splitter = ThinkSplitter(in_reasoning=True)
    pieces = [p for e in await events_of(VLLM_COMPLETION_ACROSS_THINK) for p in pieces_from_completion(e, splitter)]
    assert [(p.reasoning, p.content) for p in pieces] == [(" Fr", ""), ("WhatId", "GP^"), ("", "Pa")]
    chat = ClientStream("chat", "tiny-r1", "r", include_usage=False, return_token_ids=False)
    assert chat.chunk(pieces[1])["choices"][0]["delta"] == {"reasoning_content": "WhatId", "content": "GP^"}
    # A completions client's answer is not split (no splitter): it sees the raw text, tag and all.
    raw = ClientStream("completions", "tiny-r1", "r", include_usage=False, return_token_ids=False)
    unsplit = [p for e in await events_of(VLLM_COMPLETION_ACROSS_THINK) for p in pieces_from_completion(e, None)]
    assert raw.chunk(unsplit[1])["choices"][0]["text"] == "WhatId</think>GP^"
    progress = Progress()
    for p in pieces:
        progress.record(p, 1.0)
    assert progress.output_token_ids == [316, 359, 353, 513, 350, 65, 355]


async def test_an_answer_resumed_after_think_end_is_all_content():
    splitter = ThinkSplitter(in_reasoning=False)
    pieces = [p for e in await events_of(VLLM_COMPLETION_ACROSS_THINK) for p in pieces_from_completion(e, splitter)]
    assert all(p.reasoning == "" for p in pieces)
    assert "".join(p.content for p in pieces) == " FrWhatId</think>GP^Pa"


# --- whole streams from the simulated engine ------------------------------------------------------


async def test_sim_chat_stream_relayed_in_full(sim_url):
    raw = capture(sim_url, "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 1500})
    client = ClientStream("chat", MODEL, "sim1", include_usage=True, return_token_ids=True)
    progress, engine_usage, sent = Progress(), None, []
    for event in await events_of(split_every(raw, 333)):
        if progress.prompt_token_ids is None:
            progress.prompt_token_ids = prompt_ids_of(event)
        if event.get("usage"):
            engine_usage = event["usage"]
        for piece in pieces_from_chat(event):
            progress.record(piece, 1.0)
            sent.append(json.loads(client.event(piece)[6:]))
    assert engine_usage and progress.completion_tokens == engine_usage["completion_tokens"]
    assert END_THINK in progress.output_token_ids
    # The sim, like vLLM under load, packs several tokens into a chunk; the one with
    # `</think>` may carry both parts. Reasoning before it, content after it.
    before, after, position = [], [], 0
    for chunk in sent:
        ids = chunk["choices"][0].get("token_ids") or []
        if END_THINK in ids:
            assert set(chunk["choices"][0]["delta"]) <= {"reasoning_content", "content"}
        elif ids:
            (before if END_THINK not in progress.output_token_ids[:position] else after).append(chunk["choices"][0]["delta"])
        position += len(ids)
    assert before and after
    assert all(set(d) == {"reasoning_content"} for d in before)
    assert all(set(d) == {"content"} for d in after)
    assert {c["id"] for c in sent} == {"chatcmpl-sim1"}


async def test_sim_completion_stream_resumed_mid_reasoning_is_split_by_the_relay(sim_url):
    """The gateway resumes a chat answer through /v1/completions with the tokens so
    far; the text comes back raw and the relay finds `</think>` itself."""
    first = capture(sim_url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 1500, "temperature": 0})
    progress = Progress()
    for event in await events_of(first):
        if progress.prompt_token_ids is None:
            progress.prompt_token_ids = prompt_ids_of(event)
        for piece in pieces_from_chat(event):
            progress.record(piece, 1.0)
    ids = progress.output_token_ids
    cut = ids.index(END_THINK) // 2  # well inside the reasoning
    resumed = capture(sim_url, "/v1/completions",
                      {"prompt": progress.prompt_token_ids + ids[:cut], "max_tokens": len(ids) - cut, "temperature": 0})
    splitter = ThinkSplitter(in_reasoning=True)
    pieces = [p for e in await events_of(split_every(resumed, 97)) for p in pieces_from_completion(e, splitter)]
    assert [t for p in pieces for t in (p.token_ids or [])] == ids[cut:]  # the same tokens, continued exactly
    reasoning = "".join(p.reasoning for p in pieces)
    content = "".join(p.content for p in pieces)
    assert reasoning and content and "</think>" not in reasoning + content
    assert not splitter.in_reasoning


# --- the client's stream: read ahead, coalesced writes, hang-ups ------------------------------


async def respond(chunks: AsyncIterator[bytes], *, hangup: asyncio.Future | None = None, max_pending_bytes: int = 1 << 16,
                  send=None) -> list[bytes]:
    """Serve an EventStreamResponse of `chunks` to an ASGI `send`; the bodies it wrote."""
    writes: list[bytes] = []

    async def record(message: dict) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            writes.append(message["body"])
        if send is not None:
            await send(message)

    async def receive() -> dict:
        raise AssertionError("the response must not read the request: the hangup future listens")

    gone = hangup if hangup is not None else asyncio.get_running_loop().create_future()
    await EventStreamResponse(chunks, hangup=gone, max_pending_bytes=max_pending_bytes)({"type": "http"}, receive, record)
    return writes


async def test_chunks_made_apart_go_out_apart_and_a_burst_goes_out_as_one_write():
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"a%d" % i
            await asyncio.sleep(0.01)  # waiting for the engine: flush what we have
        for i in range(50):
            yield b"b%d" % i  # a burst already buffered: no wait in between

    writes = await respond(chunks())
    assert writes[:3] == [b"a0", b"a1", b"a2"]
    assert b"".join(writes[3:]) == b"".join(b"b%d" % i for i in range(50))
    assert len(writes) - 3 <= 2  # the burst took one write (or two, if the first went early)


async def test_a_slow_client_holds_the_producer_back():
    made = 0
    client_reads = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal made
        for i in range(1000):
            made += 1
            yield b"x"

    async def slow_send(message: dict) -> None:
        if message["type"] == "http.response.body" and not client_reads.is_set():
            await asyncio.sleep(0.01)  # the client is busy; the producer must not run away
            assert made <= len(message["body"]) + 10 + 1  # what it took, and at most max_pending more
            client_reads.set()

    writes = await respond(chunks(), max_pending_bytes=10, send=slow_send)
    assert len(b"".join(writes)) == 1000


async def test_a_client_that_leaves_stops_the_producer_and_its_cleanup_runs():
    cleaned = asyncio.Event()
    hangup = asyncio.get_running_loop().create_future()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield b"tok"
            await asyncio.sleep(10)  # the engine is thinking when the client leaves
        finally:
            # e.g. closing the engine stream, then releasing the reservation: no
            # second cancellation may cut this short.
            await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
            cleaned.set()

    asyncio.get_running_loop().call_later(0.05, hangup.set_result, None)
    writes = await asyncio.wait_for(respond(chunks(), hangup=hangup), 2)
    assert writes == [b"tok"]
    await asyncio.wait_for(cleaned.wait(), 2)


async def test_a_client_gone_before_the_response_starts_still_gets_the_cleanup():
    """The engine stream is open (its slot reserved) once the response exists: a
    client that hangs up before a byte was sent must free it all the same."""
    cleaned = asyncio.Event()
    hangup = asyncio.get_running_loop().create_future()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            await asyncio.sleep(10)  # the engine is still thinking
            yield b"never"
        finally:
            cleaned.set()

    EventStreamResponse(chunks(), hangup=hangup)
    hangup.set_result(None)
    await asyncio.wait_for(cleaned.wait(), 2)


async def test_a_failure_in_the_producer_reaches_the_client_after_what_came_before():
    got: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def keep(message: dict) -> None:
        if message["type"] == "http.response.body":
            got.append(message["body"])

    with pytest.raises(RuntimeError, match="boom"):
        await respond(chunks(), send=keep)
    assert b"".join(got) == b"one"
