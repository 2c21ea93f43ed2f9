"""`moa train-router`: MoA stage 2 (Feng et al., 2024) on the task LoRAs (the routers: moa.routing).

Training uses teacher forcing (every LoRA layer applies the true task's expert), so each router sees the
hidden states it will see at inference, and L = L_LM + eta * sum over layers of CE(router_l, task).

- joint mode (the paper): routers and experts train together on L with the Trainer (resumable);
- routers mode: the experts are frozen and routers never change the teacher-forced forward pass, so
  L_LM is a constant and L_cls depends only on the prompts' pooled block inputs. These are computed
  once, and the routers are fitted on them: full-batch AdamW, every task weighted equally. (Optimizing L
  with the Trainer instead wastes a forward pass per step and, with packed rows of one task each, sees
  a task in proportion to its tokens: short-prompt tasks in a few steps, or none.)
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moa.config import Config
from moa.data.batching import Batch, Example, bucket, lm_loss, pack
from moa.errors import MoaError
from moa.io import atomic_dir
from moa.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAIN_LOG, ExperimentPaths, trained_task_adapters
from moa.lora import activate, activated, attach_experts, save_adapter
from moa.model import Tokenizer, Transformer
from moa.model.prepared import base_model, device
from moa.plan import with_checkpointing
from moa.routing import (
    SEQUENCE_STRATEGIES,
    LayerRouters,
    Pooling,
    RouterSpec,
    RouterType,
    Upstream,
    choose_experts,
    pooled_block_inputs,
    pooled_prompts,
    prompt_index,
    router_logits,
    save_routers,
)
from moa.step_result import StepResult
from moa.train.lora import all_task_examples, task_examples, train_lora_factors_in_fp32
from moa.train.trainer import Trainer, TrainSettings, clip_and_step, optimizer_for


class RouterTraining(nn.Module):
    """What the Trainer optimizes: the routers, and in joint mode the experts of `lm` too."""

    def __init__(self, lm: Transformer, routers: LayerRouters) -> None:
        super().__init__()
        self.lm, self.routers = lm, routers


def document_tasks(batch: Batch) -> Tensor:
    """The task of each document [D] (row-major), from the rows' tasks."""
    if bool((batch.tasks < 0).any()):
        raise MoaError("router training needs single-task rows (teacher forcing routes whole rows)")
    return torch.repeat_interleave(batch.tasks, batch.docs_per_row)


def routing_loss(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """L_cls: the sum over layers of each router's cross-entropy [L, D, N] vs the tasks [D], averaged over
    documents (weighted by `weight` per task, as F.cross_entropy weighs classes)."""
    n_layers = logits.shape[0]
    return n_layers * F.cross_entropy(logits.flatten(0, 1).float(), targets.repeat(n_layers), weight=weight)


def router_loss(model: RouterTraining, batch: Batch, eta: float) -> Tensor:
    """Joint mode's L_LM + eta * L_cls, summed over the loss tokens as the Trainer expects.

    L_cls is scaled by the batch's loss tokens, so after the Trainer's division by them the step minimizes
    mean LM loss per token + eta * L_cls."""
    index, targets = prompt_index(batch), document_tasks(batch)
    activate(model.lm, batch.tasks)  # teacher forcing
    with pooled_block_inputs(model.lm, index, model.routers.spec.pooling) as pooled:
        lm = lm_loss(model.lm, batch, reduction="sum")
    return lm + eta * routing_loss(model.routers(pooled), targets) * batch.loss_tokens


def task_prompts(config: Config, tokenizer: Tokenizer, split: str, per_task: int | None = None) -> list[Example]:
    """Every task's prompts of `split` (no targets), labelled with the task's index: the first `per_task`
    of each (splits are seeded shuffles), or all."""
    return [Example(e.prompt_ids, [], e.task) for i, task in enumerate(config["tasks"])
            for e in task_examples(config, task, split, tokenizer, i)[:per_task]]


def prompt_features(model: Transformer, prompts: Sequence[Example], pooling: Pooling,
                    settings: TrainSettings) -> tuple[list[Tensor], Tensor]:
    """The teacher-forced pooled block inputs of `prompts` (L x [D, H]) and their tasks [D], in the trainer's
    precision, dropout off (as at inference). Prompts are packed by task: pooling reads each alone."""
    model.eval()
    dev = next(model.parameters()).device
    features, tasks = [], []
    for batch in tqdm(pack(prompts, settings.seq_len, settings.micro_rows, by_task=True), desc="router features",
                      unit="batch", dynamic_ncols=True):
        with activated(model, batch.tasks), settings.autocast(dev):
            features.append(pooled_prompts(model, batch, pooling))
        tasks.append(document_tasks(batch))
    return [torch.cat(layer) for layer in zip(*features)], torch.cat(tasks).to(dev)


# Routers mode fits a prior, not a blank slate (fit_routers). Measured on SmolLM2's features of the six synthetic
# tasks (bench/bench_router_passages.py), qa fitted on passages about people, towns or companies and tested on
# passages about another of the four kinds: the last router routed 86.3% of those qa prompts right fitted plainly,
# 99.3% anchored and augmented (the centroid rule: 97.7%).
CENTROID_MARGIN = 50.0  # nats by which the anchor puts a task's own centroid ahead of a typical other task's
PRIOR = 0.003  # the prior's precision per squared nat of logit change: a router may move ~18 nats off the anchor


def task_means(x: Tensor, tasks: Tensor, n: int) -> Tensor:
    """Each task's mean of the features x [D, H] (zero for a task without prompts): [n, H]."""
    counts = torch.bincount(tasks, minlength=n).clamp(min=1)[:, None]
    return x.new_zeros(n, x.shape[1]).index_add_(0, tasks, x) / counts


@torch.no_grad()
def anchor_at_centroids(routers: LayerRouters, normed: Sequence[Tensor], tasks: Tensor) -> list[Tensor] | None:
    """Set every linear router to the nearest-centroid rule of its RMS-normed features (the training-free centroid
    router's rule, on the features as the router reads them) and return these parameters: the anchor. mlp routers
    keep their initialization and have no anchor (None).

    With x RMS-normed (|x| = sqrt(H)) and unit task centroids c_k, weights s * c_k / sqrt(H) and zero biases give
    logits s * cos(x, c_k). s = CENTROID_MARGIN / the mean of 1 - cos(c_j, c_k) over task pairs, whatever the
    layer's anisotropy (SmolLM2's common residual direction leaves its task centroids 0.93-0.98 apart in cosine):
    a sharp rule, under which the prompts it routes right by a fair margin cost ~nothing."""
    if routers.spec.type != RouterType.LINEAR:
        return None
    n, hidden = routers.spec.n_experts, routers.spec.hidden_size
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=tasks.device)
    for router, x in zip(routers.routers, normed):
        centroids = F.normalize(task_means(x, tasks, n), dim=-1)
        separation = (1 - centroids @ centroids.T)[off_diagonal].mean().clamp(min=1e-6) if n > 1 else 1.0
        router.weight.copy_(CENTROID_MARGIN / separation * centroids / math.sqrt(hidden))
        router.bias.zero_()
    return [p.detach().clone() for p in routers.parameters()]


def anchor_penalty(routers: LayerRouters, anchor: Sequence[Tensor], n_prompts: int) -> Tensor:
    """The Gaussian prior at `anchor`, as a negative log-density per prompt (L_cls is a mean over prompts):
    PRIOR / 2 * the squared distance of every router from it in nats of logit change (a weight row moved by d
    changes its logit by up to |d| * sqrt(H) on the RMS-normed features; a bias by its own change)."""
    hidden = routers.spec.hidden_size
    return PRIOR / 2 / n_prompts * sum((hidden if p.dim() == 2 else 1) * (p - a).square().sum()
                                       for p, a in zip(routers.parameters(), anchor))


def other_task_donors(tasks: Tensor) -> Tensor:
    """For every prompt, a uniformly drawn prompt of another task [D] (global RNG); itself where there is none."""
    order = torch.sort(tasks, stable=True).indices
    counts = torch.bincount(tasks)
    own, start = counts[tasks], (counts.cumsum(0) - counts)[tasks]  # the prompt's task: its size, its first slot
    others = len(tasks) - own
    draw = (torch.rand(len(tasks), device=tasks.device) * others.clamp(min=1)).long()
    slot = torch.where(draw < start, draw, draw + own).clamp(max=len(tasks) - 1)  # skip the own task's slots
    donors = order[slot]
    return torch.where(others > 0, donors, torch.arange(len(tasks), device=tasks.device))


def passage_deviations(normed: Sequence[Tensor], tasks: Tensor, n: int) -> list[Tensor]:
    """Each prompt's deviation from its task's mean, per layer (L x [D, H]): what its passage adds."""
    return [x - task_means(x, tasks, n)[tasks] for x in normed]


def with_other_passages(normed: Sequence[Tensor], deviations: Sequence[Tensor],
                        tasks: Tensor) -> tuple[list[Tensor], Tensor]:
    """The RMS-normed features, then each prompt again with another task's prompt's deviation from that task's mean
    added (other_task_donors, drawn anew each call): the same task with another passage. Returns (L x [2D, H],
    tasks [2D])."""
    donors = other_task_donors(tasks)
    return [torch.cat([x, x + deviation[donors]]) for x, deviation in zip(normed, deviations)], tasks.repeat(2)


def fit_routers(routers: LayerRouters, features: list[Tensor], tasks: Tensor, settings: TrainSettings,
                eta: float) -> pd.DataFrame:
    """Routers mode: minimize eta * (L_cls + the prior) over the prompts' features (L_LM is a constant here), one
    full batch per step with the trainer's optimizer, schedule and clipping; every task weighs the same whatever
    its number of prompts. Returns the log (loss per step).

    Fitted from a random start to L_cls ~ 0, the routers separate the training prompts by whatever directions do,
    passage content included (fewer prompts than dimensions: 64 per task in H = 576 are always separable), and
    prompts of the same template with other passages cross their boundaries: 4 of 48 SQuAD test prompts (from
    other articles) routed elsewhere, where the training-free centroid rule routed all 48 right. Hence:
    - linear routers start at, and are held near, the nearest-centroid rule of their features: a MAP fit under a
      Gaussian prior there (anchor_at_centroids, anchor_penalty). The sharp rule costs ~nothing on the prompts it
      routes right, so the fit only moves the boundaries that training prompts contradict, and only so far;
    - every step also fits each prompt carrying another task's prompt's deviation from that task's mean
      (with_other_passages, redrawn each step): what varies between the prompts of a task (their passages) is
      taken not to tell tasks apart, so no boundary may rest on it."""
    steps = settings.steps or max(1, math.ceil(settings.epochs))  # a step is one pass over the features
    n = routers.spec.n_experts
    normed = [F.rms_norm(x.float(), (x.shape[-1],)) for x in features]  # as the routers read them
    anchor, deviations = anchor_at_centroids(routers, normed, tasks), passage_deviations(normed, tasks, n)
    params = list(routers.parameters())
    optimizer, scheduler = optimizer_for(params, settings, steps)
    weight = torch.bincount(tasks, minlength=n).clamp(min=1).float().reciprocal()
    routers.train()
    log = []
    for step in range(1, steps + 1):
        augmented, targets = with_other_passages(normed, deviations, tasks)
        loss = routing_loss(routers(augmented), targets, weight)
        loss = eta * (loss if anchor is None else loss + anchor_penalty(routers, anchor, len(tasks)))
        if not torch.isfinite(loss):
            raise MoaError(f"train router: the routing loss is {loss.item()} at step {step}; lower router.lr")
        loss.backward()
        lr = scheduler.get_last_lr()[0]
        log.append({"step": step, "epoch": step - 1, "loss": loss.item(), "lr": lr,
                    "grad_norm": clip_and_step(params, optimizer, settings)})
        scheduler.step()
    routers.eval()
    return pd.DataFrame(log)


def router_settings(config: Config) -> TrainSettings:
    """The `training` section with the `router` overrides."""
    router = config["router"]
    settings = TrainSettings.from_config(config["training"])
    return replace(settings, steps=router["steps"] or settings.steps, lr=router["lr"] or settings.lr)


def expert_model(config: Config, joint: bool) -> tuple[Transformer, Tokenizer]:
    """The base model with the N task LoRAs; in joint mode their factors train, in fp32 (as in train-lora)."""
    dirs = trained_task_adapters(config)  # before the (slow) model load
    model, tokenizer = base_model(config)
    attach_experts(model, dirs)
    if joint:
        train_lora_factors_in_fp32(model)
    return model.to(device()), tokenizer


def router_spec(config: Config, model: Transformer) -> RouterSpec:
    router = config["router"]
    kind = RouterType(router["type"])
    mlp = kind == RouterType.MLP
    return RouterSpec(kind, Pooling(router["pooling"]), model.config.num_hidden_layers, model.config.hidden_size,
                      tuple(config["tasks"]), router["hidden"] if mlp else None, router["activation"] if mlp else None)


# --- evaluation -------------------------------------------------------------------------------------


def evaluate_routers(model: Transformer, routers: LayerRouters, prompts: Sequence[Example],
                     settings: TrainSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Route the held-out prompts (no targets, see task_prompts) with both kinds of upstream experts
    (column `routing`, see Upstream); returns (router_eval, confusion)."""
    model.eval()
    routers.eval()
    batches = bucket(prompts, settings.seq_len * settings.batch_size)
    truth = torch.cat([batch.tasks for batch in batches])  # one prompt per row
    reports = [router_report(logits_over(model, routers, batches, settings, upstream), truth, routers.spec.tasks,
                             upstream) for upstream in Upstream]
    parameters = pd.DataFrame([{"metric": "parameters", "value": float(routers.n_parameters),
                                "n": routers.spec.n_layers}])
    evaluation = pd.concat([*(r[0] for r in reports), parameters], ignore_index=True)
    return evaluation, pd.concat([r[1] for r in reports], ignore_index=True)


def logits_over(model: Transformer, routers: LayerRouters, batches: Sequence[Batch], settings: TrainSettings,
                upstream: Upstream) -> Tensor:
    """Router logits [L, D, N] over `batches`, in the trainer's precision."""
    dev = next(model.parameters()).device
    follow = upstream == Upstream.ROUTED
    logits = []
    for batch in batches:
        with nullcontext() if follow else activated(model, batch.tasks), settings.autocast(dev):
            logits.append(router_logits(model, routers, batch, follow).float().cpu())
    return torch.cat(logits, dim=1)


def router_report(logits: Tensor, truth: Tensor, tasks: Sequence[str],
                  upstream: Upstream) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy (overall and per true task) of every layer's router (strategy `layer`) and of each
    whole-sequence strategy; the strategies' confusion matrices (true x predicted counts)."""
    decisions = [("layer", layer, logits[layer].argmax(-1)) for layer in range(len(logits))]
    decisions += [(str(strategy), None, choose_experts(logits, strategy)) for strategy in SEQUENCE_STRATEGIES]
    groups = [("all", torch.ones_like(truth, dtype=torch.bool))] + [(t, truth == i) for i, t in enumerate(tasks)]
    rows = [{"routing": str(upstream), "metric": "accuracy", "strategy": strategy, "layer": layer, "task": name,
             "value": (predicted == truth)[mask].float().mean().item(), "n": int(mask.sum())}
            for strategy, layer, predicted in decisions for name, mask in groups]
    confusion = [{"routing": str(upstream), "strategy": strategy, "true_task": tasks[t], "predicted_task": tasks[p],
                  "count": int(((truth == t) & (predicted == p)).sum())}
                 for strategy, _, predicted in decisions[-len(SEQUENCE_STRATEGIES):]
                 for t in range(len(tasks)) for p in range(len(tasks))]
    return pd.DataFrame(rows).astype({"layer": "Int64"}), pd.DataFrame(confusion)


# --- the step -----------------------------------------------------------------------------------------


def train_router(config: Config) -> StepResult:
    """Train the routers (and the experts in joint mode); write results/{experiment}/moa/ atomically."""
    start = time.perf_counter()
    router = config["router"]
    joint = router["mode"] == "joint"
    model, tokenizer = expert_model(config, joint)
    torch.manual_seed(config["seed"])
    routers = LayerRouters(router_spec(config, model)).to(device())
    settings = router_settings(config)
    paths = ExperimentPaths.of(config)
    trainer = joint_trainer(config, model, routers, tokenizer, settings) if joint else None
    if trainer:
        log = trainer.run()
    else:
        prompts = task_prompts(config, tokenizer, "train", router["prompts_per_task"])
        log = fit_routers(routers, *prompt_features(model, prompts, routers.spec.pooling, settings), settings,
                          router["eta"])
    evaluation, confusion = evaluate_routers(model, routers, task_prompts(config, tokenizer, "validation"), settings)
    with atomic_dir(paths.moa) as tmp:
        save_routers(tmp, routers, mode=router["mode"], eta=router["eta"],
                     seconds=round(time.perf_counter() - start, 2))
        save_experts(config, tmp, model, joint)
        log.to_parquet(tmp / TRAIN_LOG, index=False)
        evaluation.to_parquet(tmp / paths.router_eval.name, index=False)
        confusion.to_parquet(tmp / paths.router_confusion.name, index=False)
    if trainer:
        trainer.discard_checkpoints()
    return StepResult(paths.moa, curves=log, artifacts=[paths.router_eval, paths.router_confusion, paths.routers[1]])


def joint_trainer(config: Config, model: Transformer, routers: LayerRouters, tokenizer: Tokenizer,
                  settings: TrainSettings) -> Trainer:
    """Joint mode: the Trainer on L over packed rows of one task each (teacher forcing routes whole rows),
    checkpointed under checkpoints/_router/."""
    settings = with_checkpointing(settings, config, model.config, "train_router")
    return Trainer(RouterTraining(model, routers), *all_task_examples(config, tokenizer), settings, config["seed"],
                   ExperimentPaths.of(config).checkpoint("_router"),
                   loss_fn=partial(router_loss, eta=config["router"]["eta"]), desc="train router (joint)", by_task=True)


def save_experts(config: Config, bundle: Path, model: Transformer, joint: bool) -> None:
    """The experts MoA serves, in PEFT format under the bundle's experts/: the fine-tuned experts (joint),
    else copies of the inputs, which stay bitwise identical even where the model holds them in a lower
    precision."""
    paths = ExperimentPaths.of(config)
    for expert, (task, source) in enumerate(zip(config["tasks"], paths.task_adapters(config["tasks"]))):
        target = bundle / paths.expert(task).relative_to(paths.moa)  # the bundle: moa/'s scratch copy
        if joint:
            save_adapter(target, model, expert, base_model_name_or_path=config["model"]["source"],
                         arch_fingerprint=model.config.fingerprint())
        else:
            target.mkdir(parents=True)
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(source / name, target / name)
