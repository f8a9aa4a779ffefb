"""A Llama-style decoder in plain torch, with random weights, and the batched KV
cache the engine steps it over.

The architecture is Llama's: token embedding, pre-norm blocks of RMSNorm,
rotary self-attention with grouped KV heads and a SwiGLU MLP, a final RMSNorm
and the LM head. Only the shapes are real: weights are drawn from a seed, so
the same seed gives the same model (and the same greedy tokens) every time,
and the compute and memory traffic per token are those of a real model of that
size. The text it writes is gibberish.

The KV cache is preallocated, one slot per sequence the engine may run:
`[layers, max_num_seqs, kv_heads, max_len, head_dim]` for keys and again for
values. A step writes each new token's keys and values at its position in its
sequence's slot, then attends over the cache in place: over the run of slots
from the batch's lowest to its highest, each query in its own slot's row, so no
keys are copied (a gather of every sequence's keys cost more than the whole
rest of a decode step at batch 128 on an H100). A mask hides what a query may
not see: later positions, stale keys of an earlier sequence, and for rows of
slots outside the batch everything but their first key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Embedding rows of DeepSeek-R1-Distill-Qwen-1.5B: room for every id of the
# simulated engine's tokenizer (workers/sim/tokens.py), which follows that model's.
VOCAB_SIZE = 151936
# Attention spans the cache in multiples of this many positions (the mask hides the
# rest): a handful of shapes rather than a new one every step, which keeps cuDNN's
# attention from planning afresh (milliseconds) on each step.
LENGTH_BUCKET = 128


@dataclass(frozen=True)
class ModelConfig:
    name: str
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int = VOCAB_SIZE
    tie_word_embeddings: bool = False
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def params(self) -> int:
        h, q, kv = self.hidden_size, self.attention_heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h  # attention, MLP, two norms
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.layers * per_layer + embeddings + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize


# Llama 3.2 1B and Llama 3.1 8B shapes, with the simulated tokenizer's vocabulary
# (151,936 rows rather than Llama's 128,256). Parameters: tiny 9.75M (nearly all of
# it the embedding and LM head; untied, since a tied head this small mostly repeats
# the last token), 1b 1.28B, 8b 8.22B (16.4 GB in bf16).
CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        ModelConfig("tiny", layers=2, hidden_size=32, attention_heads=4, kv_heads=2, intermediate_size=96),
        ModelConfig("1b", layers=16, hidden_size=2048, attention_heads=32, kv_heads=8, intermediate_size=8192,
                    tie_word_embeddings=True),
        ModelConfig("8b", layers=32, hidden_size=4096, attention_heads=32, kv_heads=8, intermediate_size=14336),
    )
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}") from None


# --- the cache ------------------------------------------------------------------------


class KVCache:
    """Keys and values of every running sequence, one slot per sequence."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.layers, slots, config.kv_heads, max_len, config.head_dim)
        # Zeros, not empty: masked-out keys still meet the values in a matmul, and
        # uninitialised memory may hold NaNs, which a zero weight does not cancel.
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [batch, tokens, kv_heads, head_dim] at `positions` [batch, tokens] of `slots` [batch]."""
        self.keys[layer][slots[:, None], :, positions] = keys
        self.values[layer][slots[:, None], :, positions] = values

    def view(self, layer: int, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots `rows` spans, without a copy: [span, kv_heads, length, head_dim] twice."""
        window = slice(rows.first, rows.first + rows.span)
        return self.keys[layer, window, :, :rows.length], self.values[layer, window, :, :rows.length]


@dataclass
class Rows:
    """Where a batch sits in the cache: attention runs over slots first..first+span-1."""

    slots: torch.Tensor  # [batch]: each sequence's slot
    positions: torch.Tensor  # [batch, n]: the positions of its new tokens
    index: torch.Tensor  # [batch]: its row among the spanned slots (slot - first)
    first: int
    span: int
    length: int  # positions attended over: a multiple of LENGTH_BUCKET, or max_len
    mask: torch.Tensor  # [span, 1, group x n, length]: which keys each query row sees

    @property
    def dense(self) -> bool:
        """The batch fills its span, in slot order: its rows are the spanned slots themselves."""
        return self.span == self.slots.shape[0]


# --- the model ------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.attention_heads, c.kv_heads, c.head_dim
        # Q, K and V in one matrix, as serving engines fuse them: one GEMM rather than three.
        self.sizes = [c.attention_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.qkv = nn.Linear(c.hidden_size, sum(self.sizes), bias=False, **factory)
        self.o = nn.Linear(c.attention_heads * c.head_dim, c.hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, layer: int,
                rows: Rows) -> torch.Tensor:
        batch, tokens, _ = x.shape
        cos, sin = rope
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q = q.view(batch, tokens, self.heads, self.head_dim)
        k = k.view(batch, tokens, self.kv_heads, self.head_dim)
        v = v.view(batch, tokens, self.kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.write(layer, rows.slots, rows.positions, k, v)
        keys, values = cache.view(layer, rows)
        # Grouped-query attention without copying K and V per query head: the
        # `group` query heads that share a KV head become extra query rows of it.
        group = self.heads // self.kv_heads
        q = q.view(batch, tokens, self.kv_heads, group, self.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(batch, self.kv_heads, group * tokens, self.head_dim)
        if rows.dense:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=rows.mask)
        else:  # each query in its slot's row; rows of other slots attend, unread
            spanned = q.new_zeros((rows.span, *q.shape[1:])).index_copy_(0, rows.index, q)
            out = F.scaled_dot_product_attention(spanned, keys, values, attn_mask=rows.mask).index_select(0, rows.index)
        out = out.view(batch, self.kv_heads, group, tokens, self.head_dim).permute(0, 3, 1, 2, 4)
        return self.o(out.reshape(batch, tokens, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False, **factory)  # fused, like qkv
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps, **factory)
        self.attention = Attention(c, **factory)
        self.mlp_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps, **factory)
        self.mlp = MLP(c, **factory)

    def forward(self, x: torch.Tensor, *attention_args) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), *attention_args)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, **factory)
        self.blocks = nn.ModuleList(Block(c, **factory) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps, **factory)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False, **factory)
        half = torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=factory.get("device")) / c.head_dim
        self.register_buffer("inv_freq", 1.0 / (c.rope_theta**half), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache,
                first: int, span: int, length: int) -> torch.Tensor:
        """Run `tokens` [batch, n] at `positions` [batch, n] of their `slots` [batch] through
        every block, caching their keys and values; attention spans slots first..first+span-1
        over `length` positions. Returns the final hidden states [batch, n, hidden]."""
        x = self.embed(tokens)
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [batch, n, 1 (heads), head_dim]
        rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        # Causal and padding mask in one: a token sees the keys at its own position and
        # before. Rows of slots outside the batch see key 0 alone (a row seeing nothing is NaN).
        index = slots - first
        spanned = positions.new_zeros((span, positions.shape[1])).index_copy_(0, index, positions)
        mask = torch.arange(length, device=tokens.device) <= spanned[:, None, :, None]  # [span, 1, n, length]
        mask = mask.repeat(1, 1, self.config.attention_heads // self.config.kv_heads, 1)  # one row per query head of a group
        rows = Rows(slots, positions, index, first, span, length, mask)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, rows)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)


# --- what the engine drives -----------------------------------------------------------


@dataclass
class Chunk:
    """Tokens of one sequence to compute in a step: `token_ids` at positions start, start+1, ..."""

    slot: int
    start: int
    token_ids: list[int]


class ModelRunner:
    """The model and its KV cache on one device. Not thread-safe: one caller at a time."""

    def __init__(self, config: ModelConfig, *, max_num_seqs: int, max_len: int, device: str | torch.device,
                 dtype: torch.dtype, seed: int, output_ids: Sequence[int]) -> None:
        self.config = config
        self.max_num_seqs = max_num_seqs
        self.max_len = max_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.model: Llama | None = self._build()
        self.weights_on: str | None = str(self.device)  # where the weights are; None: dropped (sleep level 2)
        self.asleep = False
        self.cache: KVCache | None = KVCache(config, max_num_seqs, max_len, self.device, dtype)
        # Greedy picks are taken over the tokens the tokenizer renders as text, so the
        # gibberish is readable words; every logit is still computed.
        self.allowed = torch.zeros(config.vocab_size, dtype=torch.bool, device=self.device)
        self.allowed[list(output_ids)] = True

    def _build(self) -> Llama:
        torch.manual_seed(self.seed)  # seeds the CUDA generators too: the same seed, the same weights
        with torch.no_grad():
            model = Llama(self.config, device=self.device, dtype=self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the random draws run asynchronously: count their time
        return model.eval().requires_grad_(False)

    @torch.inference_mode()
    def step(self, chunks: Sequence[Chunk]) -> list[int]:
        """Compute every chunk into its slot; return each chunk's greedy next token.

        Single tokens (decodes) run as one batch; longer chunks (prefills) one at a time.
        """
        picks = [0] * len(chunks)
        singles = [i for i, chunk in enumerate(chunks) if len(chunk.token_ids) == 1]
        for i, chunk in enumerate(chunks):
            if len(chunk.token_ids) > 1:
                picks[i] = self._forward([chunk])[0]
        if singles:
            for i, pick in zip(singles, self._forward([chunks[i] for i in singles])):
                picks[i] = pick
        return picks

    def _forward(self, chunks: Sequence[Chunk]) -> list[int]:
        """One forward pass over chunks of equal length."""
        if self.asleep:
            raise RuntimeError("the model is asleep")
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].slot)  # slot order: a full span needs no reshuffle
        picks = self._forward_in_slot_order([chunks[i] for i in order])
        return [pick for _, pick in sorted(zip(order, picks))]

    def _forward_in_slot_order(self, chunks: Sequence[Chunk]) -> list[int]:
        n = len(chunks[0].token_ids)
        tokens = torch.tensor([chunk.token_ids for chunk in chunks], device=self.device)
        positions = torch.tensor([list(range(chunk.start, chunk.start + n)) for chunk in chunks], device=self.device)
        slots = torch.tensor([chunk.slot for chunk in chunks], device=self.device)
        first = min(chunk.slot for chunk in chunks)
        span = max(chunk.slot for chunk in chunks) - first + 1
        length = min(self.max_len, -(-(max(chunk.start for chunk in chunks) + n) // LENGTH_BUCKET) * LENGTH_BUCKET)
        hidden = self.model(tokens, positions, slots, self.cache, first, span, length)
        logits = self.model.logits(hidden[:, -1])
        return logits.masked_fill(~self.allowed, float("-inf")).argmax(dim=-1).tolist()  # .tolist() waits for the GPU

    # --- sleep and wake ---

    def offload(self, level: int) -> None:
        """Free the device: drop the KV cache, and move the weights to host memory
        (level 1) or drop them too (level 2; `restore` rebuilds them from the seed)."""
        self.asleep = True
        self.cache = None
        if level == 1:
            self.model.to("cpu")
            self.weights_on = "cpu"
        else:
            self.model = None
            self.weights_on = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def restore(self) -> None:
        if self.model is None:
            self.model = self._build()
        else:
            self.model.to(self.device)
        self.weights_on = str(self.device)
        self.cache = KVCache(self.config, self.max_num_seqs, self.max_len, self.device, self.dtype)
        self.asleep = False

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def device_memory_bytes(self) -> int | None:
        """Bytes torch holds on the GPU now (None on CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device)
