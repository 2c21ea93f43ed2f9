"""moa's LLaMA-family model against transformers on tiny random checkpoints, plus masks and the KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moa.generate import greedy
from moa.model import KVCache, ModelConfig, document_mask, load_hf_dir, load_pretrained, padding_mask
from moa.model.llama import rope_inv_freq
from tests.conftest import hf_tiny_dir

ARCH_CASES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama-rope3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                    "rope_theta": 500000.0},
    "mistral": {},
    "qwen2": {},
}


@pytest.mark.parametrize("case", ARCH_CASES)
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    arch = case.split("-")[0]
    directory = hf_tiny_dir(tmp_path, arch, **ARCH_CASES[case])
    ours, _ = load_hf_dir(directory)
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert ours.config.model_type == arch
    assert (got - expected).abs().max().item() <= 1e-5


def test_qwen2_has_qkv_biases(tmp_path: Path) -> None:
    ours, _ = load_hf_dir(hf_tiny_dir(tmp_path, "qwen2"))
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_llama3_rope_scaling_changes_low_frequencies() -> None:
    plain = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0)
    scaled = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    a, b = rope_inv_freq(plain), rope_inv_freq(scaled)
    assert torch.equal(a[:1], b[:1])  # the highest frequency is untouched
    assert torch.allclose(a[-1] / 8, b[-1])  # the lowest divided by the factor


def test_logits_at_selects_positions(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(0, 300, (2, 12))
    full = model(ids)
    where = torch.zeros(2, 12, dtype=torch.bool)
    where[0, 3], where[1, 7], where[1, 11] = True, True, True
    assert torch.allclose(model(ids, logits_at=where), full[where], atol=1e-6)
    assert torch.allclose(model(ids, logits_at=slice(-1, None)), full[:, -1:], atol=1e-6)


def test_packed_documents_equal_separate_runs(tiny) -> None:
    model, _ = tiny
    a, b = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.tensor([list(range(7)) + list(range(5))])
    out = model(packed, positions=positions, attn_mask=document_mask(doc_ids))
    assert torch.allclose(out[:, :7], model(a), atol=1e-5)
    assert torch.allclose(out[:, 7:], model(b), atol=1e-5)


def test_left_padded_batch_equals_single_rows(tiny) -> None:
    model, _ = tiny
    short, long = torch.randint(3, 300, (1, 4)), torch.randint(3, 300, (1, 9))
    ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    batch = torch.cat([ids, long])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :5] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    out = model(batch, positions=positions, attn_mask=padding_mask(valid, 9))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 5:], model(short)[0], atol=1e-5)
    assert torch.allclose(out[1], model(long)[0], atol=1e-5)


def test_kv_cache_prefill_then_steps_equals_full_forward(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(0, 300, (2, 10))
    cache = KVCache(model.config, 2, 16)
    first = model(ids[:, :6], cache=cache)
    rest = [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    assert torch.allclose(torch.cat([first, *rest], dim=1), model(ids), atol=1e-5)
    assert cache.length == 10


def test_kv_cache_chunked_prefill(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(0, 300, (1, 10))
    cache = KVCache(model.config, 1, 10)
    out = torch.cat([model(ids[:, :4], cache=cache), model(ids[:, 4:], cache=cache)], dim=1)
    assert torch.allclose(out, model(ids), atol=1e-5)


def test_greedy_with_cache_equals_without(tiny) -> None:
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ("hello there", "a much longer prompt than the first", "x")]
    stop = {tokenizer.eos_token_id}
    cached = greedy(model, prompts, 20, stop, tokenizer.pad_token_id, use_cache=True)
    uncached = greedy(model, prompts, 20, stop, tokenizer.pad_token_id, use_cache=False)
    assert cached == uncached
    assert all(len(row) > 0 for row in cached)


def test_greedy_batch_equals_one_by_one(tiny) -> None:
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ("short", "a somewhat longer prompt")]
    batch = greedy(model, prompts, 12, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    alone = [greedy(model, [p], 12, {tokenizer.eos_token_id}, tokenizer.pad_token_id)[0] for p in prompts]
    assert batch == alone


def test_random_preset_is_seeded() -> None:
    a, _ = load_pretrained("random:tiny", seed=3)
    b, _ = load_pretrained("random:tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
