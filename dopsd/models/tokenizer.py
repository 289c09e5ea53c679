"""A Qwen-style tokenizer built locally (no hub): byte-level BPE plus the Qwen3 / Qwen3-VL special tokens.

Tiny and nano models need a tokenizer that the real pipelines accept unchanged: a `Qwen2TokenizerFast` whose chat
template understands `enable_thinking` (Z-Image and FLUX.2-klein both pass it) and image parts (the Qwen3-VL
teacher encoder).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# Qwen3's chat template, reduced to what the pipelines use: user/assistant turns, string or [image, text] content,
# and the empty think block that `enable_thinking=False` inserts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

BASE_CORPUS = [
    "a photo of a red circle left of a blue square",
    "two green triangles above a yellow star on a white background",
    "one, two, three, four objects: small, large, striped, dotted, plain",
    "Keep the output consistent with the reference image.",
    "the quick brown fox jumps over the lazy dog",
]


def build_qwen_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 512) -> Qwen2TokenizerFast:
    """Train a byte-level BPE on `corpus` (plus a small base corpus) and wrap it as a Qwen2TokenizerFast."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*BASE_CORPUS, *corpus], trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
            "video_token": "<|video_pad|>",
        },
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
