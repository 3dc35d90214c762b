"""The Qwen3 tokenizer as Z-Image uses it: chat template, tokenization, truncation (docs/architecture.md, Qwen3).

Ports the prompt handling of diffusers' `ZImagePipeline._encode_prompt` with the `tokenizers` library only
(no transformers at runtime). Each prompt becomes
`"<|im_start|>user\\n" + prompt + "<|im_end|>\\n<|im_start|>assistant\\n"` — what the Qwen3 chat template gives
with `add_generation_prompt=True, enable_thinking=True` (no think block) — tokenized with special tokens
recognized and nothing added (no BOS/EOS), then cut to `max_length` tokens from the tail, as transformers'
`truncation=True` does: an over-long prompt loses its template suffix, exactly like the reference.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tokenizers import Tokenizer

PROMPT_PREFIX = "<|im_start|>user\n"
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
PAD_TOKEN = "<|endoftext|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")   # where a chat reply ends (generation_config's eos_token_id)
NO_THINKING = "<think>\n\n</think>\n\n"


def format_prompt(prompt: str) -> str:
    """The chat-template string for one user prompt (enable_thinking=True, generation prompt added)."""
    return PROMPT_PREFIX + prompt + PROMPT_SUFFIX


def format_chat(prompt: str, system_prompt: str | None = None) -> str:
    """The Qwen3 chat template for [system, user] with the generation prompt and `enable_thinking=False` (the
    empty think block the template appends), as `apply_chat_template` writes it."""
    system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
    return system + format_prompt(prompt) + NO_THINKING


class ZImageTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.token_to_id(PAD_TOKEN)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ZImageTokenizer":
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() or not path.suffix else path
        if not file.is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json found (expected the Qwen3 fast-tokenizer file of the Z-Image "
                "'tokenizer/' directory)"
            )
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file}: cannot read tokenizer ({e})") from None
        for special in ("<|im_start|>", "<|im_end|>"):
            if tok.token_to_id(special) is None:
                raise ValueError(f"{file}: not a Qwen tokenizer (no {special} token)")
        return cls(tok)

    def ids(self, text: str) -> list[int]:
        """Token ids of `text` as is (special tokens recognized, nothing added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.tokenizer.token_to_id(t) for t in STOP_TOKENS) if i is not None)

    def encode(self, prompts: list[str] | str, max_length: int = 512) -> list[list[int]]:
        """Token ids of each templated prompt, at most `max_length` of them (tail cut, with a warning)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        encodings = self.tokenizer.encode_batch([format_prompt(p) for p in prompts], add_special_tokens=False)
        out = []
        for i, enc in enumerate(encodings):
            ids = list(enc.ids)
            if len(ids) > max_length:
                cut = len(ids) - max_length
                msg = (
                    f"prompt {i} is {len(ids)} tokens with the chat template; the last {cut} token(s) were cut "
                    f"to fit max_length={max_length} (as the reference pipeline does, the template suffix is lost)"
                )
                warnings.warn(msg, stacklevel=2)
                ids = ids[:max_length]
            out.append(ids)
        return out
