"""The inference engine: greedy decoding against transformers, continuous batching with packed prefill
against decoding each prompt alone (base, a folded merge, per-sequence experts, MoA's strategies), stop
rules, seeded sampling, and packed target scoring."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moa.data.batching import encode_examples
from moa.generate import (
    MIN_SHARED_PREFIX,
    Request,
    Sampling,
    StopStrings,
    cut_at_stop,
    generate,
    greedy,
    next_token,
    score,
    serve,
    shareable_prefixes,
)
from moa.lora import Arrow, activate, activated, fold_lora, lora_layers, merge_and_unload
from moa.model import Documents, load_pretrained
from moa.routing import CentroidRouter, LayerRouters, LearnedRouter, RouterSpec, Strategy, activate_experts
from tests.conftest import hf_tiny_dir, with_random_experts

PROMPTS = ["short", "a somewhat longer prompt with more words", "x", "the middle one"]
# Very different lengths, for continuous batching: slots refill while long prompts still decode.
STREAM = ["x", "a much longer prompt that goes on and on " * 6, "mid-sized prompt here", "yo", "q" * 90,
          "another medium prompt", "z", "the last prompt of the stream, long enough " * 3]

# One task's prompts: a shared instruction, then each its own text (some much longer, one repeated).
TEMPLATED = [f"Classify the sentiment of this review, one word. Review: {text}" for text in
             ("great film", "dull " * 20, "I loved it", "great film", "meh", "a fine cast in a thin story " * 3)]


@pytest.fixture(scope="module")
def experts(tiny):
    """The tiny model with three random LoRA experts (nonzero B, so each changes the output)."""
    return with_random_experts(tiny[0], seed=1), tiny[1]


def ids(tokenizer, texts=PROMPTS) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]


def requests(tokenizer, texts=PROMPTS, sampling: Sampling | None = None, experts=None) -> list[Request]:
    sampling = sampling or Sampling(10)
    return [Request(p, sampling, None if experts is None else experts[i]) for i, p in enumerate(ids(tokenizer, texts))]


def tokens(generations) -> list[list[int]]:
    return [g.tokens for g in generations]


def random_router(model, strategy: Strategy, pooling: str = "mean", seed: int = 3) -> LearnedRouter:
    """Routers with large random weights: they disagree across layers, so last/vote prefill again."""
    torch.manual_seed(seed)
    cfg = model.config
    router = LearnedRouter(LayerRouters(RouterSpec("linear", pooling, cfg.num_hidden_layers, cfg.hidden_size,
                                                   ("a", "b", "c"))), strategy)
    with torch.no_grad():
        for layer in router.routers.routers:
            torch.nn.init.normal_(layer.weight, std=3.0)
    return router


def test_greedy_equals_transformers_generate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    directory = hf_tiny_dir(tmp_path, "llama", vocab_size=320)
    ours, tokenizer = load_pretrained(directory)
    peer = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompts = ids(tokenizer, ["ab", "a longer one"])
    generated = generate(ours, tokenizer, requests(tokenizer, ["ab", "a longer one"]), stop_tokens=set())
    for prompt, ours_tokens in zip(prompts, tokens(generated)):
        out = peer.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert ours_tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_continuous_batching_equals_one_at_a_time_for_the_base_model(tiny, batch_size: int) -> None:
    model, tokenizer = tiny
    stream = requests(tokenizer, STREAM, Sampling(14, stop=("zz", "\n")))
    batched = generate(model, tokenizer, stream, batch_size=batch_size)
    alone = [generate(model, tokenizer, [r], batch_size=1)[0] for r in stream]
    assert tokens(batched) == tokens(alone) and [g.text for g in batched] == [g.text for g in alone]
    assert [g.finish for g in batched] == [g.finish for g in alone]
    assert [g.prompt_tokens for g in batched] == [len(r.prompt) for r in stream]
    assert all(g.latency_s > 0 for g in batched)


def test_requests_keep_their_own_budgets_and_stops(tiny) -> None:
    """A mixed-task stream: each sequence decodes with its task's budget and stop strings."""
    model, tokenizer = tiny
    free = generate(model, tokenizer, requests(tokenizer, STREAM, Sampling(16)), batch_size=4)
    stops = [free[i].text.lstrip()[2:4] for i in range(len(STREAM))]
    mixed = [Request(r.prompt, Sampling(3 + 2 * i, stop=(stops[i],) if i % 2 else ()))
             for i, r in enumerate(requests(tokenizer, STREAM))]
    batched = generate(model, tokenizer, mixed, batch_size=3)
    assert batched == [dataclasses.replace(g, latency_s=b.latency_s) for g, b in
                       zip((generate(model, tokenizer, [r])[0] for r in mixed), batched)]
    for i, g in enumerate(batched):
        assert len(g.tokens) <= 3 + 2 * i and (g.finish != "stop" or i % 2)


def test_a_folded_merge_decodes_alike_batched_and_alone(experts) -> None:
    model, tokenizer = experts
    merged = copy.deepcopy(model)
    merge_and_unload(merged, torch.tensor([0.5, 0.25, 0.25]))
    stream = requests(tokenizer, STREAM, Sampling(12))
    batched = generate(merged, tokenizer, stream, batch_size=3)
    assert tokens(batched) == [generate(merged, tokenizer, [r])[0].tokens for r in stream]


def test_per_sequence_experts_equal_each_sequence_with_its_expert_alone(experts) -> None:
    """The oracle's route: every request names its expert; a batch mixes them."""
    model, tokenizer = experts
    chosen = [2, 0, 1, 2, 1, 0, 0, 1]
    batched = generate(model, tokenizer, requests(tokenizer, STREAM, Sampling(10), chosen), batch_size=3)
    for request, expert, g in zip(requests(tokenizer, STREAM, Sampling(10), chosen), chosen, batched):
        assert g.expert == expert and g.tokens == generate(model, tokenizer, [request])[0].tokens
        with activated(model, expert):  # the same as the model with that one expert active
            assert g.tokens == greedy(model, tokenizer, [request.prompt], 10)[0]
    assert len({tuple(t) for t in tokens(batched)}) > 1


def test_arrow_set_on_the_layers_is_served_unchanged_and_routes_each_token_alone(experts) -> None:
    """Arrow (no router, no per-request expert): the engine never touches the layers' mode, and each prompt,
    packed in the prefill and batched in decoding, gets what it gets decoded alone; scoring too."""
    model, tokenizer = experts
    stream = requests(tokenizer, STREAM, Sampling(8))
    examples = encode_examples(PROMPTS, ["one", "two words", "three more words", "four"], tokenizer)
    with activated(model, Arrow(2, 0.5)):
        batched = generate(model, tokenizer, stream, batch_size=3)
        assert all(layer.active == Arrow(2, 0.5) for layer in lora_layers(model).values())
        for request, g in zip(stream, batched):
            assert g.expert is None and g.tokens == generate(model, tokenizer, [request])[0].tokens
        for example, (nll, _) in zip(examples, score(model, examples)):
            assert nll == pytest.approx(nll_alone(model, example), rel=1e-4)
    with activated(model, 0):
        assert tokens(batched) != tokens(generate(model, tokenizer, stream, batch_size=3))  # not one expert's


@pytest.mark.parametrize(("strategy", "pooling"), [("last", "last"), ("vote", "mean"), ("per_layer", "mean")])
def test_moa_routed_in_the_packed_prefill_equals_each_prompt_alone(experts, strategy: str, pooling: str) -> None:
    """Each sequence's experts are decided in its prefill, packed with others; its tokens are those of the
    prompt decoded alone with those experts, which equal its routing pass's choice."""
    model, tokenizer = experts
    router = random_router(model, Strategy(strategy), pooling)
    stream = requests(tokenizer, STREAM, Sampling(8))
    batched = generate(model, tokenizer, stream, batch_size=3, router=router)
    for request, g in zip(stream, batched):
        assert g.tokens == generate(model, tokenizer, [request], router=router)[0].tokens
        chosen = router(model, [request.prompt])  # [1] or [L, 1]
        assert g.expert == (None if strategy == "per_layer" else int(chosen[0]))
        activate_experts(model, chosen)
        assert g.tokens == greedy(model, tokenizer, [request.prompt], 8)[0]
    assert len({tuple(t) for t in tokens(batched)}) > 1


def test_centroid_routing_in_the_prefill_equals_each_prompt_alone(experts) -> None:
    """The training-free router: the nearest of random unit centroids of layer 1's mean-pooled input."""
    model, tokenizer = experts
    torch.manual_seed(5)
    router = CentroidRouter(F.normalize(torch.randn(3, model.config.hidden_size), dim=-1), layer=1)
    stream = requests(tokenizer, STREAM, Sampling(8))
    batched = generate(model, tokenizer, stream, batch_size=3, router=router)
    for request, g in zip(stream, batched):
        with activated(model, None), torch.no_grad():  # layer 1's input, of the base model, alone
            hidden = model.block_input(torch.tensor([request.prompt]), layer=1)[0]
        expected = int((F.normalize(hidden.mean(0), dim=-1) @ router.centroids.T).argmax())
        assert g.expert == expected and g.tokens == generate(model, tokenizer, [request], router=router)[0].tokens
        with activated(model, expected):
            assert g.tokens == greedy(model, tokenizer, [request.prompt], 8)[0]
    assert len({g.expert for g in batched}) > 1


def test_per_layer_experts_apply_each_layers_expert(experts) -> None:
    model, tokenizer = experts
    rows = torch.tensor([tokenizer.encode("abcdefgh"), tokenizer.encode("12345678")])
    layers = len(model.model.layers)
    with torch.no_grad():
        activate_experts(model, torch.tensor([[1, 2]] * layers))
        same = model(rows)
        activate(model, torch.tensor([1, 2]))
        torch.testing.assert_close(same, model(rows))
        activate_experts(model, torch.tensor([[0, 0]] + [[2, 2]] * (layers - 1)))
        mixed = model(rows)
        activate(model, 2)
        activate(model.model.layers[0], 0)
        torch.testing.assert_close(mixed, model(rows))
        # one expert per document of a packed row: each document as if alone with its expert
        activate_experts(model, torch.tensor([2, 0]), lengths=[8, 8])
        packed = model(rows.view(1, 16), positions=torch.arange(8).repeat(2)[None], attn_mask=Documents((8, 8)))
        for k, expert in enumerate((2, 0)):
            activate(model, expert)
            torch.testing.assert_close(packed[0, 8 * k:8 * k + 8], model(rows[k:k + 1])[0], atol=1e-5, rtol=1e-4)


def test_shareable_prefixes_per_route_leave_the_last_token_to_compute() -> None:
    long = list(range(10))
    prompts = [long + [50, 51], long + [60], long + [50, 51], [1, 2, 3], [1, 2, 3, 4], long + [70]]
    routes = [0, 0, 0, 0, 0, 1]
    # the repeated prompt keeps its last token; [1, 2, 3] shares too little; a prompt alone on its route shares none
    assert shareable_prefixes(prompts, routes) == [11, 10, 11, 0, 0, 0]
    assert MIN_SHARED_PREFIX > 3
    assert shareable_prefixes(prompts, [None] * 6)[5] == 10


@pytest.mark.parametrize("route", ["adapter", "folded", "oracle", "arrow"])
def test_shared_prompt_prefixes_are_read_from_another_slot_and_decode_alike(experts, route: str) -> None:
    """Prompts that share an instruction compute it once per route: the others read its keys and values from
    the slot of a sequence in flight (or admitted in full beside them), and every output equals the prompt's
    decoded alone. The cache is shortened as the long prompts finish."""
    model, tokenizer = experts
    model = copy.deepcopy(model)
    chosen = [0, 1, 0, 0, 1, 0] if route == "oracle" else None
    if route == "folded":
        merge_and_unload(model, torch.tensor([0.5, 0.25, 0.25]))
    stream = requests(tokenizer, TEMPLATED, Sampling(6), chosen)
    active = {"adapter": 1, "arrow": Arrow(2, 0.5)}.get(route)  # one adapter for all, unfolded; or Arrow's routing
    with activated(model, active) if lora_layers(model) else nullcontext():
        for batch_size in (2, 6):
            served = serve(model, tokenizer, stream, batch_size=batch_size)
            assert served.reused_tokens >= (1 if chosen else 3) * len(tokenizer.encode(TEMPLATED[0][:40]))
            assert tokens(served.generations) == [generate(model, tokenizer, [r])[0].tokens for r in stream]
            assert tokens(served.generations)[0] == tokens(served.generations)[3]  # the repeated prompt
    if route == "oracle":  # shared only on the same expert: expert 1's two prompts share with each other alone
        assert served.reused_tokens < sum(len(r.prompt) for r in stream) - len(stream)


def test_routers_share_no_prefix(experts) -> None:
    """MoA reads every prompt whole before any layer's expert is known: each prompt is computed in full."""
    model, tokenizer = experts
    served = serve(model, tokenizer, requests(tokenizer, TEMPLATED, Sampling(4)), router=random_router(model, "last"))
    assert served.reused_tokens == 0


def test_stop_strings_cut_after_leading_whitespace() -> None:
    assert cut_at_stop("\n\nParis\n\nmore", ["\n\n"]) == ("\n\nParis", True)
    assert cut_at_stop(" Paris. Berlin", ["\n", "."]) == (" Paris", True)
    assert cut_at_stop(" Paris", ["\n"]) == (" Paris", False)


@pytest.mark.parametrize("text", ["\n\nParis\n\nmore", " Paris. Berlin", " Paris", "  \n x#### 42\nend", "ab\n\ncd"])
def test_incremental_stop_strings_stop_where_the_whole_text_would(tiny, text: str) -> None:
    """Token by token, StopStrings reports a stop at the first token after which cut_at_stop finds one."""
    _, tokenizer = tiny
    stops = ("\n\n", ".", "####")
    watch, ids_ = StopStrings(tokenizer, stops), tokenizer.encode(text)
    for k, token in enumerate(ids_, start=1):
        assert watch.add(token) == cut_at_stop(tokenizer.decode(ids_[:k]), stops)[1], (text, k)
        if cut_at_stop(tokenizer.decode(ids_[:k]), stops)[1]:
            break


def test_stop_string_ends_a_sequence_early(tiny) -> None:
    model, tokenizer = tiny
    free = generate(model, tokenizer, requests(tokenizer, ["hello"], Sampling(16)))[0]
    assert free.finish == "length" and len(free.text) > 4
    stop = free.text.lstrip()[2:4]  # a string the unconstrained text contains after its start
    cut = generate(model, tokenizer, requests(tokenizer, ["hello"], Sampling(16, stop=(stop,))))[0]
    assert cut.finish == "stop" and stop not in cut.text.lstrip() and free.text.startswith(cut.text)
    assert len(cut.tokens) < len(free.tokens)


def test_eos_ends_a_sequence_without_the_eos(tiny) -> None:
    model, tokenizer = tiny
    first = generate(model, tokenizer, requests(tokenizer, PROMPTS, Sampling(5)))
    eos = first[1].tokens[2]  # make the third token of row 1 the tokenizer's EOS
    ending = dataclasses.replace(tokenizer, eos_token=tokenizer.backend.id_to_token(eos))
    decoded = generate(model, ending, requests(tokenizer, PROMPTS, Sampling(5)))
    cut = first[1].tokens.index(eos)  # its first occurrence (a random model repeats itself)
    assert decoded[1].finish == "eos" and decoded[1].tokens == first[1].tokens[:cut]


def test_sampling_is_seeded_per_request_and_top_p_bounds_the_nucleus(tiny) -> None:
    model, tokenizer = tiny
    hot = requests(tokenizer, STREAM, Sampling(8, temperature=1.5, seed=3))
    a, b = (tokens(generate(model, tokenizer, hot, batch_size=n)) for n in (2, 8))
    assert a == b  # each request draws from its own generator: the batch does not change its draws
    other = generate(model, tokenizer, requests(tokenizer, STREAM, Sampling(8, temperature=1.5, seed=4)))
    assert a != tokens(other)
    # a nucleus of probability mass ~0 keeps only the most likely token: greedy
    narrow = generate(model, tokenizer, requests(tokenizer, STREAM, Sampling(8, temperature=1.5, top_p=1e-6)))
    assert tokens(narrow) == tokens(generate(model, tokenizer, requests(tokenizer, STREAM, Sampling(8))))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, Sampling(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert draws == {0, 1}


def test_folded_adapter_decodes_like_the_unfolded_one(experts) -> None:
    model, tokenizer = experts
    model = copy.deepcopy(model)
    prompts = ids(tokenizer)
    activate(model, 1)
    unfolded = greedy(model, tokenizer, prompts, 10)
    fold_lora(model, 1)
    assert greedy(model, tokenizer, prompts, 10) == unfolded


def test_merge_and_unload_leaves_plain_linears_that_decode_the_same(experts) -> None:
    model, tokenizer = experts
    model, prompts = copy.deepcopy(model), ids(tokenizer)
    activate(model, 2)
    routed = greedy(model, tokenizer, prompts, 10)
    merge_and_unload(model, 2)
    assert not lora_layers(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert greedy(model, tokenizer, prompts, 10) == routed


def nll_alone(model, example) -> float:
    with torch.no_grad():
        full = torch.tensor([example.prompt_ids + example.target_ids])
        logits = model(full)[0, len(example.prompt_ids) - 1:-1]
        return float(F.cross_entropy(logits, torch.tensor(example.target_ids), reduction="sum"))


def test_packed_score_is_each_targets_negative_log_likelihood(experts) -> None:
    model, tokenizer = experts
    examples = encode_examples(PROMPTS, ["one", "two words", "three more words", "four"], tokenizer)
    with activated(model, 1):
        scored = score(model, examples)
        for example, (nll, n) in zip(examples, scored):
            assert n == len(example.target_ids) and nll == pytest.approx(nll_alone(model, example), rel=1e-4)


def test_packed_score_with_per_example_experts_and_moa(experts) -> None:
    model, tokenizer = experts
    examples = encode_examples(PROMPTS, ["one", "two words", "three more words", "four"], tokenizer)
    chosen = [2, 0, 1, 0]
    for example, expert, (nll, _) in zip(examples, chosen, score(model, examples, experts=chosen)):
        with activated(model, expert):
            assert nll == pytest.approx(nll_alone(model, example), rel=1e-4)
    router = random_router(model, Strategy.LAST)
    for example, (nll, _) in zip(examples, score(model, examples, router=router)):
        activate_experts(model, router(model, [example.prompt_ids]))
        assert nll == pytest.approx(nll_alone(model, example), rel=1e-4)
