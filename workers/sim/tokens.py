"""The simulated model's tokens: a tokenizer, a chat template, and a deterministic
"language model" whose next token is a pure function of the sequence so far.

Why pure: the gateway migrates a request mid-stream by sending the prompt plus
the tokens already generated to another engine as token ids. For the result
to be exactly what one engine would have produced, the next token may depend
only on (seed, the sequence), never on per-request state. So everything here
(where the reasoning block starts and ends, how long it is, which word comes
next) is derived from the sequence itself: the position of the last `<think>`
and `</think>`, a rolling hash of everything before `<think>` (which seeds the
block's lengths), and a hash of the last few tokens and the absolute position
(which picks the next word). `SequenceState` keeps those few facts up to date
one token at a time, so a step costs O(1); feeding it a whole sequence at once
gives the same state as feeding it in pieces.

Token ids follow the DeepSeek-R1-Distill-Qwen tokenizer where it matters: its
special tokens keep their real ids (`<think>` 151648, `</think>` 151649, end of
sentence 151643, ...), `<think>`/`</think>` are ordinary text when decoded (as
in the real tokenizer, so /v1/completions shows them), and begin/end of
sentence are skipped when decoding output, like vLLM's
`skip_special_tokens=True`. Ordinary text uses 256 byte tokens plus a small
word vocabulary; any string round-trips through `encode` and `decode`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

# DeepSeek-R1-Distill-Qwen special tokens (tokenizer.json, added_tokens).
EOS = 151643
USER = 151644
ASSISTANT = 151645
BOS = 151646
THINK = 151648
END_THINK = 151649
TOKENIZER_SIZE = 151665  # len(tokenizer); the model's embedding table is larger

SPECIAL_TEXT = {
    EOS: "<｜end▁of▁sentence｜>",
    USER: "<｜User｜>",
    ASSISTANT: "<｜Assistant｜>",
    BOS: "<｜begin▁of▁sentence｜>",
    THINK: "<think>",
    END_THINK: "</think>",
}
_SKIPPED_WHEN_DECODING = frozenset({BOS, EOS})  # special=True in the real tokenizer

# Sentence starters and ordinary words; pieces carry their leading space, like BPE.
_STARTERS = (
    "Okay So Let Wait Hmm The I But Now First Then Maybe Alternatively Actually "
    "Therefore This That If We Another Also Next Finally"
).split()
_WORDS = (
    "the a an of to in on for with as by at from that this these those it is are was "
    "be been being have has had do does did not no yes so then thus hence because since "
    "if when while where which who what how why all any each every some many more most "
    "less few other such same different new old first second third last next previous "
    "number value sum product total result answer question problem step case part term "
    "equation function variable set point line angle side area length time rate speed "
    "distance ratio factor root square cube power base digit even odd prime positive "
    "negative zero one two three four five six seven eight nine ten hundred half double "
    "think check verify compute calculate consider assume suppose need find get give "
    "make take use try see know say mean show prove solve simplify expand divide "
    "multiply add subtract compare count list write note recall remember understand "
    "figure maybe perhaps probably actually really just only also still again already "
    "now here there about around into over under between after before during within "
    "without against along across through each other way idea approach method reason "
    "logic pattern rule condition constraint example check wait hmm right wrong correct "
    "true false clear simple hard easy small large big long short high low greater "
    "smaller equal correctly carefully quickly directly exactly approximately roughly "
    "user asked asks wants looking explain answer context data model system input output "
    "given gives known unknown possible impossible likely unlikely careful mistake again "
    "let me we I it they so okay"
).split()
_PUNCTUATION = (".", ",", "?", ":")
_NEWLINES = ("\n", "\n\n")

# Ids: 0-255 are bytes; words and punctuation follow.
_PIECES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [" " + w for w in _STARTERS] + [" " + w for w in _WORDS] + list(_PUNCTUATION) + list(_NEWLINES)
    )
)
_FIRST_PIECE_ID = 256
PIECE_IDS: dict[str, int] = {p: _FIRST_PIECE_ID + i for i, p in enumerate(_PIECES)}
_STARTER_IDS = tuple(PIECE_IDS[" " + w] for w in _STARTERS)
_WORD_IDS = tuple(PIECE_IDS[" " + w] for w in _WORDS)
PERIOD, COMMA = PIECE_IDS["."], PIECE_IDS[","]
NEWLINE, PARAGRAPH = PIECE_IDS["\n"], PIECE_IDS["\n\n"]
_SENTENCE_ENDS = frozenset({PERIOD, PARAGRAPH, NEWLINE, THINK, END_THINK})

_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TEXT.values()) + ")")
_SPECIAL_IDS = {text: tid for tid, text in SPECIAL_TEXT.items()}
_PIECE_PATTERN = re.compile(r" ?[A-Za-z]+| ?[0-9]|\n\n|\s|[^A-Za-z0-9\s]")


def encode(text: str) -> list[int]:
    """Text to token ids; special-token strings become their ids, as in HF tokenizers."""
    ids: list[int] = []
    for part in _SPECIAL_SPLIT.split(text):
        if not part:
            continue
        special = _SPECIAL_IDS.get(part)
        if special is not None:
            ids.append(special)
            continue
        for piece in _PIECE_PATTERN.findall(part):
            pid = PIECE_IDS.get(piece)
            if pid is not None:
                ids.append(pid)
            else:
                ids.extend(piece.encode("utf-8"))
    return ids


def decode(ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Token ids to text. Ids this vocabulary does not use decode to nothing."""
    out: list[str] = []
    pending = bytearray()
    for tid in ids:
        if tid < _FIRST_PIECE_ID:
            pending.append(tid)
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        piece_index = tid - _FIRST_PIECE_ID
        if piece_index < len(_PIECES):
            out.append(_PIECES[piece_index])
        elif tid in SPECIAL_TEXT and not (skip_special_tokens and tid in _SKIPPED_WHEN_DECODING):
            out.append(SPECIAL_TEXT[tid])
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def render_chat(messages: Sequence[dict]) -> list[int]:
    """DeepSeek-R1-Distill's chat template, ending in `<｜Assistant｜><think>\\n`.

    System text goes first after BOS; assistant turns drop their reasoning
    (the template keeps only what follows `</think>`) and end with EOS.
    """
    ids = [BOS]
    for message in messages:
        if message.get("role") == "system":
            ids += encode(message_text(message))
    for message in messages:
        role, text = message.get("role"), message_text(message)
        if role == "system":
            continue
        if role == "assistant":
            ids += [ASSISTANT, *encode(text.split("</think>")[-1]), EOS]
        else:  # user, tool, developer: the template treats them as the user's turn
            ids += [USER, *encode(text)]
    return ids + [ASSISTANT, THINK, NEWLINE]


def message_text(message: dict) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


# --- the deterministic language model -------------------------------------------------

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a fast, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _unit(x: int) -> float:
    """A hash to a float in (0, 1]."""
    return ((x >> 11) + 1) / float(1 << 53)


class LengthDistribution:
    """Lognormal reasoning and answer lengths, capped so a block fits the context."""

    def __init__(
        self,
        mean_reasoning: float,
        reasoning_sigma: float,
        mean_answer: float,
        answer_sigma: float,
        max_model_len: int,
    ) -> None:
        self.reasoning = (math.log(mean_reasoning) - reasoning_sigma**2 / 2, reasoning_sigma)
        self.answer = (math.log(mean_answer) - answer_sigma**2 / 2, answer_sigma)
        self.max_reasoning = max(16, max_model_len // 2)
        self.max_answer = max(16, min(4096, max_model_len // 8))

    def draw(self, key: int) -> tuple[int, int]:
        """(reasoning tokens, answer tokens) for the block whose prefix hashes to `key`."""
        return (
            _lognormal(key, 1, *self.reasoning, 16, self.max_reasoning),
            _lognormal(key, 2, *self.answer, 8, self.max_answer),
        )


def _lognormal(key: int, stream: int, mu: float, sigma: float, low: int, high: int) -> int:
    u1 = _unit(_mix(key ^ (stream * 0x2545F4914F6CDD1D)))
    u2 = _unit(_mix(key ^ (stream * 0x5851F42D4C957F2D) ^ 0xA5A5))
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return max(low, min(high, round(math.exp(mu + sigma * z))))


_WORD_SET = frozenset(_WORD_IDS) | frozenset(_STARTER_IDS)
_NEW_TURN, _REASONING, _ANSWER = 0, 1, 2  # phases: before <think>, inside it, after </think>


class SequenceState:
    """What the next token depends on, kept current one token at a time.

    `next_token()` is a pure function of (seed, every token fed so far): the
    phase and its start come from the last `<think>`, `</think>` or end of
    sentence; block lengths from the hash of everything up to `<think>`.
    """

    __slots__ = (
        "lengths", "seed", "n", "rolling", "prev1", "prev2", "prev3",
        "phase", "phase_start", "reasoning_len", "answer_len",
    )

    def __init__(self, lengths: LengthDistribution, seed: int, tokens: Iterable[int] = ()) -> None:
        self.lengths = lengths
        self.seed = _mix(seed & _MASK)
        self.n = 0
        self.rolling = self.seed
        self.prev1 = self.prev2 = self.prev3 = -1
        self.phase = _NEW_TURN  # no marker yet: a raw prompt starts by thinking
        self.phase_start = 0
        self.reasoning_len = self.answer_len = 0
        for token in tokens:
            self.feed(token)

    def feed(self, token: int) -> None:
        self.rolling = ((self.rolling ^ token) * 0x100000001B3) & _MASK  # FNV-style; draw() mixes it
        if token == THINK:
            self.phase, self.phase_start = _REASONING, self.n
            # The block's lengths hang off everything up to and including <think>.
            self.reasoning_len, self.answer_len = self.lengths.draw(self.rolling)
        elif token == END_THINK:
            self.phase, self.phase_start = _ANSWER, self.n
        elif token == EOS:
            self.phase, self.phase_start = _NEW_TURN, self.n
        self.prev3, self.prev2, self.prev1 = self.prev2, self.prev1, token
        self.n += 1

    def next_token(self) -> int:
        phase = self.phase
        if phase == _NEW_TURN:
            return THINK
        done = self.n - self.phase_start - 1  # tokens since the marker
        if phase == _REASONING:
            if done >= self.reasoning_len:
                return END_THINK
            return NEWLINE if done == 0 else self._word()
        if done >= self.answer_len:
            return EOS
        return PARAGRAPH if done == 0 else self._word()

    def _word(self) -> int:
        h = _mix(self.seed ^ (self.prev1 * 0xD6E8FEB86659FD93 + self.prev2 * 1000003 + self.prev3 * 7919 + self.n * 0x9E3779B1))
        roll = (h >> 40) % 100
        if self.prev1 == PERIOD and roll < 20:
            return PARAGRAPH
        if self.prev1 in _SENTENCE_ENDS:
            return _STARTER_IDS[h % len(_STARTER_IDS)]
        if self.prev1 in _WORD_SET:
            if roll < 8:
                return PERIOD
            if roll < 14:
                return COMMA
        return _WORD_IDS[h % len(_WORD_IDS)]



def count_reasoning_tokens(token_ids: Sequence[int]) -> int:
    """Tokens between `<think>` and `</think>` in generated ids, as vLLM's
    deepseek_r1 parser counts them for `completion_tokens_details`. (When the
    chat template already opened `<think>` in the prompt, that is 0.)"""
    count = depth = 0
    for tid in token_ids:
        if tid == THINK:
            depth += 1
        elif tid == END_THINK:
            depth = max(0, depth - 1)
        elif depth > 0:
            count += 1
    return count
