"""A tiny DeepSeek-R1-Distill-shaped model that real vLLM (CPU build) can serve.

Nothing can be downloaded here, so tests make their own model: a 2-layer Qwen2
(hidden 256, 4 heads of 64) with a byte-level BPE tokenizer trained on a few
lines of text, `<think>`/`</think>` as added tokens and DeepSeek-R1-Distill's
chat template shape. Every byte of the serving path (tokenizer, chat template,
reasoning parser, sampler, KV cache, attention kernels) is vLLM's own.

Most weights are random (fixed seed), so the text is gibberish. A few are set
by hand so that, like R1, the model thinks, closes with `</think>`, answers and
stops, and so tests can tell reasoning from content and `stop` from `length`:

* one residual dimension is a constant 1 ("bias"); the output head reads it to
  keep unprintable byte tokens and chat markers out of the output;
* layer 0, head 0 attends uniformly and reads a BOS indicator, which gives
  1/(number of tokens so far): a length signal;
* layer 0, head 1 attends sharply to `</think>`: "reasoning has ended";
* layer 1, head 0 attends sharply to an end-of-sentence token that came after
  `</think>`: "answer has ended" (so with `ignore_eos` the text goes on rather
  than repeating end-of-sentence, and earlier turns' end markers don't count).

The output head turns these into: `</think>` once the context holds about
THINK_END_AT tokens, end-of-sentence at about ANSWER_END_AT (both counted from
the start of the prompt, BOS included), and random printable tokens otherwise.
For "Hello!" (a 7-token chat prompt) greedy decoding gives 55 reasoning
tokens, `</think>`, 47 answer tokens and end-of-sentence.

    path = tiny_model_path()          # cached, built once (a few seconds)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes, so stale caches are not reused.
TINY_MODEL_VERSION = "2"
SEED = 1234

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

# Context lengths (tokens, prompt included) at which the model closes its
# reasoning and ends its answer; greedy decoding crosses them a little later.
THINK_END_AT = 60
ANSWER_END_AT = 100

HIDDEN = 256
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64  # vLLM's CPU attention kernels reject head_dim 16
INTERMEDIATE = 512
LAYERS = 2
ROPE_THETA = 1_000_000.0

# Shaped like DeepSeek-R1-Distill-Qwen's template: system text first, turns
# marked by <｜User｜>/<｜Assistant｜>, earlier answers stripped of their
# reasoning, and the generation prompt opening the reasoning part with
# "<think>\n" so the model itself only ever writes "</think>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

# Enough text for a few hundred merges; the words are what tests tend to send.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "Let me think step by step about this problem before I answer.",
    "First, we add the numbers. Then we check the result. So the answer is 42.",
    "Idle GPUs in computing centers can serve inference between training jobs.",
    "Tokens per second and tokens per joule measure what the fleet delivers.",
    "What is the capital of France? The capital of France is Paris.",
    "Count from one to ten: one two three four five six seven eight nine ten.",
    "def add(a, b):\n    return a + b\n",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"",
]

# Qwen2's pre-tokenizer split. transformers loads any tokenizer that sits next
# to a qwen2 config as Qwen2Tokenizer, which rebuilds this pipeline around the
# saved vocabulary and merges, so the tokenizer is trained with it too.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Residual dimensions with a fixed meaning; random weights never write them.
_BIAS, _IS_BOS, _IS_THINK_END, _INV_LENGTH, _THINK_ENDED, _ANSWER_ENDED, _IS_EOS = range(7)
_FIRST_RANDOM_DIM = 8
_ROPE_SLOW_DIM = HEAD_DIM // 2 - 1  # its rotary frequency is ~1e-6: no position effect


def tiny_model_path() -> Path:
    """The shared, cached tiny model directory (built on first use)."""
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return build_tiny_model(cache_root / "idlegrid" / f"tiny-qwen2-v{TINY_MODEL_VERSION}")


def build_tiny_model(dest: Path) -> Path:
    """Write the tiny model to `dest` unless a complete copy is already there.

    Built in a temporary sibling directory and renamed into place, so parallel
    test processes never see a half-written model.
    """
    dest = Path(dest)
    if (dest / "model.safetensors").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        staging.chmod(0o755)
        _write_model(staging)
        try:
            staging.rename(dest)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (dest / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _write_model(out: Path) -> None:
    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(out)
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, THINK_END)}
    printable = [_is_printable(tokenizer, token_id) for token_id in range(vocab_size)]
    _write_config(out, vocab_size, bos=ids[BOS], eos=ids[EOS])
    _write_weights(out, vocab_size, ids[BOS], ids[EOS], ids[THINK_END], printable)


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS, USER, ASSISTANT],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,  # else Qwen2Tokenizer adds "<|endoftext|>" as one more token
        # Like DeepSeek-R1-Distill: text prompts get BOS, which the model's
        # length signal counts from (chat prompts carry it in the template).
        add_bos_token=True,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    # Not special, as in DeepSeek-R1: they stay in decoded text, which is what
    # the reasoning parser looks for.
    fast.add_tokens([THINK_START, THINK_END], special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _is_printable(tokenizer, token_id: int) -> bool:
    """Whether the token decodes, on its own, to printable ASCII text."""
    if token_id in tokenizer.all_special_ids or tokenizer.convert_ids_to_tokens(token_id) in (
        THINK_START,
        THINK_END,
    ):
        return False
    text = tokenizer.decode([token_id])
    return bool(text) and all(ch == "\n" or " " <= ch <= "~" for ch in text)


def _write_config(out: Path, vocab_size: int, bos: int, eos: int) -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n"
    )
    (out / "idlegrid-tiny-model.json").write_text(
        json.dumps(
            {
                "version": TINY_MODEL_VERSION,
                "seed": SEED,
                "think_end_at": THINK_END_AT,
                "answer_end_at": ANSWER_END_AT,
            }
        )
        + "\n"
    )


def _write_weights(
    out: Path, vocab_size: int, bos: int, eos: int, think_end: int, printable: list[bool]
) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(SEED)

    def random(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    free = slice(_FIRST_RANDOM_DIM, HIDDEN)
    n_free = HIDDEN - _FIRST_RANDOM_DIM

    # Embeddings: the constant, three indicators, and a random identity.
    embed = torch.zeros(vocab_size, HIDDEN)
    embed[:, free] = random(vocab_size, n_free, std=n_free**-0.5)
    embed[:, _BIAS] = 1.0
    embed[bos, _IS_BOS] = 1.0
    embed[think_end, _IS_THINK_END] = 1.0
    embed[eos, _IS_EOS] = 1.0
    rms = embed.pow(2).mean(dim=1).sqrt()  # what layer 0's input norm divides by

    weights: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed}
    slow = _ROPE_SLOW_DIM
    for layer in range(LAYERS):
        q, q_bias = torch.zeros(q_size, HIDDEN), torch.zeros(q_size)
        k, v = torch.zeros(kv_size, HIDDEN), torch.zeros(kv_size, HIDDEN)
        o = torch.zeros(HIDDEN, q_size)
        # Heads 2 and 3 (key/value head 1) are ordinary random heads; heads 0
        # and 1 (key/value head 0) carry the signals.
        q[2 * HEAD_DIM :, free] = random(2 * HEAD_DIM, n_free, std=0.15)
        k[HEAD_DIM:, free] = random(HEAD_DIM, n_free, std=0.15)
        v[HEAD_DIM:, free] = random(HEAD_DIM, n_free, std=0.15)
        o[free, 2 * HEAD_DIM :] = random(n_free, 2 * HEAD_DIM, std=0.15)
        if layer == 0:
            # Head 0: zero query, so uniform attention; its value "is BOS"
            # averages to 1/(tokens so far).
            v[0, _IS_BOS] = rms[bos]
            o[_INV_LENGTH, 0] = 1.0
            # Head 1: a constant query meets a key that is large only on
            # </think>, so it attends there once present; value "is </think>".
            q_bias[HEAD_DIM + slow] = 8.0
            k[slow, _IS_THINK_END] = 50.0 * rms[think_end]
            v[1, _IS_THINK_END] = rms[think_end]
            o[_THINK_ENDED, HEAD_DIM + 1] = 1.0
        else:
            # Head 0: key = 2*is_eos + 2*think_ended - 3 + 3.5*is_bos: +1 on an
            # end-of-sentence after </think>, +0.5 on BOS (a sink, so "none"
            # reads as 0), -1 or less elsewhere; value "is end-of-sentence".
            q_bias[slow] = 8.0
            for dim, weight in ((_IS_EOS, 2.0), (_THINK_ENDED, 2.0), (_BIAS, -3.0), (_IS_BOS, 3.5)):
                k[slow, dim] = 25.0 * weight
            v[0, _IS_EOS] = 1.0
            o[_ANSWER_ENDED, 0] = 2.5  # the value is ~0.4 after the input norm
        gate = random(INTERMEDIATE, HIDDEN, std=0.1)
        up = random(INTERMEDIATE, HIDDEN, std=0.1)
        down = random(HIDDEN, INTERMEDIATE, std=0.05)
        down[:_FIRST_RANDOM_DIM] = 0.0
        prefix = f"model.layers.{layer}."
        weights.update(
            {
                prefix + "input_layernorm.weight": torch.ones(HIDDEN),
                prefix + "post_attention_layernorm.weight": torch.ones(HIDDEN),
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.q_proj.bias": q_bias,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.k_proj.bias": torch.zeros(kv_size),
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.v_proj.bias": torch.zeros(kv_size),
                prefix + "self_attn.o_proj.weight": o,
                prefix + "mlp.gate_proj.weight": gate,
                prefix + "mlp.up_proj.weight": up,
                prefix + "mlp.down_proj.weight": down,
            }
        )

    # Output head: random preferences among printable tokens, plus the rules
    # in the module docstring. The bias dimension ends up ~0.2 of the final
    # normalised state, so d*0.2 ~ 50 logits: far above the random part
    # (top logits ~5), which makes the switches happen close to the set lengths.
    d = 250.0
    head = torch.zeros(vocab_size, HIDDEN)
    head[:, free] = random(vocab_size, n_free, std=0.1)
    for token_id, ok in enumerate(printable):
        if not ok:
            head[token_id, _BIAS] = -10 * d
    head[think_end, _BIAS] = d
    head[think_end, _INV_LENGTH] = -d * THINK_END_AT
    head[think_end, _THINK_ENDED] = -3 * d
    head[eos, _BIAS] = d - 3 * d
    head[eos, _INV_LENGTH] = -d * ANSWER_END_AT
    head[eos, _THINK_ENDED] = 3 * d
    head[eos, _ANSWER_ENDED] = -6 * d
    weights["model.norm.weight"] = torch.ones(HIDDEN)
    weights["lm_head.weight"] = head

    save_file(
        {name: t.contiguous() for name, t in weights.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )


if __name__ == "__main__":
    print(tiny_model_path())
