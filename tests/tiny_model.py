"""A tiny DeepSeek-R1-Distill-shaped model that real vLLM (CPU build) can serve.

Nothing can be downloaded here, so tests make their own model: a 2-layer Qwen2
with random weights from a fixed seed, a byte-level BPE tokenizer trained on a
few lines of text, `<think>`/`</think>` as added tokens and a chat template that
opens the reasoning part the way DeepSeek-R1-Distill does. The output is
gibberish, but every byte of the serving path (tokenizer, chat template,
reasoning parser, sampler, KV cache) is vLLM's own.

    path = tiny_model_path()          # cached, built once (a few seconds)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes, so stale caches are not reused.
TINY_MODEL_VERSION = "1"
SEED = 1234

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

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


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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
    _write_weights(out, vocab_size=len(tokenizer), tokenizer=tokenizer)


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The same normalizer and pre-tokenizer as Qwen2's tokenizer: transformers
    # loads any tokenizer next to a qwen2 config as Qwen2Tokenizer, which
    # rebuilds this pipeline around the saved vocabulary and merges.
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
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    # Not special, as in DeepSeek-R1: they stay in decoded text, which is what
    # the reasoning parser looks for.
    fast.add_tokens([THINK_START, THINK_END], special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_weights(out: Path, vocab_size: int, tokenizer) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention kernels reject head_dim 16
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "idlegrid-tiny-model.json").write_text(
        json.dumps({"version": TINY_MODEL_VERSION, "seed": SEED}) + "\n"
    )


if __name__ == "__main__":
    print(tiny_model_path())
