"""The inference engine: continuous batching over a stream of requests, packed prefill, greedy or seeded
temperature/top-p sampling, stop on EOS, stop strings or a token budget; per-sequence experts (each
request's own, or MoA's choice decided in the prefill); and packed log-likelihood scoring of targets.

A stream is served by up to `batch_size` sequences at a time, each in a slot of a SlotCache. Every
iteration first admits waiting prompts into free slots, prefilling them packed into one row (no padding,
per-document attention), then decodes one token for every sequence in flight. A sequence that ends frees
its slot at once for the next prompt, so no step decodes a finished sequence. Requests are admitted
largest token budget first, then longest prompt first (longest processing time first): the long decodes
start while there is work to overlap them with, the stream ends on short ones, and the long prefills run
while the batch fills. A prompt that shares a prefix with another sequence in flight on the same route
(an instruction template, a few-shot block) computes only the rest and reads the prefix's keys and values
from that sequence's slot (prefix caching, as vLLM's and SGLang's); the cache is shortened as the longest
sequences finish, since a decoding step reads every slot's whole length. Greedy outputs equal those of
decoding each prompt alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import accumulate

import torch
import torch.nn.functional as F
from tokenizers.decoders import DecodeStream
from torch import Tensor
from tqdm import tqdm

from moa.data.batching import Example
from moa.errors import MoaError
from moa.lora import lora_layers
from moa.model.llama import Documents, SlotCache, Transformer
from moa.model.tokenizer import Tokenizer
from moa.routing import SequenceRouter, activate_experts

PREFILL_TOKENS = 2048  # prompt tokens packed into one prefill: enough for full-speed matmuls
SCORE_TOKENS = 4096  # tokens packed into one scoring row
MIN_SHARED_PREFIX = 4  # prompt tokens worth reading from another sequence's slot instead of computing


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 decodes greedily
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string after its leading whitespace


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    sampling: Sampling
    expert: int | None = None  # the expert that serves it (the oracle's); None: the router's choice, or none


class Finish(StrEnum):
    """Why a sequence ended."""

    EOS = "eos"  # a stop token
    STOP = "stop"  # a stop string
    LENGTH = "length"  # the token budget


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]  # generated ids, without the EOS; the last one completes a stop string if one ended it
    prompt_tokens: int
    latency_s: float  # from the sequence's admission (prefill and routing included) to its end
    finish: Finish
    expert: int | None = None  # the expert that served it (None: no expert, or one per layer)


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


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string that follows its leading whitespace (an answer may begin
    on a new line; a blank line after it ends it)."""
    begin = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, begin) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopStrings:
    """`cut_at_stop`'s rule, checked as tokens arrive: only the new text (and the few characters before it
    that a stop string may start in) is decoded and searched at each step."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.reach = max(map(len, self.stops), default=1) - 1  # how far back a stop string may start
        self.stream = DecodeStream(skip_special_tokens=True)
        self.text = ""
        self.begin: int | None = None  # where the text after its leading whitespace starts

    def add(self, token: int) -> bool:
        """Take the next token; whether a stop string has now appeared."""
        piece = self.stream.step(self.tokenizer.backend, token) if self.stops else None
        if not piece:
            return False
        seen, self.text = len(self.text), self.text + piece
        if self.begin is None:
            if not self.text.strip():
                return False
            self.begin = len(self.text) - len(self.text.lstrip())
        start = max(self.begin, seen - self.reach)
        return any(self.text.find(s, start) >= 0 for s in self.stops)


def stop_ids(model: Transformer, tokenizer: Tokenizer) -> set[int]:
    ids = (tokenizer.eos_token_id, model.config.eos_token_id)
    return {i for i in ids if isinstance(i, int)}


@dataclass(frozen=True)
class Served:
    """A stream served: every request's generation (in the input order) and what serving it cost."""

    generations: list[Generation]
    prompt_tokens: int
    new_tokens: int
    reused_tokens: int  # prompt tokens not computed: a shared prefix read from another sequence's slot
    prefill_s: float  # admitting prompts: packed prefills (and MoA's routing)
    decode_s: float  # decoding steps

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


@dataclass
class _Sequence:
    """A request in flight."""

    index: int  # into the requests
    request: Request
    stops: StopStrings
    generator: torch.Generator | None
    started: float
    tokens: list[int] = field(default_factory=list)


class _Engine:
    """Continuous batching of one stream (see the module docstring)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, requests: Sequence[Request], batch_size: int,
                 router: SequenceRouter | None, stop_tokens: set[int]) -> None:
        self.model, self.tokenizer, self.requests, self.router = model, tokenizer, requests, router
        self.device = model.lm_head.weight.device
        self.cache = SlotCache(model.config, min(batch_size, len(requests)), max(map(_reach, requests)),
                               self.device, model.lm_head.weight.dtype, model.cache_passes)
        self.stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=self.device)
        self.running: list[_Sequence] = []  # slot i holds running[i]
        fixed = [r.expert is not None for r in requests]
        if any(fixed) and (router is not None or not all(fixed)):
            raise MoaError("either every request names its expert, or a router chooses them all; not a mix")
        routed = router is not None or any(fixed)
        self.experts = (torch.zeros(len(model.model.layers), self.cache.slots, dtype=torch.long, device=self.device)
                        if routed and lora_layers(model) else None)  # [L, slots]: each slot's expert per layer
        self.per_layer = router is not None and router.per_layer  # no one expert per sequence
        # Routers read the whole prompt before any layer's expert is known: nothing is shared under them.
        self.shareable = ([0] * len(requests) if router is not None else
                          shareable_prefixes([r.prompt for r in requests], [r.expert for r in requests]))
        self.share_lengths = sorted(set(self.shareable) - {0}, reverse=True)
        self.results: list[Generation | None] = [None] * len(requests)
        self.done = self.reused = 0
        self.prefill_s = self.decode_s = 0.0

    @property
    def free(self) -> int:
        return self.cache.slots - len(self.running)

    def admit(self, indices: list[int]) -> None:
        """Prefill these requests, packed, into the next free slots and take each one's first token. A prompt
        that shares a prefix with a sequence in flight (or with one admitted in full alongside it) on the same
        route computes only the rest; the prefix's keys and values are read from that sequence's slot."""
        slots = list(range(len(self.running), len(self.running) + len(indices)))
        starts, sources = self._shared_prefixes(indices, slots)
        prompts = [self.requests[i].prompt[start:] for i, start in zip(indices, starts)]
        lengths = [len(p) for p in prompts]
        started = time.perf_counter()
        positions = self.cache.prefill(slots, lengths, starts, sources)
        ids = torch.tensor([[t for p in prompts for t in p]], device=self.device)
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[0, torch.tensor(lengths, device=self.device).cumsum(0) - 1] = True
        if self.router is not None:
            logits, chosen = self.router.prefill(self.model, ids, positions, lengths, self.cache, slots)
            self.experts[:, slots] = chosen if chosen.dim() == 2 else chosen[None]
        else:
            if self.experts is not None:
                fixed = torch.tensor([self.requests[i].expert for i in indices], device=self.device)
                self.experts[:, slots] = fixed[None]
                activate_experts(self.model, fixed, lengths)
            logits = self.model(ids, positions=positions, cache=self.cache, logits_at=last)
        self.reused += sum(starts)
        first = len(self.running)
        for i in indices:
            sampling = self.requests[i].sampling
            generator = (torch.Generator(self.device).manual_seed(sampling.seed + i) if sampling.temperature
                         else None)  # one per request: its draws do not depend on what it is batched with
            self.running.append(_Sequence(i, self.requests[i], StopStrings(self.tokenizer, sampling.stop),
                                          generator, started))
        self._take(logits, first)
        self.prefill_s += time.perf_counter() - started

    def _shared_prefixes(self, indices: list[int], slots: list[int]) -> tuple[list[int], list[int]]:
        """Each admitted request's start (the length of the prefix it reads instead of computing) and the slot
        that holds that prefix: a sequence in flight, or one admitted in full in the same prefill."""
        holders: dict[tuple, int] = {}
        for slot, seq in enumerate(self.running):
            self._register(holders, seq.index, slot)
        starts, sources = [], []
        for i, slot in zip(indices, slots):
            request = self.requests[i]
            found = next(((m, holders[key]) for m in self.share_lengths if m <= self.shareable[i]
                          if (key := (request.expert, tuple(request.prompt[:m]))) in holders), (0, slot))
            if found[0] == 0:
                self._register(holders, i, slot)
            starts.append(found[0])
            sources.append(found[1])
        return starts, sources

    def _register(self, holders: dict[tuple, int], i: int, slot: int) -> None:
        """Slot `slot` holds request i's prompt: index it under every shareable prefix length it reaches."""
        request = self.requests[i]
        for m in self.share_lengths:
            if m <= self.shareable[i]:
                holders.setdefault((request.expert, tuple(request.prompt[:m])), slot)

    def fit(self, waiting: int) -> None:
        """Shorten the cache to what the sequences in flight and the `waiting` reach of those still to come
        can fill, once that saves a quarter of it: a decoding step reads every slot's whole length."""
        reach = max([waiting, *(_reach(seq.request) for seq in self.running)])
        if reach <= self.cache.max_len * 3 // 4:
            self.cache.truncate(reach)

    def step(self) -> None:
        """One token for every sequence in flight."""
        started, n = time.perf_counter(), len(self.running)
        positions = self.cache.decode(n)
        if self.experts is not None:
            activate_experts(self.model, self.experts[:, :n])
        last = torch.tensor([[s.tokens[-1]] for s in self.running], device=self.device)
        self._take(self.model(last, positions=positions, cache=self.cache))
        self.decode_s += time.perf_counter() - started

    def _take(self, logits: Tensor, first: int = 0) -> None:
        """The next token of the sequences in slots first.. from their logits ([n, V] or [n, 1, V], in slot
        order); end the sequences that are done and fill their slots with the last ones."""
        taking = self.running[first:]
        logits = logits.reshape(len(taking), -1)
        greedy = all(s.generator is None for s in taking)
        logits = logits.float()  # argmax over a bfloat16 vocabulary is several times slower on CPU
        tokens = (logits.argmax(-1) if greedy else torch.cat([
            next_token(row[None], s.request.sampling, s.generator) for row, s in zip(logits, taking)]))
        ended = torch.isin(tokens, self.stop).tolist()
        done = []
        for slot, (seq, token, eos) in enumerate(zip(taking, tokens.tolist(), ended), start=first):
            finish = Finish.EOS if eos else None
            if not eos:
                seq.tokens.append(token)
                if seq.stops.add(token):
                    finish = Finish.STOP
                elif len(seq.tokens) == seq.request.sampling.max_new_tokens:
                    finish = Finish.LENGTH
            if finish is not None:
                self._end(seq, slot, finish)
                done.append(slot)
        for slot in reversed(done):  # highest first: a moved sequence never lands in a slot still to clear
            self._release(slot)

    def _end(self, seq: _Sequence, slot: int, finish: Finish) -> None:
        text, _ = cut_at_stop(self.tokenizer.decode(seq.tokens), seq.request.sampling.stop)
        expert = None if self.experts is None or self.per_layer else int(self.experts[0, slot])
        self.results[seq.index] = Generation(text, seq.tokens, len(seq.request.prompt),
                                             time.perf_counter() - seq.started, finish, expert)
        self.done += 1

    def _release(self, slot: int) -> None:
        last = len(self.running) - 1
        if slot != last:
            self.cache.move(last, slot)
            if self.experts is not None:
                self.experts[:, slot] = self.experts[:, last]
            self.running[slot] = self.running[last]
        self.running.pop()


def _reach(request: Request) -> int:
    """The most cache positions a request's sequence can fill."""
    return len(request.prompt) + request.sampling.max_new_tokens


def shareable_prefixes(prompts: Sequence[list[int]], routes: Sequence[int | None]) -> list[int]:
    """For each prompt, the longest prefix it shares with another prompt served by the same route (an
    expert, or None), up to all but its last token (which must run for the first logits); 0 where that is
    shorter than MIN_SHARED_PREFIX. The longest common prefix with any other prompt is the one with a
    neighbour in sorted order."""
    order = sorted(range(len(prompts)), key=lambda i: (-1 if routes[i] is None else routes[i], prompts[i]))
    shared = [0] * len(prompts)
    for a, b in zip(order, order[1:]):
        if routes[a] == routes[b]:
            common = next((k for k, (x, y) in enumerate(zip(prompts[a], prompts[b])) if x != y),
                          min(len(prompts[a]), len(prompts[b])))
            for i in (a, b):
                shared[i] = max(shared[i], min(common, len(prompts[i]) - 1))
    return [m if m >= MIN_SHARED_PREFIX else 0 for m in shared]


def _admissions(requests: Sequence[Request], order: deque[int], free: int) -> list[int]:
    """The next waiting requests that fit the free slots and one prefill's token budget (at least one)."""
    taken, tokens = [], 0
    while order and len(taken) < free and (not taken or tokens + len(requests[order[0]].prompt) <= PREFILL_TOKENS):
        tokens += len(requests[order[0]].prompt)
        taken.append(order.popleft())
    return taken


@torch.inference_mode()
def serve(model: Transformer, tokenizer: Tokenizer, requests: Sequence[Request], batch_size: int = 64,
          router: SequenceRouter | None = None, progress: str | None = None,
          stop_tokens: set[int] | None = None) -> Served:
    """Serve every request. Requests with an `expert` are served by it; with a `router` (MoA), each
    sequence's expert(s) are decided in its prefill. A sequence ends at a stop token (default: the
    tokenizer's and the model's EOS), a stop string or its token budget."""
    if not requests:
        return Served([], 0, 0, 0, 0.0, 0.0)
    stops = stop_ids(model, tokenizer) if stop_tokens is None else stop_tokens
    engine = _Engine(model, tokenizer, requests, batch_size, router, stops)
    order = deque(sorted(range(len(requests)), key=lambda i: (-requests[i].sampling.max_new_tokens,
                                                             -len(requests[i].prompt))))
    still_needed = list(accumulate((_reach(requests[i]) for i in reversed(order)), max))[::-1] + [0]
    with tqdm(total=len(requests), desc=progress, unit="seq", disable=progress is None) as bar:
        while order or engine.running:
            if order and engine.free:
                engine.admit(_admissions(requests, order, engine.free))
            engine.fit(still_needed[len(requests) - len(order)])
            if engine.running:
                engine.step()
            bar.update(engine.done - bar.n)
    generations = [r for r in engine.results if r is not None]
    return Served(generations, sum(len(r.prompt) for r in requests), sum(len(g.tokens) for g in generations),
                  engine.reused, engine.prefill_s, engine.decode_s)


def generate(model: Transformer, tokenizer: Tokenizer, requests: Sequence[Request], batch_size: int = 64,
             router: SequenceRouter | None = None, progress: str | None = None,
             stop_tokens: set[int] | None = None) -> list[Generation]:
    """Every request's generation, in the input order (see serve)."""
    return serve(model, tokenizer, requests, batch_size, router, progress, stop_tokens).generations


def greedy(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
           batch_size: int = 64, stop_tokens: set[int] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt, up to and excluding the first stop token (see generate)."""
    requests = [Request(list(p), Sampling(max_new_tokens)) for p in prompts]
    return [g.tokens for g in generate(model, tokenizer, requests, batch_size, stop_tokens=stop_tokens)]


# --- scoring ------------------------------------------------------------------------------------------


def _rows(examples: Sequence[Example], budget: int) -> Iterator[list[int]]:
    """Examples packed into rows of at most `budget` tokens (one longer example makes a row alone)."""
    row, tokens = [], 0
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i])):
        if row and tokens + len(examples[i]) > budget:
            yield row
            row, tokens = [], 0
        row.append(i)
        tokens += len(examples[i])
    if row:
        yield row


@dataclass(frozen=True)
class Scored:
    """One example's target under the model: its summed negative log-likelihood (nats), its tokens, and whether
    greedy decoding would produce it (every target token the argmax)."""

    nll: float
    tokens: int
    greedy: bool


def score(model: Transformer, examples: Sequence[Example], experts: Sequence[int] | None = None,
          router: SequenceRouter | None = None) -> list[tuple[float, int]]:
    """Per example: the summed negative log-likelihood (nats) of its target tokens (EOS included) given
    its prompt, and how many tokens that is; in the input order (see scored)."""
    return [(s.nll, s.tokens) for s in scored(model, examples, experts, router)]


@torch.inference_mode()
def scored(model: Transformer, examples: Sequence[Example], experts: Sequence[int] | None = None,
           router: SequenceRouter | None = None) -> list[Scored]:
    """Every example's target scored given its prompt, in the input order. Examples are packed into rows without
    padding, each attending only to itself. `experts` serve each example (the oracle's); a `router` decides them
    from the prompts first (MoA)."""
    device = model.lm_head.weight.device
    out: list[Scored] = [Scored(0.0, 0, True)] * len(examples)
    for row in _rows(examples, SCORE_TOKENS):
        docs = [examples[i] for i in row]
        lengths = [len(e) for e in docs]
        if router is not None:
            activate_experts(model, router(model, [e.prompt_ids for e in docs]), lengths)
        elif experts is not None:
            activate_experts(model, torch.tensor([experts[i] for i in row], device=device), lengths)
        ids = torch.tensor([[t for e in docs for t in e.prompt_ids + e.target_ids]], device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        at = torch.zeros_like(ids, dtype=torch.bool)  # position t predicts token t + 1
        start = 0
        for e in docs:
            at[0, start + len(e.prompt_ids) - 1:start + len(e) - 1] = True
            start += len(e)
        logits = model(ids, positions=positions, attn_mask=Documents(tuple(lengths)), logits_at=at)
        targets = torch.tensor([t for e in docs for t in e.target_ids], device=device)
        sizes = [len(e.target_ids) for e in docs]
        nll = F.cross_entropy(logits.float(), targets, reduction="none").split(sizes)
        hits = (logits.argmax(-1) == targets).split(sizes)
        for i, values, hit in zip(row, nll, hits):
            out[i] = Scored(float(values.sum()), len(values), bool(hit.all()))
    return out
