"""Prompt enhancement with the text encoder's own weights (docs/enhance.md).

Z-Image's text encoder is a whole Qwen3-4B chat model with tied embeddings; `text_encoder.causal_lm` hands its
arrays to mlx-lm's Qwen3 model and mlx-lm's `generate_step` (KV cache, prefill) writes the reply, with its top-k /
top-p filters and a sampler seeded by an explicit key. The chat template has thinking disabled
(`enable_thinking=False`), and the system prompt below asks for what Turbo renders best.
"""

from __future__ import annotations

import re
import secrets
import warnings

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from ..models.text_encoder import Qwen3Encoder, causal_lm
from ..models.tokenizer import ZImageTokenizer, format_chat

SYSTEM_PROMPT = (
    "You rewrite short image ideas into one detailed prompt for a text-to-image model that follows prompts "
    "literally. Keep everything the user asked for and invent nothing that contradicts it. Describe, in plain "
    "sentences: the concrete subject (who or what, appearance, pose, expression, clothing, materials, colors); the "
    "setting and background; the lighting (source, direction, time of day, mood); the camera (shot type, angle, "
    "lens or focal length, depth of field) or the art medium and style if the user named one; and the composition. "
    "Any text that should appear in the image stays exactly as the user wrote it, inside double quotes, with where "
    "it appears and how it looks. Write in the user's language, at most about 200 words. Output the prompt only: no "
    "title, no preamble, no lists, no explanations, no quotes around the whole prompt."
)
MAX_PROMPT_TOKENS = 512      # what the text encoder reads of a prompt (encode_prompt's max_sequence_length)
TOP_P, TOP_K = 0.8, 20       # Qwen3's recommended sampling without thinking (its generation_config)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def check_args(prompt, max_new_tokens, temperature) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number in [0, 2] (0 = greedy), got {temperature!r}")


def chat_ids(tokenizer: ZImageTokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    """The templated conversation's token ids; a user prompt past MAX_PROMPT_TOKENS is cut to its first ones
    (with a warning), since the encoder would not read more of it either."""
    ids = tokenizer.ids(prompt)
    if len(ids) > MAX_PROMPT_TOKENS:
        warnings.warn(f"the prompt is {len(ids)} tokens; only its first {MAX_PROMPT_TOKENS} were enhanced (the "
                      f"text encoder reads at most {MAX_PROMPT_TOKENS})", stacklevel=3)
        prompt = tokenizer.decode(ids[:MAX_PROMPT_TOKENS])
    return tokenizer.ids(format_chat(prompt, system_prompt))


def make_sampler(temperature: float, seed: int | None):
    """Greedy at temperature 0; otherwise mlx-lm's top-k and top-p filters, then a categorical draw from one
    explicit key per call (no global RNG state)."""
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    key = mx.random.key(secrets.randbits(32) if seed is None else int(seed))

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        logprobs = apply_top_k(apply_top_p(logprobs, TOP_P), TOP_K)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample


def generate_ids(model, prompt_ids: list[int], stop_ids, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[int]:
    """New token ids after `prompt_ids` until a stop token (not included) or `max_new_tokens`."""
    out = []
    steps = generate_step(mx.array(prompt_ids, dtype=mx.uint32), model, max_tokens=max_new_tokens,
                          sampler=make_sampler(temperature, seed))
    for token, _ in steps:
        token = int(token)
        if token in stop_ids:
            break
        out.append(token)
    return out


def strip_thinking(text: str) -> str:
    """The reply without Qwen3 thinking blocks or stray think tags."""
    return _THINK.sub("", text).replace("<think>", "").replace("</think>", "").strip()


def enhance_prompt(tokenizer: ZImageTokenizer, encoder: Qwen3Encoder, prompt: str, *, system_prompt=None,
                   max_new_tokens: int = 512, temperature: float = 0.7, seed: int | None = None) -> str:
    """`prompt` rewritten by the encoder's chat model (see ZImagePipeline.enhance_prompt)."""
    check_args(prompt, max_new_tokens, temperature)
    if not prompt.strip():
        return prompt
    ids = chat_ids(tokenizer, prompt, SYSTEM_PROMPT if system_prompt is None else system_prompt)
    reply = generate_ids(causal_lm(encoder), ids, tokenizer.stop_ids, max_new_tokens, temperature, seed)
    text = strip_thinking(tokenizer.decode(reply))
    if not text:
        warnings.warn("the text encoder's reply was empty; the prompt is kept as given", stacklevel=3)
        return prompt
    return text
