"""The inference engine: batched KV-cache decoding against transformers and against one-by-one runs,
stop rules, seeded sampling, per-sequence and per-layer expert routes, folding, and target scoring."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moa.data.batching import encode_examples
from moa.generate import Sampling, cut_at_stop, decode, generate, next_token, score
from moa.lora import activate, activated, fold_lora, inject_lora, lora_layers, merge_and_unload
from moa.model import load_pretrained
from moa.routing import LayerRouters, LearnedRouter, RouterSpec, activate_experts
from tests.conftest import hf_tiny_dir

PROMPTS = ["short", "a somewhat longer prompt with more words", "x", "the middle one"]


@pytest.fixture(scope="module")
def experts(tiny):
    """The tiny model with three random LoRA experts (nonzero B, so each changes the output)."""
    model = copy.deepcopy(tiny[0])
    torch.manual_seed(1)
    inject_lora(model, rank=4, alpha=8, experts=3)
    for layer in lora_layers(model).values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.3)
    return model.eval(), tiny[1]


def ids(tokenizer, texts=PROMPTS) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]


def test_greedy_equals_transformers_generate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    directory = hf_tiny_dir(tmp_path, "llama", vocab_size=320)
    ours, tokenizer = load_pretrained(directory)
    peer = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompts = ids(tokenizer, ["ab", "a longer one"])
    decoded = decode(ours, prompts, Sampling(10), stop_ids=set(), pad_id=0)
    for prompt, d in zip(prompts, decoded):
        out = peer.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert d.tokens == out[0, len(prompt):].tolist()
        assert d.finish == "length"


def test_batched_generation_equals_one_by_one_in_input_order(tiny) -> None:
    model, tokenizer = tiny
    prompts = ids(tokenizer)
    sampling = Sampling(12, stop=("zz",))
    batched = generate(model, tokenizer, prompts, sampling, batch_size=3)
    alone = [generate(model, tokenizer, [p], sampling)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.prompt_tokens for g in batched] == [len(p) for p in prompts]
    assert {g.batch for g in batched} == {0, 1} and all(g.latency_s > 0 for g in batched)


def test_stop_strings_cut_after_leading_whitespace() -> None:
    assert cut_at_stop("\n\nParis\n\nmore", ["\n\n"]) == ("\n\nParis", True)
    assert cut_at_stop(" Paris. Berlin", ["\n", "."]) == (" Paris", True)
    assert cut_at_stop(" Paris", ["\n"]) == (" Paris", False)


def test_stop_string_ends_a_sequence_early(tiny) -> None:
    model, tokenizer = tiny
    free = generate(model, tokenizer, ids(tokenizer, ["hello"]), Sampling(16))[0]
    assert free.finish == "length" and len(free.text) > 4
    stop = free.text.lstrip()[2:4]  # a string the unconstrained text contains after its start
    cut = generate(model, tokenizer, ids(tokenizer, ["hello"]), Sampling(16, stop=(stop,)))[0]
    assert cut.finish == "stop" and stop not in cut.text.lstrip() and free.text.startswith(cut.text)
    assert len(cut.tokens) < len(free.tokens)


def test_eos_ends_a_sequence_without_the_eos(tiny) -> None:
    model, tokenizer = tiny
    prompts = ids(tokenizer)
    first = decode(model, prompts, Sampling(5), stop_ids=set())
    eos = first[1].tokens[2]  # make the third token of row 1 a stop token
    decoded = decode(model, prompts, Sampling(5), stop_ids={eos})
    cut = first[1].tokens.index(eos)  # its first occurrence (a random model repeats itself)
    assert decoded[1].finish == "eos" and decoded[1].tokens == first[1].tokens[:cut]


def test_sampling_is_seeded_and_top_p_bounds_the_nucleus(tiny) -> None:
    model, tokenizer = tiny
    prompts = ids(tokenizer)
    hot = Sampling(8, temperature=1.5, seed=3)
    a, b = (decode(model, prompts, hot, set()) for _ in range(2))
    assert [d.tokens for d in a] == [d.tokens for d in b]
    other = decode(model, prompts, Sampling(8, temperature=1.5, seed=4), set())
    assert [d.tokens for d in a] != [d.tokens for d in other]
    # a nucleus of probability mass ~0 keeps only the most likely token: greedy
    narrow = decode(model, prompts, Sampling(8, temperature=1.5, top_p=1e-6, seed=3), set())
    assert [d.tokens for d in narrow] == [d.tokens for d in decode(model, prompts, Sampling(8), set())]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, Sampling(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert draws == {0, 1}


def test_per_sequence_experts_equal_each_sequence_with_its_expert_alone(experts) -> None:
    model, tokenizer = experts
    prompts = ids(tokenizer)
    chosen = [2, 0, 1, 2]
    with activated(model, torch.tensor(chosen)):
        routed = decode(model, prompts, Sampling(10), set())
    for prompt, expert, d in zip(prompts, chosen, routed):
        with activated(model, expert):
            assert d.tokens == decode(model, [prompt], Sampling(10), set())[0].tokens
    assert len({tuple(d.tokens) for d in routed}) > 1


def test_per_layer_route_applies_each_layers_expert(experts) -> None:
    model, tokenizer = experts
    prompts = ids(tokenizer, PROMPTS[:2])
    layers = len(model.model.layers)
    activate_experts(model, torch.tensor([[1, 2]] * layers))
    same = decode(model, prompts, Sampling(8), set())
    activate(model, torch.tensor([1, 2]))
    assert [d.tokens for d in same] == [d.tokens for d in decode(model, prompts, Sampling(8), set())]
    activate_experts(model, torch.tensor([[0, 0]] + [[2, 2]] * (layers - 1)))
    mixed = decode(model, prompts, Sampling(8), set())
    activate(model, 2)
    activate(model.model.layers[0], 0)
    assert [d.tokens for d in mixed] == [d.tokens for d in decode(model, prompts, Sampling(8), set())]


@pytest.mark.parametrize(("strategy", "pooling"), [("last", "last"), ("vote", "mean"), ("per_layer", "last")])
def test_routing_in_the_prefill_equals_a_routing_pass_then_each_route_alone(experts, strategy, pooling) -> None:
    """Random routers disagree across layers, so last/vote prefill rows again with the chosen expert."""
    model, tokenizer = experts
    prompts = ids(tokenizer)
    torch.manual_seed(3)
    cfg = model.config
    routing = LearnedRouter(LayerRouters(RouterSpec("linear", pooling, cfg.num_hidden_layers, cfg.hidden_size, ("a", "b", "c"))),
                      strategy)
    with torch.no_grad():
        for router in routing.routers.routers:
            torch.nn.init.normal_(router.weight, std=3.0)
    chosen = routing(model, prompts)  # [B] or [L, B]
    routed = generate(model, tokenizer, prompts, Sampling(8), batch_size=4, router=routing)
    for k, (prompt, g) in enumerate(zip(prompts, routed)):
        activate_experts(model, chosen[..., k:k + 1])
        assert g.tokens == decode(model, [prompt], Sampling(8), set())[0].tokens
        assert g.expert == (None if strategy == "per_layer" else int(chosen[k]))
    assert len({tuple(g.tokens) for g in routed}) > 1


def test_folded_adapter_decodes_like_the_unfolded_one(experts) -> None:
    model, tokenizer = experts
    model = copy.deepcopy(model)
    prompts = ids(tokenizer)
    activate(model, 1)
    unfolded = decode(model, prompts, Sampling(10), set())
    fold_lora(model, 1)
    assert [d.tokens for d in decode(model, prompts, Sampling(10), set())] == [d.tokens for d in unfolded]


def test_merge_and_unload_leaves_plain_linears_that_decode_the_same(experts) -> None:
    model, tokenizer = experts
    model, prompts = copy.deepcopy(model), ids(tokenizer)
    activate(model, 2)
    routed = decode(model, prompts, Sampling(10), set())
    merge_and_unload(model, 2)
    assert not lora_layers(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert [d.tokens for d in decode(model, prompts, Sampling(10), set())] == [d.tokens for d in routed]


def test_score_is_the_targets_negative_log_likelihood(experts) -> None:
    model, tokenizer = experts
    examples = encode_examples(PROMPTS, ["one", "two words", "three more words", "four"], tokenizer)
    with activated(model, 1):
        scored = score(model, examples, batch_size=3)
    with activated(model, 1), torch.no_grad():
        for example, (nll, n) in zip(examples, scored):
            full = torch.tensor([example.prompt_ids + example.target_ids])
            logits = model(full)[0, len(example.prompt_ids) - 1:-1]
            expected = F.cross_entropy(logits, torch.tensor(example.target_ids), reduction="sum")
            assert n == len(example.target_ids) and nll == pytest.approx(float(expected), rel=1e-4)
