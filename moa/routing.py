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
- `LearnedRouter`: routers + strategy, MoA at inference; `prefill_and_route` decides the experts while
  the prefill reads the prompt, so that routing costs no extra pass.

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
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moa.data.batching import IGNORE, Batch, Example, collate
from moa.errors import MoaError
from moa.io import read_json
from moa.layout import ROUTER_CONFIG, ROUTER_WEIGHTS
from moa.lora import activate, activated
from moa.model.llama import KVCache, Transformer


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
    state = {k: v.detach().cpu().contiguous() for k, v in routers.state_dict().items()}
    save_file(state, str(directory / ROUTER_WEIGHTS), metadata={"format": "pt"})
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
    """Where each document's prompt lies in a batch flattened to [B*T]."""

    last: Tensor  # [D]: flat position of each document's last prompt token
    doc: Tensor  # [B*T]: the document number of each prompt token, -1 elsewhere
    n_docs: int


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
    return PromptIndex(last, torch.where(in_prompt, doc, -1), n_docs)


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

    With `routers`, each block's LoRA layers first follow that block's own router (argmax per row):
    the routing pass of inference, where no label is known. It needs one document per row."""
    pooled: list[Tensor | None] = [None] * len(model.model.layers)

    def hook(layer: int, block: nn.Module, args: tuple[Any, ...]) -> None:
        pooled[layer] = pool(args[0], index, pooling)
        if routers is not None:
            activate(block, routers.score(layer, pooled[layer]).argmax(-1))

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
    if follow and bool((batch.docs_per_row > 1).any()):
        raise MoaError("routing by the routers' own decisions needs one document per row; do not pack prompts")
    restore = activated(model, None) if follow else nullcontext()  # undoes what the hooks activate
    with restore, pooled_block_inputs(model, prompt_index(batch), pooling, routers) as pooled:
        model(batch.input_ids, positions=batch.positions, attn_mask=batch.attn_mask(), logits_at=slice(0, 0))
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


def activate_experts(model: Transformer, chosen: Tensor) -> None:
    """Activate experts [B] on every layer, or [L, B] layer by layer."""
    if chosen.dim() == 1:
        return activate(model, chosen)
    if chosen.shape[0] != len(model.model.layers):
        raise MoaError(f"a per-layer choice needs {len(model.model.layers)} layers of experts, got {chosen.shape[0]}")
    for block, layer_experts in zip(model.model.layers, chosen):
        activate(block, layer_experts)


# --- MoA at inference ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnedRouter:
    """MoA at inference: every layer's router reads the prompt and that layer follows its choice; the
    strategy then fixes each sequence's expert(s) for every generated token."""

    routers: LayerRouters
    strategy: Strategy

    def __call__(self, model: Transformer, prompts: list[list[int]]) -> Tensor:
        """A routing pass of its own, for when the prompt does not run alone first (scoring): experts
        [B], or [L, B] per layer."""
        examples = [Example(p, []) for p in prompts]
        batch = collate([[i] for i in range(len(examples))], examples)
        return choose_experts(router_logits(model, self.routers, batch), self.strategy)


def prefill_and_route(model: Transformer, router: LearnedRouter, ids: Tensor, valid: Tensor, positions: Tensor,
                      mask: Tensor | None, cache: KVCache | None) -> tuple[Tensor, Tensor]:
    """The prefill of left-padded prompts as MoA's routing pass: each layer follows its own router, read
    from its input over the prompt. Then the strategy fixes the experts; rows whose layers did not all
    use the expert chosen for them (last or vote, with routers that disagree) are prefilled again with
    it, so logits and cache are exactly those of the chosen route. Returns last logits and the experts."""
    B, P = ids.shape
    rows = torch.arange(B, device=ids.device)
    index = PromptIndex(rows * P + P - 1, torch.where(valid, rows[:, None], -1).flatten(), B)
    with pooled_block_inputs(model, index, router.routers.spec.pooling, router.routers) as pooled:
        logits = model(ids, positions=positions, attn_mask=mask, cache=cache, logits_at=slice(-1, None))
    layer_logits = router.routers(pooled)  # [L, B, N]
    chosen = choose_experts(layer_logits, router.strategy)
    redo = (layer_logits.argmax(-1) != chosen).any(0).nonzero()[:, 0]
    if len(redo):
        activate_experts(model, chosen[redo])
        again = None if cache is None else KVCache(model.config, len(redo), P, cache.k.device, cache.k.dtype)
        logits[redo] = model(ids[redo], positions=positions[redo], attn_mask=None if mask is None else mask[redo],
                             cache=again, logits_at=slice(-1, None))
        if again is not None:
            cache.k[:, redo, :, :P], cache.v[:, redo, :, :P] = again.k, again.v
    activate_experts(model, chosen)
    return logits, chosen
