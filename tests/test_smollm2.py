"""The real default model: moa's GGUF reader against transformers' (logits, token ids, conversion)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moa.cli import main
from moa.model import load_hf_dir

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Translate to German: the dog sleeps."]
TEXTS = [
    "Hello, world!",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, emoji 😀👍🏽 and ∑∫√.",
    "digits 0123456789, 3.14159, 1,000,000 and 2024-11-23",
    "whitespace   runs\t\ttabs\n\n\nnewlines    \n  trailing  ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>code: x = {'a': [1, 2]}  # comment\r\n",
    "",
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer


def test_gguf_logits_match_transformers(smollm2, reference) -> None:
    ours, tokenizer = smollm2
    ref, _ = reference
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            diff = (ours(ids) - ref(ids).logits).abs().max().item()
        assert diff <= 1e-4, prompt


def test_token_ids_match_transformers(smollm2, reference) -> None:
    _, tokenizer = smollm2
    _, ref = reference
    for text in TEXTS:
        assert tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(smollm2, reference) -> None:
    _, tokenizer = smollm2
    _, ref = reference
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tokenizer.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_converted_directory_loads_in_transformers_and_moa(smollm2, tmp_path: Path) -> None:
    ours, tokenizer = smollm2
    out = tmp_path / "smollm2"
    assert main(["model", "convert", "smollm2-135m-instruct", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reloaded, reloaded_tokenizer = load_hf_dir(out)
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        expected = ours(ids)
        assert (hf(ids).logits - expected).abs().max().item() <= 1e-4
        assert torch.equal(reloaded(ids), expected)
    for text in TEXTS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert reloaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert hf.config.architectures == ["LlamaForCausalLM"] and hf.config.tie_word_embeddings
    assert hf_tokenizer.chat_template == tokenizer.chat_template


def test_model_info_answers_a_chat_prompt(capsys) -> None:
    assert main(["model", "info"]) == 0
    out = capsys.readouterr().out
    assert "134.5 M" in out and "llama" in out
    assert "Paris" in out.split("assistant", 1)[1]
