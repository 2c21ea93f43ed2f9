"""The inference engine: batched decoding with a KV cache over ragged (left-padded) prompts, greedy or
seeded temperature/top-p sampling, stop on EOS, stop strings or a token budget; MoA routing decided in
the prefill, once per sequence; and batched log-likelihood scoring of targets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from moa.data.batching import Example, bucket, collate, lm_loss
from moa.errors import MoaError
from moa.lora import set_route
from moa.model.llama import KVCache, Transformer, padding_mask
from moa.model.tokenizer import Tokenizer
from moa.train.router import PromptIndex, Routers, decide, pooled_block_inputs, route_scores


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 decodes greedily
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string after its leading whitespace


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]  # generated ids, without the EOS and without what follows a stop string
    prompt_tokens: int
    latency_s: float  # from the batch's start (prefill and routing included) to this sequence's end
    finish: str  # "eos", "stop" or "length"
    expert: int | None = None  # the expert the route chose (MoA with one expert per sequence)
    batch: int = 0  # which decoding batch it ran in


@dataclass
class _Decoded:
    tokens: list[int]
    finish: str
    seconds: float
    expert: int | None = None


@dataclass(frozen=True)
class Routing:
    """MoA at inference: every layer's router reads the prompt and that layer follows its choice; the
    strategy then fixes each sequence's expert(s) for every generated token."""

    routers: Routers
    strategy: str  # last or vote (one expert per sequence), per_layer (one per layer and sequence)

    def choose(self, scores: Tensor) -> Tensor:
        """Router logits [L, B, N] -> experts [B] or, per_layer, [L, B]."""
        return scores.argmax(-1) if self.strategy == "per_layer" else decide(scores, self.strategy)

    def __call__(self, model: Transformer, prompts: list[list[int]]) -> Tensor:
        """A routing pass of its own, for when the prompt does not run alone first (scoring)."""
        examples = [Example(p, []) for p in prompts]
        return self.choose(route_scores(model, self.routers, collate([[i] for i in range(len(examples))], examples)))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """ids [B, P] and valid [B, P] (False on padding) with every prompt flush right."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return ids, valid


def next_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """[B, V] -> [B]: argmax, or a draw from the temperature-scaled top-p nucleus."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / sampling.temperature).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [B, 1]
    return order.gather(-1, choice)[:, 0]


@torch.inference_mode()
def decode(model: Transformer, prompts: list[list[int]], sampling: Sampling, stop_ids: set[int],
           pad_id: int = 0, use_cache: bool = True, stopped: Callable[[list[int]], bool] | None = None,
           routing: Routing | None = None) -> list[_Decoded]:
    """Continue every prompt in one batch until a stop token, `stopped(tokens)` or the token budget;
    with `routing`, the prefill also picks each sequence's experts (kept for every new token)."""
    start = time.perf_counter()
    device = model.lm_head.weight.device
    ids, valid = (t.to(device) for t in left_pad(prompts, pad_id))
    ragged = not bool(valid.all())
    B, P = ids.shape
    cache = (KVCache(model.config, B, P + sampling.max_new_tokens, device, model.lm_head.weight.dtype)
             if use_cache else None)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.temperature else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out: list[_Decoded | None] = [None] * B
    new: list[list[int]] = [[] for _ in range(B)]
    experts: list[int | None] = [None] * B
    step_ids = ids
    for step in range(sampling.max_new_tokens):
        q_len = step_ids.shape[1]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, valid.shape[1] - q_len:]
        mask = padding_mask(valid, q_len) if ragged else None
        if step == 0 and routing is not None:
            logits, chosen = routed_prefill(model, routing, ids, valid, positions, mask, cache)
            experts = chosen.tolist() if chosen.dim() == 1 else experts
        else:
            logits = model(step_ids, positions=positions, attn_mask=mask, cache=cache, logits_at=slice(-1, None))
        token = next_token(logits[:, -1], sampling, generator)
        is_stop = torch.isin(token, stop).tolist()
        for row, (tok, eos) in enumerate(zip(token.tolist(), is_stop)):
            if out[row] is not None:
                continue
            if eos:
                out[row] = _Decoded(new[row], "eos", time.perf_counter() - start, experts[row])
                continue
            new[row].append(tok)
            if stopped is not None and stopped(new[row]):
                out[row] = _Decoded(new[row], "stop", time.perf_counter() - start, experts[row])
            elif step == sampling.max_new_tokens - 1:
                out[row] = _Decoded(new[row], "length", time.perf_counter() - start, experts[row])
        if all(o is not None for o in out):
            break
        token = token.masked_fill(torch.tensor([o is not None for o in out], device=device), pad_id)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_ids = token[:, None] if use_cache else ids
    return [o if o is not None else _Decoded(new[i], "length", time.perf_counter() - start, experts[i])
            for i, o in enumerate(out)]


def routed_prefill(model: Transformer, routing: Routing, ids: Tensor, valid: Tensor, positions: Tensor,
                   mask: Tensor | None, cache: KVCache | None) -> tuple[Tensor, Tensor]:
    """The prefill of left-padded prompts as MoA's routing pass: each layer follows its own router, read
    from its input over the prompt. Then the strategy fixes the experts; rows whose layers did not all
    use the expert chosen for them (last or vote, with routers that disagree) are prefilled again with
    it, so logits and cache are exactly those of the chosen route. Returns last logits and the experts."""
    B, P = ids.shape
    rows = torch.arange(B, device=ids.device)
    index = PromptIndex(rows * P + P - 1, torch.where(valid, rows[:, None], -1).flatten(), B)
    with pooled_block_inputs(model, index, routing.routers.spec.pooling, routing.routers) as pooled:
        logits = model(ids, positions=positions, attn_mask=mask, cache=cache, logits_at=slice(-1, None))
    scores = routing.routers(pooled)  # [L, B, N]
    chosen = routing.choose(scores)
    redo = (scores.argmax(-1) != chosen).any(0).nonzero()[:, 0]
    if len(redo):
        apply_route(model, chosen[redo])
        again = None if cache is None else KVCache(model.config, len(redo), P, cache.k.device, cache.k.dtype)
        logits[redo] = model(ids[redo], positions=positions[redo], attn_mask=None if mask is None else mask[redo],
                             cache=again, logits_at=slice(-1, None))
        if again is not None:
            cache.k[:, redo, :, :P], cache.v[:, redo, :, :P] = again.k, again.v
    apply_route(model, chosen)
    return logits, chosen


def greedy(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
           pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Greedy continuation of each prompt, up to and excluding the first stop token."""
    return [d.tokens for d in decode(model, prompts, Sampling(max_new_tokens), stop_ids, pad_id, use_cache)]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string that follows its leading whitespace (an answer may begin
    on a new line; a blank line after it ends it)."""
    begin = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, begin) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def stop_ids(model: Transformer, tokenizer: Tokenizer) -> set[int]:
    ids = (tokenizer.eos_token_id, model.config.eos_token_id)
    return {i for i in ids if isinstance(i, int)}


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for k in range(0, len(order), batch_size):
        yield order[k:k + batch_size]


def apply_route(model: Transformer, route: Tensor) -> None:
    """Set experts [B] on every layer, or [L, B] layer by layer."""
    if route.dim() == 1:
        return set_route(model, route)
    if route.shape[0] != len(model.model.layers):
        raise MoaError(f"a per-layer route needs {len(model.model.layers)} layers of experts, got {route.shape[0]}")
    for block, layer_route in zip(model.model.layers, route):
        set_route(block, layer_route)


def generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]], sampling: Sampling,
             batch_size: int = 8, route: Routing | None = None, progress: str | None = None) -> list[Generation]:
    """Generate for every prompt (token ids); batches hold prompts of similar length, results come back
    in the input order. `route` picks each sequence's expert(s) in the prefill (MoA)."""
    if not prompts:
        return []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    stops = sampling.stop

    def stopped(tokens: list[int]) -> bool:
        return cut_at_stop(tokenizer.decode(tokens), stops)[1]

    with tqdm(total=len(prompts), desc=progress, unit="seq", disable=progress is None) as bar:
        for number, rows in enumerate(_batches(order, batch_size)):
            batch = [list(prompts[i]) for i in rows]
            decoded = decode(model, batch, sampling, stop_ids(model, tokenizer), tokenizer.pad_token_id,
                             stopped=stopped if stops else None, routing=route)
            for i, d in zip(rows, decoded):
                text, _ = cut_at_stop(tokenizer.decode(d.tokens), stops)
                results[i] = Generation(text, d.tokens, len(prompts[i]), d.seconds, d.finish, d.expert, number)
            bar.update(len(rows))
    return [r for r in results if r is not None]


@torch.inference_mode()
def score(model: Transformer, examples: Sequence[Example], batch_size: int = 8,
          route: Routing | None = None) -> list[tuple[float, int]]:
    """Per example: the summed negative log-likelihood (nats) of its target tokens (EOS included) given
    its prompt, and how many tokens that is; in the input order."""
    if not examples:
        return []
    longest = max(len(e) for e in examples)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for batch in bucket(examples, longest * batch_size):
        if route is not None:
            apply_route(model, route(model, [examples[i].prompt_ids for i in batch.example_index]))
        means = lm_loss(model, batch, reduction="per_example").tolist()
        for i, mean in zip(batch.example_index, means):
            n = len(examples[i].target_ids)
            out[i] = (mean * n, n)
    return out
