"""MoA routing (Feng et al., 2024): a task classifier before every transformer block reads a summary of
the block's input over the prompt, and the N task LoRAs are its experts.

The pieces, from the classifiers up:
- `LayerRouters`: one classifier per block (linear or a 2-layer MLP), saved as routers.safetensors +
  router_config.json (`save_routers`, `load_routers`);
- `pooled_block_inputs`: every block's input pooled per document (mean over the prompt, or its last
  token) while the model runs once; with routers, each block's LoRA layers follow its own router;
  `pooled_prompts` runs the model once over a batch to get them;
- `router_logits`: every layer's router logits for a batch; `choose_experts` turns them into each
  sequence's expert(s) by a `Strategy`;
- `LearnedRouter`: routers + strategy, MoA at inference: it decides the experts while the prefill reads
  the prompt, so that routing costs no extra pass;
- `CentroidRouter`: the training-free baseline, the nearest task centroid of the base model's states.
Both are `SequenceRouter`s, which the engine (moa.generate) calls to prefill what it admits.

Training (moa.train.router) and inference (moa.generate) both build on these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from moa.data.batching import IGNORE, Batch
from moa.errors import MoaError
from moa.io import read_json, write_safetensors
from moa.layout import ROUTER_CONFIG, ROUTER_WEIGHTS
from moa.lora import activate, activated
from moa.model.llama import Documents, SlotCache, Transformer


class RouterType(StrEnum):
    LINEAR = "linear"  # H -> N
    MLP = "mlp"  # H -> hidden -> N


class Pooling(StrEnum):
    """What a router reads of its block's input over the prompt."""

    MEAN = "mean"
    LAST = "last"  # the last prompt token


class Strategy(StrEnum):
    """How the routers' logits [L, D, N] become each sequence's experts."""

    LAST = "last"  # the last router decides for every layer (the paper found it most stable)
    VOTE = "vote"  # the majority over layers
    PER_LAYER = "per_layer"  # each layer follows its own router


SEQUENCE_STRATEGIES = (Strategy.LAST, Strategy.VOTE)  # one expert per sequence


class Upstream(StrEnum):
    """Which experts the layers before a router apply while it reads (router evaluation)."""

    TEACHER_FORCED = "teacher_forced"  # the true task's: the states the routers trained on
    ROUTED = "routed"  # each layer's own router's choice: all that inference can do without labels


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


# --- the routers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to rebuild the routers (stored in router_config.json)."""

    type: RouterType
    pooling: Pooling
    n_layers: int
    hidden_size: int
    tasks: tuple[str, ...]  # the experts, in order
    hidden: int | None = None  # the mlp's width
    activation: str | None = None  # the mlp's nonlinearity

    @property
    def n_experts(self) -> int:
        return len(self.tasks)


class LayerRouters(nn.Module):
    """One task classifier per transformer block, saved as `routers.{layer}.weight`/`.bias` (linear)
    or `routers.{layer}.{0,2}.weight`/`.bias` (mlp)."""

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.routers = nn.ModuleList(self._router(spec) for _ in range(spec.n_layers))

    @staticmethod
    def _router(spec: RouterSpec) -> nn.Module:
        if spec.type == RouterType.LINEAR:
            return nn.Linear(spec.hidden_size, spec.n_experts)
        if spec.type == RouterType.MLP and spec.hidden and spec.activation in ACTIVATIONS:
            return nn.Sequential(nn.Linear(spec.hidden_size, spec.hidden), ACTIVATIONS[spec.activation](),
                                 nn.Linear(spec.hidden, spec.n_experts))
        raise MoaError(f"unknown router {spec.type!r} (hidden {spec.hidden}, activation {spec.activation!r}); "
                       f"use linear, or mlp with a hidden width and gelu or relu")

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def score(self, layer: int, pooled: Tensor) -> Tensor:
        """Router logits [D, N] of one layer from its pooled block inputs [D, H].

        A parameter-free RMS norm comes first: the residual stream's scale grows with depth and differs
        between models, and one learning rate should suit every router."""
        router = self.routers[layer]
        x = F.rms_norm(pooled.to(next(router.parameters()).dtype), (pooled.shape[-1],))
        return router(x)

    def forward(self, pooled: Sequence[Tensor]) -> Tensor:
        """Per-layer pooled block inputs (L x [D, H]) -> router logits [L, D, N]."""
        return torch.stack([self.score(layer, x) for layer, x in enumerate(pooled)])


def save_routers(directory: Path, routers: LayerRouters, **provenance: Any) -> None:
    """routers.safetensors + router_config.json (the spec, the parameter count and `provenance`)."""
    write_safetensors(directory / ROUTER_WEIGHTS, routers.state_dict())
    config = {**asdict(routers.spec), "n_experts": routers.spec.n_experts, "parameters": routers.n_parameters}
    (directory / ROUTER_CONFIG).write_text(json.dumps({**config, **provenance}, indent=2) + "\n")


def load_routers(directory: str | Path) -> LayerRouters:
    """The routers that train-router wrote into `directory` (e.g. results/{experiment}/moa/)."""
    directory = Path(directory)
    config_file, weights_file = directory / ROUTER_CONFIG, directory / ROUTER_WEIGHTS
    hint = "run `moa train-router --config ...` first"
    raw = read_json(config_file, hint)
    if not weights_file.is_file():
        raise MoaError(f"{weights_file}: not found; {hint}")
    try:
        spec = RouterSpec(**{f.name: raw[f.name] for f in fields(RouterSpec)})
        routers = LayerRouters(replace(spec, type=RouterType(spec.type), pooling=Pooling(spec.pooling),
                                       tasks=tuple(spec.tasks)))
        routers.load_state_dict(load_file(weights_file))
    except (KeyError, TypeError, ValueError) as err:
        raise MoaError(f"{config_file}: not a router config ({err!r}); rerun train-router") from None
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise MoaError(f"{weights_file}: does not match {ROUTER_CONFIG} ({first}); rerun train-router") from None
    return routers.eval()


# --- reading a block's input over the prompt ------------------------------------------------------------


@dataclass(frozen=True)
class PromptIndex:
    """Where each document lies in a batch flattened to [B*T]."""

    last: Tensor  # [D]: flat position of each document's last prompt token
    doc: Tensor  # [B*T]: the document number of each prompt token, -1 elsewhere
    n_docs: int
    owner: Tensor  # [B*T]: the document number of every token (prompt or target), -1 on padding


def prompt_index(batch: Batch) -> PromptIndex:
    """A document's prompt ends at its first labelled position (that token predicts the first target
    token); a document without labels (a prompt alone, as at inference) is all prompt."""
    doc = batch.document_index().flatten()
    n, n_docs = doc.numel(), batch.n_examples
    pos = torch.arange(n, device=doc.device)
    real, labelled = doc >= 0, batch.labels.flatten() != IGNORE
    first_label = doc.new_full((n_docs,), n).scatter_reduce(0, doc[labelled], pos[labelled], "amin")
    last_token = doc.new_full((n_docs,), -1).scatter_reduce(0, doc[real], pos[real], "amax")
    last = torch.where(first_label < n, first_label, last_token)
    in_prompt = real & (pos <= last[doc.clamp(min=0)])  # documents are contiguous: start <= pos holds
    return PromptIndex(last, torch.where(in_prompt, doc, -1), n_docs, doc)


def packed_index(lengths: Sequence[int], device: torch.device) -> PromptIndex:
    """The PromptIndex of prompts alone packed back to back in one row."""
    sizes = torch.tensor(lengths, device=device)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), sizes)
    return PromptIndex(sizes.cumsum(0) - 1, owner, len(lengths), owner)


def pool(hidden: Tensor, index: PromptIndex, pooling: Pooling) -> Tensor:
    """Block inputs [B, T, H] -> one fp32 summary per document [D, H]."""
    flat = hidden.flatten(0, 1)
    if pooling == Pooling.LAST:
        return flat[index.last].float()
    if pooling == Pooling.MEAN:
        at = index.doc >= 0
        sums = flat.new_zeros(index.n_docs, flat.shape[1], dtype=torch.float32)
        sums.index_add_(0, index.doc[at], flat[at].float())
        return sums / torch.bincount(index.doc[at], minlength=index.n_docs)[:, None]
    raise MoaError(f"unknown router pooling {pooling!r}: use last or mean")


@contextmanager
def pooled_block_inputs(model: Transformer, index: PromptIndex, pooling: Pooling,
                        routers: LayerRouters | None = None) -> Iterator[list[Tensor | None]]:
    """While the model runs once, collect every block's input pooled per document (L x [D, H]).

    With `routers`, each block's LoRA layers first follow that block's own router (argmax per document):
    the routing pass of inference, where no label is known."""
    pooled: list[Tensor | None] = [None] * len(model.model.layers)

    def hook(layer: int, block: nn.Module, args: tuple[Any, ...]) -> None:
        pooled[layer] = pool(args[0], index, pooling)
        if routers is not None:  # each token follows its document's choice
            choice = routers.score(layer, pooled[layer]).argmax(-1)
            activate(block, choice[index.owner.clamp(min=0)].view(args[0].shape[:2]))

    handles = [block.register_forward_pre_hook(partial(hook, layer)) for layer, block in enumerate(model.model.layers)]
    try:
        yield pooled
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def pooled_prompts(model: Transformer, batch: Batch, pooling: Pooling,
                   routers: LayerRouters | None = None) -> list[Tensor]:
    """Every block's input pooled over each document's prompt (L x [D, H], fp32) of one run over `batch`
    (targets in the batch are never seen: the causal mask keeps them out of the prompts' states).

    Without `routers`: the model's current experts, e.g. the true tasks under `activated(model, batch.tasks)`;
    with them: each layer's experts follow its own router (what inference can do without labels)."""
    batch = batch.to(next(model.parameters()).device)
    follow = routers is not None
    restore = activated(model, None) if follow else nullcontext()  # undoes what the hooks activate
    with restore, pooled_block_inputs(model, prompt_index(batch), pooling, routers) as pooled:
        model(batch.input_ids, positions=batch.positions, attn_mask=batch.documents(), logits_at=slice(0, 0))
    return pooled


@torch.no_grad()
def router_logits(model: Transformer, routers: LayerRouters, batch: Batch, follow: bool = True) -> Tensor:
    """Router logits [L, D, N] of every layer for every document of `batch`, read from the prompts only.

    follow=True: each layer's experts follow its own router; follow=False: the model's current experts
    (see pooled_prompts)."""
    return routers(pooled_prompts(model, batch, routers.spec.pooling, routers if follow else None))


def choose_experts(logits: Tensor, strategy: Strategy) -> Tensor:
    """Router logits [L, D, N] -> one expert per document [D] (`last`; `vote`: the majority over layers,
    ties to the higher mean probability) or one per layer and document [L, D] (`per_layer`)."""
    if strategy == Strategy.LAST:
        return logits[-1].argmax(-1)
    if strategy == Strategy.VOTE:
        votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)  # [D, N]
        return (votes + 0.5 * logits.softmax(-1).mean(0)).argmax(-1)  # the bonus is < 1 vote
    if strategy == Strategy.PER_LAYER:
        return logits.argmax(-1)
    raise MoaError(f"unknown routing strategy {strategy!r}: use one of {', '.join(Strategy)}")


def activate_experts(model: Transformer, chosen: Tensor, lengths: Sequence[int] | None = None) -> None:
    """Activate experts [B] on every layer, or [L, B] layer by layer: one per row, or with `lengths`, one per
    document of a packed row (each of its tokens gets its document's expert)."""
    if lengths is not None:
        chosen = torch.repeat_interleave(chosen, torch.tensor(lengths, device=chosen.device), dim=-1)[..., None, :]
    if chosen.dim() == 1 or (lengths is not None and chosen.dim() == 2):
        return activate(model, chosen)
    if chosen.shape[0] != len(model.model.layers):
        raise MoaError(f"a per-layer choice needs {len(model.model.layers)} layers of experts, got {chosen.shape[0]}")
    for block, layer_experts in zip(model.model.layers, chosen):
        activate(block, layer_experts)


# --- routing at inference -------------------------------------------------------------------------------


class SequenceRouter(Protocol):
    """Picks each sequence's expert(s) from its prompt, while the engine prefills it."""

    @property
    def per_layer(self) -> bool:
        """Whether each layer gets its own expert ([L, D] choices) instead of one per sequence ([D])."""

    def prefill(self, model: Transformer, ids: Tensor, positions: Tensor, lengths: Sequence[int],
                cache: SlotCache | None = None, slots: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """Prefill prompts packed into one row ([1, T], into `slots` of the cache if given) with the experts
        chosen for them: each prompt's last logits [D, V] and its experts [D] or [L, D]; the experts
        active afterwards are the caller's to set."""

    def __call__(self, model: Transformer, prompts: list[list[int]]) -> Tensor:
        """The experts of prompts that do not run alone first (scoring)."""

    def to(self, device: torch.device) -> SequenceRouter:
        """The same router on `device`."""


def packed(prompts: Sequence[list[int]], device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
    """Prompts packed back to back into one row: ids [1, T], positions [1, T] and their lengths."""
    ids = torch.tensor([[t for p in prompts for t in p]], device=device)
    positions = torch.cat([torch.arange(len(p), device=device) for p in prompts])[None]
    return ids, positions, [len(p) for p in prompts]


def prefill_with(model: Transformer, ids: Tensor, positions: Tensor, sizes: Sequence[int],
                 cache: SlotCache | None, slots: Sequence[int]) -> Tensor:
    """A packed prefill with the experts already active: each document's last logits [D, V]."""
    if cache is not None:
        cache.prefill(slots, sizes)
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[0, torch.tensor(sizes, device=ids.device).cumsum(0) - 1] = True
    return model(ids, positions=positions, attn_mask=None if cache is not None else Documents(tuple(sizes)),
                 cache=cache, logits_at=last)


@dataclass(frozen=True)
class LearnedRouter:
    """MoA at inference: every layer's router reads the prompt and that layer follows its choice; the
    strategy then fixes each sequence's expert(s) for every generated token."""

    routers: LayerRouters
    strategy: Strategy

    @property
    def per_layer(self) -> bool:
        return self.strategy == Strategy.PER_LAYER

    def prefill(self, model: Transformer, ids: Tensor, positions: Tensor, lengths: Sequence[int],
                cache: SlotCache | None = None, slots: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """MoA's routing pass is the prefill itself: each layer follows its own router, read from its input
        over each prompt. Then the strategy fixes the experts; prompts whose layers did not all use the
        expert chosen for them (last or vote, with routers that disagree) are prefilled again with it, so
        logits and cache are exactly those of the chosen route."""
        index = packed_index(lengths, ids.device)
        with pooled_block_inputs(model, index, self.routers.spec.pooling, self.routers) as pooled:
            logits = prefill_with(model, ids, positions, lengths, cache, slots)
        layer_logits = self.routers(pooled)  # [L, D, N]
        chosen = choose_experts(layer_logits, self.strategy)
        redo = (layer_logits.argmax(-1) != chosen).any(0).nonzero()[:, 0].tolist()
        if redo:
            tokens = torch.cat([(index.owner == d).nonzero()[:, 0] for d in redo])
            sizes = [lengths[d] for d in redo]
            activate_experts(model, chosen[..., redo], sizes)
            logits[redo] = prefill_with(model, ids[:, tokens], positions[:, tokens], sizes, cache,
                                        [slots[d] for d in redo] if slots else [])
        return logits, chosen

    def __call__(self, model: Transformer, prompts: list[list[int]]) -> Tensor:
        return self.prefill(model, *packed(prompts, model.lm_head.weight.device))[1]

    def to(self, device: torch.device) -> LearnedRouter:
        return LearnedRouter(self.routers.to(device).eval(), self.strategy)


# --- training-free routing: the nearest task centroid ------------------------------------------------------


@dataclass(frozen=True)
class CentroidRouter:
    """The "task classifier + LoRAs" baseline in its simplest form: a prompt goes to the task whose centroid
    of the base model's mean-pooled input of block `layer` (over that task's training prompts) is nearest
    by cosine. Nothing is trained; the routing pass runs the base model's first `layer` blocks."""

    centroids: Tensor  # [N, H], unit norm
    layer: int

    per_layer = False

    def choose(self, model: Transformer, ids: Tensor, positions: Tensor, lengths: Sequence[int]) -> Tensor:
        """The nearest centroid of each packed prompt [D]."""
        with activated(model, None):  # the base model's states: no expert is known yet
            hidden = model.block_input(ids, positions, Documents(tuple(lengths)), self.layer)
        features = F.normalize(pool(hidden, packed_index(lengths, ids.device), Pooling.MEAN), dim=-1)
        return (features @ self.centroids.T).argmax(-1)

    def prefill(self, model: Transformer, ids: Tensor, positions: Tensor, lengths: Sequence[int],
                cache: SlotCache | None = None, slots: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        chosen = self.choose(model, ids, positions, lengths)
        activate_experts(model, chosen, lengths)
        return prefill_with(model, ids, positions, lengths, cache, slots), chosen

    def __call__(self, model: Transformer, prompts: list[list[int]]) -> Tensor:
        return self.choose(model, *packed(prompts, model.lm_head.weight.device))

    def to(self, device: torch.device) -> CentroidRouter:
        return CentroidRouter(self.centroids.to(device), self.layer)


POOL_TOKENS = 4096  # prompt tokens per row of pooled_features (the centroid router's feature pass)


@torch.no_grad()
def pooled_features(model: Transformer, prompts: Sequence[list[int]], budget: int = POOL_TOKENS) -> Tensor:
    """Every block's input mean-pooled over each prompt, unit norm, with no expert active: [L, D, H]. Prompts
    are packed into rows of about `budget` tokens."""
    device, features = model.lm_head.weight.device, []
    rows, row, tokens = [], [], 0
    for prompt in prompts:
        if row and tokens + len(prompt) > budget:
            rows.append(row)
            row, tokens = [], 0
        row.append(prompt)
        tokens += len(prompt)
    rows.append(row)
    with activated(model, None):
        for row in rows:
            ids, positions, lengths = packed(row, device)
            with pooled_block_inputs(model, packed_index(lengths, device), Pooling.MEAN) as pooled:
                model(ids, positions=positions, attn_mask=Documents(tuple(lengths)), logits_at=slice(0, 0))
            features.append(torch.stack(pooled))
    return F.normalize(torch.cat(features, dim=1), dim=-1)


def fit_centroids(model: Transformer, train: Sequence[Sequence[list[int]]],
                  validation: Sequence[Sequence[list[int]]]) -> tuple[Tensor, Tensor]:
    """Each task's centroid at every layer from its training prompts ([L, N, H], unit norm), and the
    nearest-centroid accuracy of every layer on the validation prompts [L]."""
    centroids = torch.stack([pooled_features(model, prompts).mean(1) for prompts in train], dim=1)  # [L, N, H]
    centroids = F.normalize(centroids, dim=-1)
    features = pooled_features(model, [p for prompts in validation for p in prompts])  # [L, D, H]
    truth = torch.repeat_interleave(torch.arange(len(validation)), torch.tensor([len(v) for v in validation]))
    chosen = torch.einsum("ldh,lnh->ldn", features, centroids).argmax(-1)  # [L, D]
    return centroids, (chosen == truth.to(chosen.device)).float().mean(-1)
