"""moa's LLaMA-family model against transformers on tiny random checkpoints, plus masks and the KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moa.generate import greedy
from moa.model import Documents, ModelConfig, SlotCache, document_mask, load_hf_dir, load_pretrained
from moa.model.llama import rope_cos_sin, rope_inv_freq
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


def test_bf16_logits_match_transformers_at_long_distances(tmp_path: Path) -> None:
    """In bf16 the RoPE frequencies stay float32, as in transformers: with a bf16 table a query 6000 positions
    after a key would see it rotated by up to 6000 * 2^-9 rad too far. q/k are scaled so attention is sharp."""
    directory = hf_tiny_dir(tmp_path, "llama", rope_theta=500.0, max_position_embeddings=8192)
    sharp = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for layer in sharp.model.layers:
        layer.self_attn.q_proj.weight.data.mul_(10)
        layer.self_attn.k_proj.weight.data.mul_(10)
    sharp.save_pretrained(directory)
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ours, _ = load_pretrained(directory, torch.bfloat16)
    cast = load_hf_dir(directory)[0].to(torch.bfloat16)
    assert ours.inv_freq.dtype == cast.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 128, (2, 32))
    positions = torch.cat([torch.arange(16), torch.arange(6000, 6016)]).expand(2, 32)
    with torch.no_grad():
        # an explicit all-ones mask: without one transformers reads a position jump as a new packed sequence
        expected = ref(ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits.float()
        got, got_cast = ours(ids, positions=positions).float(), cast(ids, positions=positions).float()
        ours.inv_freq = ours.inv_freq.bfloat16()  # the table model.to(bfloat16) used to make
        old = ours(ids, positions=positions).float()
    assert (got - expected).abs().max().item() <= 0.02  # a bf16 ulp at these logits (~0.6) is 2^-8
    assert torch.equal(got, got_cast)
    assert (old - expected).abs().max().item() > 0.1


def test_rope_stays_float32_through_casts_and_autocast() -> None:
    model, _ = load_pretrained("random:tiny")  # not the shared fixture: the casts round its weights
    exact = rope_inv_freq(model.config)
    assert torch.equal(model.to(torch.bfloat16).to(torch.float32).inv_freq, exact)
    positions = torch.arange(7000, 7008)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope_cos_sin(exact, positions, torch.float32)
    assert torch.equal(cos, rope_cos_sin(exact, positions, torch.float32)[0])
    assert torch.equal(sin, rope_cos_sin(exact, positions, torch.float32)[1])


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


def test_documents_attend_only_to_themselves(tiny) -> None:
    model, _ = tiny
    a, b, c = (torch.randint(0, 300, (1, n)) for n in (7, 5, 1))
    positions = torch.tensor([list(range(7)) + list(range(5)) + [0]])
    out = model(torch.cat([a, b, c], dim=1), positions=positions, attn_mask=Documents((7, 5, 1)))
    for got, alone in zip(out.split([7, 5, 1], dim=1), (a, b, c)):
        torch.testing.assert_close(got, model(alone), atol=1e-5, rtol=1e-5)


def test_slot_cache_prefill_packed_then_decode_equals_full_forward(tiny) -> None:
    """Two prompts of different lengths prefilled packed into slots, then decoded side by side at their own
    positions: every step's logits are those of the whole sequence run at once."""
    model, _ = tiny
    seqs = [torch.randint(0, 300, (10,)), torch.randint(0, 300, (7,))]
    prompts = [seqs[0][:6], seqs[1][:3]]
    cache = SlotCache(model.config, 3, 16)
    positions = cache.prefill([0, 1], [6, 3])
    last = torch.zeros(1, 9, dtype=torch.bool)
    last[0, [5, 8]] = True
    first = model(torch.cat(prompts)[None], positions=positions, cache=cache, logits_at=last)
    torch.testing.assert_close(first, torch.stack([model(p[None])[0, -1] for p in prompts]), atol=1e-5, rtol=1e-5)
    assert cache.lengths[:2].tolist() == [6, 3]
    for step in range(4):
        tokens = torch.stack([seqs[0][6 + step], seqs[1][3 + step]])[:, None]
        out = model(tokens, positions=cache.decode(2), cache=cache)[:, 0]
        full = [model(seqs[0][None, :7 + step])[0, -1], model(seqs[1][None, :4 + step])[0, -1]]
        torch.testing.assert_close(out, torch.stack(full), atol=1e-5, rtol=1e-5)
    assert cache.lengths[:2].tolist() == [10, 7]


def test_slot_cache_move_keeps_a_sequence_going(tiny) -> None:
    model, _ = tiny
    seq = torch.randint(0, 300, (8,))
    cache = SlotCache(model.config, 2, 12)
    model(torch.cat([torch.randint(0, 300, (4,)), seq[:5]])[None], positions=cache.prefill([0, 1], [4, 5]),
          cache=cache)
    cache.move(1, 0)  # slot 0's sequence is done; slot 1's takes its place
    out = model(seq[5:6][None], positions=cache.decode(1), cache=cache)
    torch.testing.assert_close(out[0, -1], model(seq[None, :6])[0, -1], atol=1e-5, rtol=1e-5)


def test_slot_cache_prefill_after_a_prefix_in_another_slot_then_truncate(tiny) -> None:
    """A document that starts after a prefix held by another slot (a sequence in flight, or a document of the
    same prefill) gets the logits of its whole sequence; truncating the cache changes no later step."""
    model, _ = tiny
    prefix = torch.randint(0, 300, (5,))
    seqs = [torch.cat([prefix, torch.randint(0, 300, (n,))]) for n in (4, 2, 3)]
    cache = SlotCache(model.config, 3, 20)
    model(seqs[0][None, :7], positions=cache.prefill([0], [7]), cache=cache)  # slot 0 in flight
    # slot 1 reads the prefix from slot 0; slot 2 from slot 1, whose whole prompt is in this prefill
    positions = cache.prefill([1, 2], [2, 3], starts=[5, 5], sources=[0, 0])
    assert positions.tolist() == [[5, 6, 5, 6, 7]]
    last = torch.tensor([[False, True, False, False, True]])
    out = model(torch.cat([seqs[1][5:], seqs[2][5:]])[None], positions=positions, cache=cache, logits_at=last)
    full = [model(seqs[1][None])[0, -1], model(seqs[2][None])[0, -1]]
    torch.testing.assert_close(out, torch.stack(full), atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [7, 7, 8]
    cache.truncate(10)
    step = torch.randint(0, 300, (3, 1))
    out = model(step, positions=cache.decode(3), cache=cache)[:, 0]
    full = [model(torch.cat([s[:n], t])[None])[0, -1] for s, n, t in zip(seqs, (7, 7, 8), step)]
    torch.testing.assert_close(out, torch.stack(full), atol=1e-5, rtol=1e-5)
    assert cache.max_len == 10


def test_greedy_batch_equals_one_by_one(tiny) -> None:
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ("short", "a somewhat longer prompt", "x")]
    batch = greedy(model, tokenizer, prompts, 12, batch_size=2)
    alone = [greedy(model, tokenizer, [p], 12)[0] for p in prompts]
    assert batch == alone and all(batch)


def test_random_preset_is_seeded() -> None:
    a, _ = load_pretrained("random:tiny", seed=3)
    b, _ = load_pretrained("random:tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
