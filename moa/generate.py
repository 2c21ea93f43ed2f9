"""The inference engine: batched decoding with a KV cache over ragged (left-padded) prompts, greedy or
seeded temperature/top-p sampling, stop on EOS, stop strings or a token budget; MoA routing decided in
the prefill, once per sequence; and batched log-likelihood scoring of targets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor
from tqdm import tqdm

from moa.data.batching import Example, bucket, lm_loss
from moa.model.llama import KVCache, Transformer, padding_mask
from moa.model.tokenizer import Tokenizer
from moa.routing import LearnedRouter, activate_experts, prefill_and_route


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 decodes greedily
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string after its leading whitespace


class Finish(StrEnum):
    """Why a sequence ended."""

    EOS = "eos"  # a stop token
    STOP = "stop"  # a stop string
    LENGTH = "length"  # the token budget


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]  # generated ids, without the EOS and without what follows a stop string
    prompt_tokens: int
    latency_s: float  # from the batch's start (prefill and routing included) to this sequence's end
    finish: Finish
    expert: int | None = None  # the expert the route chose (MoA with one expert per sequence)
    batch: int = 0  # which decoding batch it ran in


@dataclass
class _Decoded:
    tokens: list[int]
    finish: Finish
    seconds: float
    expert: int | None = None


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
           router: LearnedRouter | None = None) -> list[_Decoded]:
    """Continue every prompt in one batch until a stop token, `stopped(tokens)` or the token budget;
    with `router`, the prefill also picks each sequence's experts (kept for every new token)."""
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
        if step == 0 and router is not None:
            logits, chosen = prefill_and_route(model, router, ids, valid, positions, mask, cache)
            experts = chosen.tolist() if chosen.dim() == 1 else experts
        else:
            logits = model(step_ids, positions=positions, attn_mask=mask, cache=cache, logits_at=slice(-1, None))
        token = next_token(logits[:, -1], sampling, generator)
        is_stop = torch.isin(token, stop).tolist()
        for row, (tok, eos) in enumerate(zip(token.tolist(), is_stop)):
            if out[row] is not None:
                continue
            if eos:
                out[row] = _Decoded(new[row], Finish.EOS, time.perf_counter() - start, experts[row])
                continue
            new[row].append(tok)
            if stopped is not None and stopped(new[row]):
                out[row] = _Decoded(new[row], Finish.STOP, time.perf_counter() - start, experts[row])
            elif step == sampling.max_new_tokens - 1:
                out[row] = _Decoded(new[row], Finish.LENGTH, time.perf_counter() - start, experts[row])
        if all(o is not None for o in out):
            break
        token = token.masked_fill(torch.tensor([o is not None for o in out], device=device), pad_id)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_ids = token[:, None] if use_cache else ids
    return [o if o is not None else _Decoded(new[i], Finish.LENGTH, time.perf_counter() - start, experts[i])
            for i, o in enumerate(out)]


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


def generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]], sampling: Sampling,
             batch_size: int = 8, router: LearnedRouter | None = None,
             progress: str | None = None) -> list[Generation]:
    """Generate for every prompt (token ids); batches hold prompts of similar length, results come back
    in the input order. `router` picks each sequence's expert(s) in the prefill (MoA)."""
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
                             stopped=stopped if stops else None, router=router)
            for i, d in zip(rows, decoded):
                text, _ = cut_at_stop(tokenizer.decode(d.tokens), stops)
                results[i] = Generation(text, d.tokens, len(prompts[i]), d.seconds, d.finish, d.expert, number)
            bar.update(len(rows))
    return [r for r in results if r is not None]


@torch.inference_mode()
def score(model: Transformer, examples: Sequence[Example], batch_size: int = 8,
          router: LearnedRouter | None = None) -> list[tuple[float, int]]:
    """Per example: the summed negative log-likelihood (nats) of its target tokens (EOS included) given
    its prompt, and how many tokens that is; in the input order."""
    if not examples:
        return []
    longest = max(len(e) for e in examples)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for batch in bucket(examples, longest * batch_size):
        if router is not None:
            activate_experts(model, router(model, [examples[i].prompt_ids for i in batch.example_index]))
        means = lm_loss(model, batch, reduction="per_example").tolist()
        for i, mean in zip(batch.example_index, means):
            n = len(examples[i].target_ids)
            out[i] = (mean * n, n)
    return out
