"""`moa learn-merge`: what a composition learns from data over the frozen task LoRAs: the coefficients of a learned
merge, which `moa compose` then folds into one adapter (a static merge: it costs what the base model costs), or the
weights of a token-level gate (xlora, loraflow: moa.train.gates), which serve the task LoRAs as experts.

- cat (LoRA Soups' CAT, Prabhakar et al. 2024): a scalar per task and LoRA module on the concatenated task updates,
  dW_m = sum_i c_mi s_i B_i A_i, trained by gradient (moa's trainer: AdamW without decay, the schedule,
  checkpoints that resume) on the language-modelling loss of a task-balanced mixture of `examples` training rows
  per task (default: as many as the router is fitted on); every LoRA frozen. It starts at task arithmetic (1/N).
- lorahub (LoraHub, Huang et al. 2023, as sail-sg/lorahub's algorithm.py): one weight per task in [-1.5, 1.5],
  found gradient-free by nevergrad's NGOpt from 0 in `budget` evaluations of the reference's objective on `shots`
  validation rows per task: the batch-mean loss summed over batches and divided by the rows, plus
  0.05 * mean |w|. The reference combines the factors (A = sum w_i A_i, B = sum w_i B_i: moa's `linear` merge);
  `combine: exact` weights the updates instead (`concat`).
- adamerging (AdaMerging, Yang et al., ICLR 2024, layer-wise, as EnnengYang/AdaMerging): one coefficient per
  transformer block and task on the task updates, shared by the block's LoRA modules,
  dW_m = sum_i c_{block(m),i} s_i B_i A_i, clamped to [0, 1] in the forward and started at `init` (0.3, the
  paper's prior lambda); trained by gradient (the trainer, as cat) to minimize the Shannon entropy of the
  next-token distribution at the last position of `prompts` test prompts per task (default: as many as the
  router is fitted on); every LoRA frozen. Transductive, as the paper: it reads the test prompts, never their
  targets, and learned.json counts them as its unlabelled budget.

learned/{name}/ holds coefficients.safetensors, learned.json (the merge the coefficients weight, the modules of
their rows, the labelled rows and unlabelled prompts used, the objective, the seconds) and train_log.parquet; a
gate's coefficients.safetensors holds its weights, learned.json its spec, parameters and passes per step, and
gate_usage.parquet its mean weight per task, block and expert on the validation rows.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nevergrad as ng
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moa.compose.merge import MergeMethod
from moa.compose.registry import settings
from moa.config import Config, method_params
from moa.data.batching import IGNORE, Batch, Example, encode_prompts, lm_loss
from moa.data.splits import read_split
from moa.errors import MoaError
from moa.gates import gate_info
from moa.generate import score
from moa.io import atomic_dir, write_safetensors
from moa.layout import GATE_USAGE, LEARNED_COEFFICIENTS, LEARNED_INFO, TRAIN_LOG, ExperimentPaths, trained_task_adapters
from moa.lora import AdapterConfig, activate, attach_experts, load_adapter, load_adapter_state, lora_layers
from moa.model import DTYPES, Tokenizer, Transformer
from moa.model.prepared import base_model, device
from moa.plan import with_checkpointing
from moa.step_result import StepResult
from moa.train.gates import train_gate
from moa.train.lora import balanced, task_examples
from moa.train.trainer import Trainer, TrainSettings

LEARN_MERGE = "learn_merge"  # the step
L1 = 0.05  # LoraHub's default_l1_regularization
BOUND = 1.5  # LoraHub's weight range


@dataclass(frozen=True)
class Learned:
    tensors: dict[str, Tensor]  # a merge's {"coefficients": [modules, tasks] or [tasks]}; a gate's weights
    merge: MergeMethod | None  # the merge the coefficients weight: concat (the updates) or linear (the factors)
    modules: list[str]  # the LoRA modules of the rows; [] for one weight per task
    labelled: int  # labelled rows (prompt and target) learned from, over every task
    objective: float  # the final objective
    log: pd.DataFrame
    unlabelled: int = 0  # prompts without their targets learned from, over every task
    info: dict[str, Any] = field(default_factory=dict)  # more for learned.json (a gate's spec, parameters, passes)
    usage: pd.DataFrame | None = None  # a gate's mean weight per task, block and expert (gate_usage.parquet)


# --- cat ----------------------------------------------------------------------------------------------


class CatTraining(nn.Module):
    """What the trainer optimizes: one scalar per LoRA module and task expert of `lm` (frozen), applied as each
    module's expert weights before every forward."""

    def __init__(self, lm: Transformer, initial: float) -> None:
        super().__init__()
        self.lm, self.layers = lm, list(lora_layers(lm).values())
        experts = self.layers[0].n_experts
        self.coefficients = nn.Parameter(torch.full((len(self.layers), experts), initial, device=device()))

    def apply_coefficients(self) -> None:
        for layer, row in zip(self.layers, self.coefficients):
            layer.active = row


def cat_loss(model: CatTraining, batch: Batch) -> Tensor:
    model.apply_coefficients()
    return lm_loss(model.lm, batch, reduction="sum")


def experts_model(config: Config) -> tuple[Transformer, Tokenizer]:
    """The base model with every task LoRA attached as a frozen expert."""
    model, tokenizer = base_model(config)
    attach_experts(model, trained_task_adapters(config))
    return model, tokenizer


def learn_cat(config: Config, name: str, params: dict[str, Any]) -> Learned:
    model, tokenizer = experts_model(config)
    tasks = list(config["tasks"])
    per_task = params["examples"] or config["router"]["prompts_per_task"]
    rows = [task_examples(config, t, "train", tokenizer, i)[:per_task] for i, t in enumerate(tasks)]
    train = balanced(rows, config["seed"])
    settings_ = TrainSettings.from_config(config["training"])
    settings_ = replace(settings_, steps=params["steps"] or settings_.steps, lr=params["lr"], weight_decay=0.0)
    settings_ = with_checkpointing(settings_, config, model.config, LEARN_MERGE)
    training = CatTraining(model.to(device()), 1.0 / len(tasks))
    trainer = Trainer(training, train, [], settings_, config["seed"], ExperimentPaths.of(config).checkpoint(name),
                      loss_fn=cat_loss, desc=f"learn {name}")
    log = trainer.run()
    trainer.discard_checkpoints()
    return Learned({"coefficients": training.coefficients.detach().float().cpu()}, MergeMethod.CONCAT,
                   list(lora_layers(model)),
                   sum(map(len, rows)), float(log["loss"].iloc[-1]), log)


# --- adamerging ---------------------------------------------------------------------------------------


def block_of(module: str) -> int:
    """The transformer block of a LoRA module, from its name (model.layers.{i}.self_attn.q_proj)."""
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", module)
    if found is None:
        raise MoaError(f"LoRA module {module}: no `layers.{{i}}.` in its name, so adamerging cannot tell its block; "
                       "target modules inside the transformer blocks")
    return int(found.group(1))


class AdaMergingTraining(nn.Module):
    """What the trainer optimizes: one coefficient per block and task expert of `lm` (frozen), clamped to [0, 1]
    and applied as the expert weights of every LoRA module of its block before every forward."""

    def __init__(self, lm: Transformer, initial: float) -> None:
        super().__init__()
        layers = lora_layers(lm)
        self.lm, self.layers, self.blocks = lm, list(layers.values()), [block_of(name) for name in layers]
        experts = self.layers[0].n_experts
        self.coefficients = nn.Parameter(torch.full((len(lm.model.layers), experts), initial, device=device()))

    def clamped(self) -> Tensor:
        return self.coefficients.clamp(0, 1)  # the reference's torch.clamp(lambdas_raw, 0, 1)

    def per_module(self) -> Tensor:
        """[modules, tasks]: each LoRA module's row is its block's clamped coefficients."""
        return self.clamped()[self.blocks]

    def apply_coefficients(self) -> None:
        for layer, row in zip(self.layers, self.per_module()):
            layer.active = row

    def train(self, mode: bool = True) -> AdaMergingTraining:
        super().train(mode)
        self.lm.eval()  # the entropy of the merged model as it serves: LoRA dropout would only add noise
        return self


def entropy_loss(model: AdaMergingTraining, batch: Batch) -> Tensor:
    """The summed entropy of the next-token distributions where the batch has loss positions (each example's last
    prompt position); the labels mark those positions, their values are never read."""
    model.apply_coefficients()
    lm = model.lm
    batch = batch.to(next(lm.parameters()).device)
    at = batch.labels != IGNORE
    hidden = lm.block_input(batch.input_ids, batch.positions, batch.documents(), len(lm.model.layers))
    log_p = torch.log_softmax(lm.lm_head(lm.model.norm(hidden[at])).float(), dim=-1)
    return -(log_p.exp() * log_p).sum()


def unlabelled_prompts(config: Config, tokenizer: Tokenizer, per_task: int | None) -> list[Example]:
    """Up to `per_task` test prompts of every task, each followed by EOS only to mark its last position as the one
    with loss: the targets are never read."""
    chat, eos = config["data"]["chat_template"], tokenizer.eos_token_id
    return [Example(ids, [eos], i) for i, task in enumerate(config["tasks"])
            for ids in encode_prompts(read_split(config, task, "test").prompt.tolist()[:per_task], tokenizer, chat)]


def learn_adamerging(config: Config, name: str, params: dict[str, Any]) -> Learned:
    model, tokenizer = experts_model(config)
    prompts = unlabelled_prompts(config, tokenizer, params["prompts"] or config["router"]["prompts_per_task"])
    settings_ = TrainSettings.from_config(config["training"])
    settings_ = replace(settings_, steps=params["steps"] or settings_.steps, lr=params["lr"], weight_decay=0.0)
    settings_ = with_checkpointing(settings_, config, model.config, LEARN_MERGE)
    training = AdaMergingTraining(model.to(device()), params["init"])
    trainer = Trainer(training, prompts, [], settings_, config["seed"], ExperimentPaths.of(config).checkpoint(name),
                      loss_fn=entropy_loss, desc=f"learn {name}")
    log = trainer.run()
    trainer.discard_checkpoints()
    return Learned({"coefficients": training.per_module().detach().float().cpu()}, MergeMethod.CONCAT,
                   list(lora_layers(model)), 0, float(log["loss"].iloc[-1]), log, unlabelled=len(prompts))


# --- lorahub ------------------------------------------------------------------------------------------


def lorahub_objective(losses: Sequence[tuple[float, int]], weights: Sequence[float], batch_size: int | None) -> float:
    """sail-sg/lorahub's get_score: default_get_loss (each batch's mean loss over its target tokens, summed over
    the batches, divided by the number of examples) plus default_l1_regularization (0.05 * mean |w|)."""
    size = len(losses) if batch_size is None else min(len(losses), batch_size)
    total = sum(sum(nll for nll, _ in losses[i:i + size]) / sum(n for _, n in losses[i:i + size])
                for i in range(0, len(losses), size))
    return total / len(losses) + L1 * sum(abs(w) for w in weights) / len(weights)


def combined_factors(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """The reference's get_final_weights: every factor of every module, weighted and summed over the adapters."""
    return {key: sum(w * state[key].float() for w, state in zip(weights, states)) for key in states[0]}


def learn_lorahub(config: Config, name: str, params: dict[str, Any]) -> Learned:
    dirs = trained_task_adapters(config)
    adapters = [load_adapter(d) for d in dirs]
    exact = params["combine"] == "exact"
    if not exact:
        _check_combinable(adapters, dirs)
    model, tokenizer = base_model(config)
    attach_experts(model, dirs if exact else dirs[:1])  # factors: one expert whose factors each candidate sets
    model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval()
    shots = [e for i, t in enumerate(config["tasks"])
             for e in task_examples(config, t, "validation", tokenizer, i)[:params["shots"]]]
    states = [state for _, state in adapters]
    history: list[dict[str, float]] = []

    def objective(weights: np.ndarray) -> float:
        if exact:
            activate(model, torch.tensor(weights, dtype=torch.float32))
        else:
            load_adapter_state(model, combined_factors(states, weights))
        value = lorahub_objective(score(model, shots), weights.tolist(), None)
        history.append({"step": len(history) + 1, "loss": value,
                        **{f"w.{task}": float(w) for task, w in zip(config["tasks"], weights)}})
        return value

    with tqdm(total=params["budget"], desc=f"learn {name} (NGOpt)") as progress:
        def tracked(weights: np.ndarray) -> float:
            progress.update()
            return objective(weights)

        weights = lorahub_search(tracked, len(dirs), params["budget"],
                                 params["seed"] if params["seed"] is not None else config["seed"])
    log = pd.DataFrame(history)
    return Learned({"coefficients": torch.tensor(weights, dtype=torch.float32)},
                   MergeMethod.CONCAT if exact else MergeMethod.LINEAR, [],
                   len(shots), float(objective(np.asarray(weights))), log)


def lorahub_search(objective: Callable[[np.ndarray], float], n: int, budget: int, seed: int) -> list[float]:
    """NGOpt over n weights in [-1.5, 1.5] from 0 (lorahub_learning's parametrization), seeded."""
    parametrization = ng.p.Array(init=[0.0] * n, lower=[-BOUND] * n, upper=[BOUND] * n)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    return [float(w) for w in optimizer.minimize(objective).value]


def _check_combinable(adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]], dirs: Sequence) -> None:
    shapes = {(config.r, config.spec.scaling) for config, _ in adapters}
    if len(shapes) > 1:
        raise MoaError(f"lorahub sums the task LoRAs' factors, which needs one rank and scaling (got {sorted(shapes)} "
                       f"over {', '.join(d.name for d in dirs)}); set combine: exact")


# --- token-level gates -----------------------------------------------------------------------------------


def learn_gate(config: Config, name: str, params: dict[str, Any]) -> Learned:
    """X-LoRA's classifier or LoRA-Flow's gates (moa.train.gates); learned.json records the gate's spec too."""
    trained = train_gate(config, name, params)
    state = {key: value.detach().float().contiguous() for key, value in trained.gates.state_dict().items()}
    return Learned(state, None, [], trained.labelled, float(trained.log["loss"].iloc[-1]), trained.log,
                   info=gate_info(trained.gates), usage=trained.usage)


# --- the step -------------------------------------------------------------------------------------------

LEARNERS: dict[str, Callable[[Config, str, dict[str, Any]], Learned]] = {
    "cat": learn_cat, "lorahub": learn_lorahub, "adamerging": learn_adamerging, "xlora": learn_gate,
    "loraflow": learn_gate}


def learn_merge(config: Config, method: str) -> StepResult:
    """Learn the coefficients of learned merge `method`; write learned/{method}/ atomically."""
    params = settings(method_params(config, method))
    start = time.perf_counter()
    learned = LEARNERS[params["method"]](config, method, params)
    seconds = time.perf_counter() - start
    paths = ExperimentPaths.of(config)
    info = {"method": params["method"], "merge": learned.merge, "modules": learned.modules,
            "tasks": list(config["tasks"]), "labelled": learned.labelled, "unlabelled": learned.unlabelled,
            "objective": learned.objective, "seconds": round(seconds, 2)} | learned.info
    with atomic_dir(paths.learned(method)) as tmp:
        write_safetensors(tmp / LEARNED_COEFFICIENTS, {k: v.contiguous() for k, v in learned.tensors.items()})
        (tmp / LEARNED_INFO).write_text(json.dumps(info, indent=2) + "\n")
        learned.log.to_parquet(tmp / TRAIN_LOG, index=False)
        if learned.usage is not None:
            learned.usage.to_parquet(tmp / GATE_USAGE, index=False)
    return StepResult(paths.learned(method), curves=learned.log,
                      metrics={k: info[k] for k in ("labelled", "unlabelled", "objective", "seconds", "parameters",
                                                    "passes") if k in info},
                      artifacts=[paths.learned(method) / name for name in (LEARNED_INFO, TRAIN_LOG, GATE_USAGE)
                                 if (paths.learned(method) / name).is_file()])
