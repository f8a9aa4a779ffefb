"""The requests a benchmark sends: R1-style reasoning, chat turns, fixed lengths, or a file.

Every workload yields `BenchRequest`s: chat messages plus the number of output
tokens to ask for. The bench sets `max_tokens` to that number and `ignore_eos`
so engines generate exactly that many tokens, which makes runs comparable
across endpoints and repeatable with a seed.

Prompt lengths are targets in tokens. We have no tokenizer for the model being
served, so prompts are built from common English words that BPE tokenizers of
the Qwen/Llama families encode as about one token each (with their leading
space). The prompt length the engine actually saw comes back in
`usage.prompt_tokens` and is what the results report.

Where the distributions come from
---------------------------------
`r1` (DeepSeek-R1-distill style reasoning):
  * Output cap 32,768 tokens: the DeepSeek-R1 model card says "For all our
    models, the maximum generation length is set to 32,768 tokens."
  * Output lengths are long-tailed with a mean in the thousands: evaluating
    the R1-distill models on MATH-500, the Open-R1 project (Hugging Face,
    "Open-R1: Update #1", Feb 2025) notes "the enormous size of the
    generations from the DeepSeek models"; ML.ENERGY's reasoning workload
    (GPQA on Qwen3-8B) averages about 7.8k output tokens; and small
    SFT-distilled models are reported to think long and stop late (arXiv
    2505.07961). We model this as a log-normal with median 4,000 and sigma
    0.9 (mean about 6,000 tokens), clipped to [256, 32,768]: a fit to those
    published figures, not a replay of a trace.
  * Prompts are short competition-style problems (AIME/MATH questions are a
    few sentences) followed by the instruction the R1 model card recommends
    for math ("Please reason step by step, and put your final answer within
    \\boxed{}."): log-normal, median 120 tokens, sigma 0.6, clipped to
    [16, 2,048].
`chat` (ShareGPT-like turns): the vLLM paper (Kwon et al., SOSP 2023, Fig. 11)
  gives ShareGPT means of 161 input and 338 output tokens. We use log-normals
  with sigma 1.0 whose means match those (medians 98 and 205), clipped to
  [4, 1,024] input and [4, 2,048] output, the limits `vllm bench serve`
  applies when it samples ShareGPT (prompts over 1,024 tokens are dropped).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

R1_OUTPUT_CAP = 32_768
R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Common English words that BPE vocabularies (Qwen, Llama) hold as one token each,
# with their leading space; the simulated engine's small vocabulary has them too.
_WORDS = (
    "the a an of to in on for with as by at from that this it is are was be have has "
    "had do not no so then if when which who what how why all any each some many more "
    "most other such same new old first second last next number value sum result "
    "answer question problem step case part time rate line point side area length "
    "ratio root square even odd zero one two three four five six seven eight nine ten "
    "find make take use see know show solve write add count note idea way rule small "
    "large long short high low equal true clear simple"
).split()


@dataclass(frozen=True)
class LogNormal:
    """A log-normal length distribution, clipped to [low, high] tokens."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.high, max(self.low, round(value))))

    @property
    def mean_unclipped(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


R1_INPUT = LogNormal(median=120, sigma=0.6, low=16, high=2_048)
R1_OUTPUT = LogNormal(median=4_000, sigma=0.9, low=256, high=R1_OUTPUT_CAP)
CHAT_INPUT = LogNormal(median=98, sigma=1.0, low=4, high=1_024)
CHAT_OUTPUT = LogNormal(median=205, sigma=1.0, low=4, high=2_048)

WORKLOADS = ("r1", "chat", "fixed", "jsonl")


@dataclass
class BenchRequest:
    index: int
    messages: list[dict]
    input_len: int  # intended prompt tokens (approximate; usage has the real count)
    output_len: int  # max_tokens sent; with ignore_eos, the tokens generated
    extra_body: dict = field(default_factory=dict)  # more request fields (jsonl only)


class WorkloadError(ValueError):
    """A workload that cannot be built from the given options."""


def filler_text(n_tokens: int, rng: random.Random) -> str:
    """About `n_tokens` tokens of word salad; random so no two prompts share a prefix."""
    return " ".join(rng.choice(_WORDS) for _ in range(max(0, n_tokens)))


def _prompt(n_tokens: int, rng: random.Random, suffix: str = "") -> str:
    # The suffix counts against the target length, roughly one token per word.
    body = n_tokens - len(suffix.split())
    text = filler_text(max(1, body), rng)
    return f"{text}\n{suffix}" if suffix else text


def _synthetic(
    n: int,
    lengths: random.Random,
    text: random.Random,
    draw_input,
    draw_output,
    suffix: str = "",
) -> list[BenchRequest]:
    # Lengths and prompt text come from separate random streams, so a sweep can
    # send the same lengths at every load level with fresh text (no prefix-cache
    # hits carried over from the level before).
    requests = []
    for i in range(n):
        input_len, output_len = draw_input(lengths), draw_output(lengths)
        requests.append(
            BenchRequest(
                index=i,
                messages=[{"role": "user", "content": _prompt(input_len, text, suffix)}],
                input_len=input_len,
                output_len=output_len,
            )
        )
    return requests


def r1_requests(n: int, lengths: random.Random, text: random.Random) -> list[BenchRequest]:
    return _synthetic(n, lengths, text, R1_INPUT.draw, R1_OUTPUT.draw, R1_INSTRUCTION)


def chat_requests(n: int, lengths: random.Random, text: random.Random) -> list[BenchRequest]:
    return _synthetic(n, lengths, text, CHAT_INPUT.draw, CHAT_OUTPUT.draw)


def fixed_requests(n: int, input_len: int, output_len: int, text: random.Random) -> list[BenchRequest]:
    if input_len < 1 or output_len < 1:
        raise WorkloadError("--input-len and --output-len must be at least 1")
    return _synthetic(n, text, text, lambda _: input_len, lambda _: output_len)


def jsonl_requests(path: str | Path, n: int, default_output_len: int) -> list[BenchRequest]:
    """Requests from a JSON-lines file, cycled to `n` if the file has fewer.

    Each line is an object with either `messages` (OpenAI chat messages) or
    `prompt` (a string, sent as one user message), and optionally
    `output_len` or `max_tokens`. Any other fields (`temperature`, ...) are
    sent as they are.
    """
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise WorkloadError(f"cannot read --jsonl file {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
            raise WorkloadError(f"{path}:{number}: expected an object with 'messages' or 'prompt'")
        rows.append(row)
    if not rows:
        raise WorkloadError(f"--jsonl file {path} has no requests")

    requests = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        messages = row.pop("messages", None) or [{"role": "user", "content": str(row.pop("prompt"))}]
        row.pop("prompt", None)
        output_len = int(row.pop("output_len", row.pop("max_tokens", default_output_len)))
        for ours in ("model", "stream", "stream_options", "max_completion_tokens"):
            row.pop(ours, None)
        text = " ".join(str(m.get("content", "")) for m in messages)
        requests.append(
            BenchRequest(
                index=i,
                messages=messages,
                input_len=len(text.split()),
                output_len=output_len,
                extra_body=row,
            )
        )
    return requests


def build_requests(
    workload: str,
    n: int,
    seed: int,
    input_len: int | None = None,
    output_len: int | None = None,
    jsonl: str | None = None,
    text_seed: int | str | None = None,
) -> list[BenchRequest]:
    """The `n` requests of one run: lengths from `seed`, prompt text from
    `text_seed` (default `seed`), so the same seeds give the same requests."""
    lengths = random.Random(seed)
    text = random.Random(f"text-{seed if text_seed is None else text_seed}")
    if workload == "r1":
        return r1_requests(n, lengths, text)
    if workload == "chat":
        return chat_requests(n, lengths, text)
    if workload == "fixed":
        if input_len is None or output_len is None:
            raise WorkloadError("--workload fixed needs --input-len and --output-len")
        return fixed_requests(n, input_len, output_len, text)
    if workload == "jsonl":
        if not jsonl:
            raise WorkloadError("--workload jsonl needs --jsonl FILE")
        return jsonl_requests(jsonl, n, default_output_len=output_len or 256)
    raise WorkloadError(f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
