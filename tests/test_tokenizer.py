"""ZImageTokenizer (tokenizers only) against transformers' Qwen2Tokenizer + chat template, as diffusers uses them."""

import warnings

import pytest

from zimage_mlx.models.tokenizer import ZImageTokenizer, format_prompt

PROMPTS = [
    "Hello",
    "A photo of a red fox sitting in the snow, golden hour, 35mm, shallow depth of field.",
    "一只猫坐在窗台上，阳光明媚，高清摄影",
    "A poster with the words \"新年快乐\" (Happy New Year) in red calligraphy, 2025",
    "emoji 🦊🔥👩‍👩‍👧 and ✨ sparkles ✨",
    "   ",
    "\n\t \n",
    "",
    "trailing spaces   and\r\nCRLF  ",
    "special-looking text <|im_end|> inside <think> the prompt",
    "Ünïcödé ﬁ ligature and combining e\u0301 accents",
]
LONG = " ".join(["a very detailed prompt about mountains, rivers, 城市 and 🌸"] * 80)


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return ZImageTokenizer.from_dir(qwen_tokenizer_dir)


def reference_ids(hf, prompts, max_length=512):
    """diffusers' ZImagePipeline._encode_prompt tokenization, with the padding rows removed."""
    texts = [
        hf.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    enc = hf(texts, padding="max_length", max_length=max_length, truncation=True)
    return texts, [[i for i, m in zip(ids, mask) if m] for ids, mask in zip(enc.input_ids, enc.attention_mask)]


def test_template_string(hf_tokenizer):
    texts, _ = reference_ids(hf_tokenizer, PROMPTS)
    assert texts == [format_prompt(p) for p in PROMPTS]


def test_hello_ids(tokenizer):
    assert tokenizer.encode(["Hello"]) == [[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]]


def test_ids_match_transformers(tokenizer, hf_tokenizer):
    _, ref = reference_ids(hf_tokenizer, PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated here
        ours = tokenizer.encode(PROMPTS)
    assert ours == ref
    assert ours[PROMPTS.index("")] == [151644, 872, 198, 151645, 198, 151644, 77091, 198]


@pytest.mark.parametrize("max_length", [512, 64])
def test_truncation_matches_and_warns(tokenizer, hf_tokenizer, max_length):
    prompts = [LONG, "short", LONG[: len(LONG) // 3]]
    _, ref = reference_ids(hf_tokenizer, prompts, max_length=max_length)
    full = len(tokenizer.encode([LONG], max_length=10**6)[0])
    assert full > 512
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = tokenizer.encode(prompts, max_length=max_length)
    assert ours == ref
    assert len(ours[0]) == max_length
    assert ours[0][-1] != 198  # the template suffix is lost, as in the reference
    messages = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert any(f"last {full - max_length} token(s) were cut" in m for m in messages), messages
    assert len(messages) == sum(len(ids) > max_length for ids in tokenizer.encode(prompts, max_length=10**6))


def test_exact_fit_does_not_warn(tokenizer):
    full = tokenizer.encode([LONG], max_length=10**6)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenizer.encode([LONG], max_length=len(full)) == [full]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ZImageTokenizer.from_dir(tmp_path)
