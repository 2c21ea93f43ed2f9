"""`moa train-router`: MoA stage 2 (Feng et al., 2024). A task classifier before every transformer block
reads a summary of the block's input over the prompt; the N task LoRAs are the experts.

Training uses teacher forcing (every LoRA layer applies the row's true expert), so each router sees the
hidden states it will see at inference, and L = L_LM + eta * sum over layers of CE(router_l, task).
The pieces an inference engine reuses: `Routers`, `pooled_block_inputs`, `route_scores`, `decide`,
`load_routers` and `attach_experts`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moa.config import Config, experiment_dir
from moa.data.batching import IGNORE, Batch, Example, bucket, lm_loss
from moa.errors import MoaError
from moa.io import atomic_dir, read_json
from moa.lora import attach_adapter, save_adapter, set_route, use_route
from moa.lora.peft_io import CONFIG_FILE, WEIGHTS_FILE
from moa.model import Tokenizer, Transformer
from moa.tracking import log_step
from moa.train.lora import balanced, base_model, device, task_examples, train_lora_factors_in_fp32
from moa.train.trainer import Trainer, TrainSettings

ROUTERS_FILE = "routers.safetensors"
ROUTER_CONFIG_FILE = "router_config.json"
STRATEGIES = ("last", "vote")  # one expert per sequence; `per_layer` is scores.argmax(-1) itself
ROUTINGS = ("teacher_forced", "routed")  # of the layers before a router; see evaluate_routers
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


# --- the routers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to rebuild the routers (stored in router_config.json)."""

    type: str  # linear (H -> N) or mlp (H -> hidden -> N)
    pooling: str  # last (the last prompt token) or mean (over the prompt tokens)
    n_layers: int
    hidden_size: int
    tasks: tuple[str, ...]  # the experts, in order
    hidden: int | None = None  # the mlp's width
    activation: str | None = None  # the mlp's nonlinearity

    @property
    def n_experts(self) -> int:
        return len(self.tasks)


class Routers(nn.Module):
    """One task classifier per transformer block, saved as `routers.{layer}.weight`/`.bias` (linear)
    or `routers.{layer}.{0,2}.weight`/`.bias` (mlp)."""

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.routers = nn.ModuleList(self._router(spec) for _ in range(spec.n_layers))

    @staticmethod
    def _router(spec: RouterSpec) -> nn.Module:
        if spec.type == "linear":
            return nn.Linear(spec.hidden_size, spec.n_experts)
        if spec.type == "mlp" and spec.hidden and spec.activation in ACTIVATIONS:
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


def save_routers(directory: Path, routers: Routers, **provenance: Any) -> None:
    """routers.safetensors + router_config.json (the spec, the parameter count and `provenance`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in routers.state_dict().items()}
    save_file(state, str(directory / ROUTERS_FILE), metadata={"format": "pt"})
    config = {**asdict(routers.spec), "n_experts": routers.spec.n_experts, "parameters": routers.n_parameters}
    (directory / ROUTER_CONFIG_FILE).write_text(json.dumps({**config, **provenance}, indent=2) + "\n")


def load_routers(directory: str | Path) -> Routers:
    """The routers that train-router wrote into `directory` (e.g. results/{experiment}/moa/)."""
    directory = Path(directory)
    config_file, weights_file = directory / ROUTER_CONFIG_FILE, directory / ROUTERS_FILE
    hint = "run `moa train-router --config ...` first"
    raw = read_json(config_file, hint)
    if not weights_file.is_file():
        raise MoaError(f"{weights_file}: not found; {hint}")
    try:
        spec = RouterSpec(**{f.name: raw[f.name] for f in fields(RouterSpec)})
        routers = Routers(replace(spec, tasks=tuple(spec.tasks)))
        routers.load_state_dict(load_file(weights_file))
    except (KeyError, TypeError) as err:
        raise MoaError(f"{config_file}: not a router config ({err!r}); rerun train-router") from None
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise MoaError(f"{weights_file}: does not match {ROUTER_CONFIG_FILE} ({first}); rerun train-router") from None
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


def pool(hidden: Tensor, index: PromptIndex, pooling: str) -> Tensor:
    """Block inputs [B, T, H] -> one fp32 summary per document [D, H]."""
    flat = hidden.flatten(0, 1)
    if pooling == "last":
        return flat[index.last].float()
    if pooling == "mean":
        at = index.doc >= 0
        sums = flat.new_zeros(index.n_docs, flat.shape[1], dtype=torch.float32)
        sums.index_add_(0, index.doc[at], flat[at].float())
        return sums / torch.bincount(index.doc[at], minlength=index.n_docs)[:, None]
    raise MoaError(f"unknown router pooling {pooling!r}: use last or mean")


@contextmanager
def pooled_block_inputs(model: Transformer, index: PromptIndex, pooling: str,
                        routers: Routers | None = None) -> Iterator[list[Tensor | None]]:
    """While the model runs once, collect every block's input pooled per document (L x [D, H]).

    With `routers`, each block's LoRA layers first follow that block's own router (argmax per row):
    the routing pass of inference, where no label is known. It needs one document per row."""
    pooled: list[Tensor | None] = [None] * len(model.model.layers)

    def hook(layer: int, block: nn.Module, args: tuple[Any, ...]) -> None:
        pooled[layer] = pool(args[0], index, pooling)
        if routers is not None:
            set_route(block, routers.score(layer, pooled[layer]).argmax(-1))

    handles = [block.register_forward_pre_hook(partial(hook, layer)) for layer, block in enumerate(model.model.layers)]
    try:
        yield pooled
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def route_scores(model: Transformer, routers: Routers, batch: Batch, follow: bool = True) -> Tensor:
    """Router logits [L, D, N] of every layer for every document of `batch`, read from the prompts only
    (targets in the batch are never seen: the causal mask keeps them out of the prompts' states).

    follow=True: each layer's experts follow its own router (what inference can do without labels);
    follow=False: the model's current route, e.g. the true tasks under `use_route(model, batch.tasks)`."""
    batch = batch.to(next(model.parameters()).device)
    if follow and bool((batch.docs_per_row > 1).any()):
        raise MoaError("routing by the routers' own decisions needs one document per row; do not pack prompts")
    index = prompt_index(batch)
    restore = use_route(model, None) if follow else nullcontext()  # undoes the routes the hooks set
    with restore, pooled_block_inputs(model, index, routers.spec.pooling, routers if follow else None) as pooled:
        model(batch.input_ids, positions=batch.positions, attn_mask=batch.attn_mask(), logits_at=slice(0, 0))
    return routers(pooled)


def decide(scores: Tensor, strategy: str) -> Tensor:
    """One expert per document [D] from router logits [L, D, N]: `last` (the last router decides; the
    paper found it most stable) or `vote` (majority over layers, ties to the higher mean probability)."""
    if strategy == "last":
        return scores[-1].argmax(-1)
    if strategy == "vote":
        votes = F.one_hot(scores.argmax(-1), scores.shape[-1]).sum(0)  # [D, N]
        return (votes + 0.5 * scores.softmax(-1).mean(0)).argmax(-1)  # the bonus is < 1 vote
    raise MoaError(f"unknown routing strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


# --- training -----------------------------------------------------------------------------------------


class RouterTraining(nn.Module):
    """What the Trainer optimizes: the routers, and in joint mode the experts of `lm` too."""

    def __init__(self, lm: Transformer, routers: Routers) -> None:
        super().__init__()
        self.lm, self.routers = lm, routers


def document_tasks(batch: Batch) -> Tensor:
    """The task of each document [D] (row-major), from the rows' tasks."""
    if bool((batch.tasks < 0).any()):
        raise MoaError("router training needs single-task rows (teacher forcing routes whole rows)")
    return torch.repeat_interleave(batch.tasks, batch.docs_per_row)


def router_loss(model: RouterTraining, batch: Batch, eta: float) -> Tensor:
    """L_LM + eta * L_cls, summed over the loss tokens as the Trainer expects.

    L_cls (summed over layers, averaged over documents) is scaled by the batch's loss tokens, so after
    the Trainer's division by them the step minimizes mean LM loss per token + eta * mean L_cls."""
    index, targets = prompt_index(batch), document_tasks(batch)
    set_route(model.lm, batch.tasks)  # teacher forcing
    with pooled_block_inputs(model.lm, index, model.routers.spec.pooling) as pooled:
        lm = lm_loss(model.lm, batch, reduction="sum")
    logits = model.routers(pooled)  # [L, D, N]
    cls = F.cross_entropy(logits.flatten(0, 1).float(), targets.repeat(len(pooled)), reduction="sum")
    return lm + eta * cls * (batch.loss_tokens / index.n_docs)


def router_settings(config: Config) -> TrainSettings:
    """The `training` section with the `router` overrides."""
    router = config["router"]
    settings = TrainSettings.from_config(config["training"])
    return replace(settings, steps=router["steps"] or settings.steps, lr=router["lr"] or settings.lr)


def adapter_dirs(config: Config) -> list[Path]:
    """The task LoRAs (experts 0..N-1 in config task order); each must exist."""
    dirs = [experiment_dir(config) / "adapters" / task for task in config["tasks"]]
    for path in dirs:
        if not (path / WEIGHTS_FILE).is_file():
            raise MoaError(f"{path}: no trained adapter for task {path.name!r}; "
                           f"run `moa train-lora --config ... --task {path.name}` first")
    return dirs


def attach_experts(model: Transformer, dirs: Sequence[Path]) -> None:
    """Load PEFT adapters as experts 0..N-1, in order, all frozen."""
    for path in dirs:
        attach_adapter(model, path, model.config.fingerprint())
    for param in model.parameters():
        param.requires_grad_(False)


def expert_model(config: Config, joint: bool) -> tuple[Transformer, Tokenizer]:
    """The base model with the N task LoRAs; in joint mode their factors train, in fp32 (as in train-lora)."""
    dirs = adapter_dirs(config)  # before the (slow) model load
    model, tokenizer = base_model(config)
    attach_experts(model, dirs)
    if joint:
        train_lora_factors_in_fp32(model)
    return model.to(device()), tokenizer


def router_spec(config: Config, model: Transformer) -> RouterSpec:
    router, mlp = config["router"], config["router"]["type"] == "mlp"
    return RouterSpec(router["type"], router["pooling"], model.config.num_hidden_layers, model.config.hidden_size,
                      tuple(config["tasks"]), router["hidden"] if mlp else None, router["activation"] if mlp else None)


# --- evaluation -------------------------------------------------------------------------------------


def evaluate_routers(model: Transformer, routers: Routers, examples: Sequence[Example],
                     settings: TrainSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Route the held-out prompts alone (no targets) two ways (column `routing`); returns (router_eval,
    confusion). teacher_forced: every LoRA layer applies the true expert, i.e. the states the routers
    trained on (accuracy given right upstream routing, as the paper reports it); routed: each layer
    follows its own router, which is all that inference can do without labels."""
    model.eval()
    routers.eval()
    prompts = [Example(e.prompt_ids, [], e.task) for e in examples]
    batches = bucket(prompts, settings.seq_len * settings.batch_size)
    truth = torch.cat([batch.tasks for batch in batches])  # one prompt per row
    reports = [router_report(pass_scores(model, routers, batches, settings, follow), truth, routers.spec.tasks,
                             routing) for routing, follow in zip(ROUTINGS, (False, True))]
    parameters = pd.DataFrame([{"metric": "parameters", "value": float(routers.n_parameters),
                                "n": routers.spec.n_layers}])
    evaluation = pd.concat([*(r[0] for r in reports), parameters], ignore_index=True)
    return evaluation, pd.concat([r[1] for r in reports], ignore_index=True)


def pass_scores(model: Transformer, routers: Routers, batches: Sequence[Batch], settings: TrainSettings,
                follow: bool) -> Tensor:
    """Router logits [L, D, N] over `batches` (teacher forced unless `follow`), in the trainer's precision."""
    dev = next(model.parameters()).device
    scores = []
    for batch in batches:
        with nullcontext() if follow else use_route(model, batch.tasks), settings.autocast(dev):
            scores.append(route_scores(model, routers, batch, follow).float().cpu())
    return torch.cat(scores, dim=1)


def router_report(scores: Tensor, truth: Tensor, tasks: Sequence[str],
                  routing: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy (overall and per true task) of every layer's router (strategy `layer`) and of each
    whole-sequence strategy; the strategies' confusion matrices (true x predicted counts)."""
    decisions = [("layer", layer, scores[layer].argmax(-1)) for layer in range(len(scores))]
    decisions += [(strategy, None, decide(scores, strategy)) for strategy in STRATEGIES]
    groups = [("all", torch.ones_like(truth, dtype=torch.bool))] + [(t, truth == i) for i, t in enumerate(tasks)]
    rows = [{"routing": routing, "metric": "accuracy", "strategy": strategy, "layer": layer, "task": name,
             "value": (predicted == truth)[mask].float().mean().item(), "n": int(mask.sum())}
            for strategy, layer, predicted in decisions for name, mask in groups]
    confusion = [{"routing": routing, "strategy": strategy, "true_task": tasks[t], "predicted_task": tasks[p],
                  "count": int(((truth == t) & (predicted == p)).sum())}
                 for strategy, _, predicted in decisions[-len(STRATEGIES):]
                 for t in range(len(tasks)) for p in range(len(tasks))]
    return pd.DataFrame(rows).astype({"layer": "Int64"}), pd.DataFrame(confusion)


# --- the step -----------------------------------------------------------------------------------------


def train_router(config: Config) -> Path:
    """Train the routers (and the experts in joint mode); write results/{experiment}/moa/ atomically."""
    router = config["router"]
    joint = router["mode"] == "joint"
    model, tokenizer = expert_model(config, joint)
    torch.manual_seed(config["seed"])
    routers = Routers(router_spec(config, model)).to(device())
    tasks = list(config["tasks"])
    train = balanced([task_examples(config, t, "train", tokenizer, i) for i, t in enumerate(tasks)], config["seed"])
    validation = [e for i, t in enumerate(tasks) for e in task_examples(config, t, "validation", tokenizer, i)]
    settings = router_settings(config)
    root = experiment_dir(config)
    # Teacher forcing routes whole rows, so every packed row holds one task.
    trainer = Trainer(RouterTraining(model, routers), train, validation, settings, config["seed"],
                      root / "checkpoints" / "_router", loss_fn=partial(router_loss, eta=router["eta"]),
                      desc=f"train router ({router['mode']})", by_task=True)
    log = trainer.run()
    evaluation, confusion = evaluate_routers(model, routers, validation, settings)
    out = root / "moa"
    with atomic_dir(out) as tmp:
        save_routers(tmp, routers, mode=router["mode"], eta=router["eta"])
        save_experts(tmp / "experts", model, config, joint)
        log.to_parquet(tmp / "train_log.parquet", index=False)
        evaluation.to_parquet(tmp / "router_eval.parquet", index=False)
        confusion.to_parquet(tmp / "confusion.parquet", index=False)
    trainer.discard_checkpoints()
    log_step(config, "train_router", {"moa.step": "train_router"},
             {k: config[k] for k in ("model", "router", "training", "seed")}, curves=log,
             artifacts=[out / "router_eval.parquet", out / "confusion.parquet", out / "router_config.json"])
    return out


def save_experts(directory: Path, model: Transformer, config: Config, joint: bool) -> None:
    """experts/{task}/ in PEFT format: the fine-tuned experts (joint), else copies of the inputs, which
    stay bitwise identical even where the model holds them in a lower precision."""
    for expert, source in enumerate(adapter_dirs(config)):
        target = directory / source.name
        if joint:
            save_adapter(target, model, expert, base_model_name_or_path=config["model"]["source"],
                         arch_fingerprint=model.config.fingerprint())
        else:
            target.mkdir(parents=True)
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(source / name, target / name)
