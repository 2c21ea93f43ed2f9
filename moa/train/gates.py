"""`moa learn-merge` for the token-level gates (moa.gates): X-LoRA's classifier and LoRA-Flow's per-block gates,
trained on the language-modelling loss with every task LoRA frozen, on the data MoA's routers are fitted on: the
first `examples` (default router.prompts_per_task) training rows of every task, balanced, for `steps` optimizer
steps of training.batch_size packed rows (default: one epoch, every row read once, as routers mode reads each
once for its features; moa's trainer: AdamW without decay, the schedule, checkpoints that resume). LoRA dropout
is off: the gate learns the experts as they serve.

Every row weighs the same in the loss (its mean over its target tokens), as every prompt does in the routers'
classification loss. The token-summed LM loss would weigh a task by its target length: a 112-token math answer
outweighs a one-word sentiment label a hundredfold, and the gate learns to serve the long-target tasks.

Afterwards each task's validation rows (prompt and target) are read through the gated model to record the mean
weight each block gives each expert (learned/{name}/gate_usage.parquet: the report's heatmap).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from moa.config import Config
from moa.data.batching import Batch, Example, lm_loss
from moa.gates import TokenGates, build_gates, gate_spec
from moa.generate import score
from moa.layout import ExperimentPaths, trained_task_adapters
from moa.lora import attach_experts
from moa.model import Tokenizer, Transformer
from moa.model.prepared import base_model, device
from moa.plan import with_checkpointing
from moa.train.lora import balanced, task_examples
from moa.train.trainer import Trainer, TrainSettings

# An unset gate learning rate is LR_TIMES_WIDTH / hidden size. Adam's first steps move every weight by about the
# rate, so a gate logit by up to lr x ||x||_1 ~ lr x H x mean|x_i|: a fixed rate saturates a wide gate's softmax in a
# step, and an expert it turned off gets no gradient back (0.05 on SmolLM2's H = 576 moves a logit by tens of nats:
# X-LoRA then gave two of six experts no weight on any task, its own included). 3 / H bounds that move near
# 3 x mean|x_i| at any width (muP's 1 / fan-in for Adam): 0.0052 for SmolLM2, 0.0007 for a 7B model's 4096.
LR_TIMES_WIDTH = 3.0
XLORA_SETTINGS = ("xlora_depth", "xlora_size", "xlora_dropout_p", "layerwise_scalings", "enable_softmax",
                  "enable_softmax_topk", "softmax_temperature", "top_k_lora", "global_scaling_weight")


class GateTraining(nn.Module):
    """What the trainer optimizes: the gates, attached to `lm` (frozen, LoRA dropout off)."""

    def __init__(self, lm: Transformer, gates: TokenGates) -> None:
        super().__init__()
        self.lm, self.gates = lm, gates.attach(lm)

    def train(self, mode: bool = True) -> GateTraining:
        super().train(mode)
        self.lm.eval()
        return self


def gate_loss(model: GateTraining, batch: Batch) -> Tensor:
    """The sum of the batch's examples' mean token losses (the trainer divides by the step's examples)."""
    return lm_loss(model.lm, batch, reduction="per_example").sum()


@dataclass(frozen=True)
class TrainedGate:
    gates: TokenGates  # detached, on the CPU
    labelled: int  # training rows learned from, over every task
    log: pd.DataFrame
    usage: pd.DataFrame  # see gate_usage


def train_gate(config: Config, name: str, params: dict[str, Any]) -> TrainedGate:
    """Train the gate of `methods.{name}` (its kind: params["method"])."""
    tasks = list(config["tasks"])
    dirs = trained_task_adapters(config)
    model, tokenizer = base_model(config)
    attach_experts(model, dirs)
    torch.manual_seed(config["seed"])
    spec = gate_spec(params["method"], model, tasks, **{k: params[k] for k in XLORA_SETTINGS if k in params})
    gates = build_gates(spec)
    per_task = params["examples"] or config["router"]["prompts_per_task"]
    rows = [task_examples(config, t, "train", tokenizer, i)[:per_task] for i, t in enumerate(tasks)]
    settings = TrainSettings.from_config(config["training"])
    lr = params["lr"] or LR_TIMES_WIDTH / spec.hidden_size
    settings = replace(settings, steps=params["steps"], epochs=1.0, lr=lr, weight_decay=0.0)
    settings = with_checkpointing(settings, config, model.config, "learn_merge")
    training = GateTraining(model.to(device()), gates.to(device()))
    trainer = Trainer(training, balanced(rows, config["seed"]), [], settings, config["seed"],
                      ExperimentPaths.of(config).checkpoint(name), loss_fn=gate_loss, desc=f"learn {name}",
                      unit="example")
    log = trainer.run()
    trainer.discard_checkpoints()
    usage = gate_usage(model, gates.eval(), config, tokenizer)
    gates.detach()
    return TrainedGate(gates.cpu(), sum(map(len, rows)), log, usage)


@torch.no_grad()
def gate_usage(model: Transformer, gates: TokenGates, config: Config, tokenizer: Tokenizer) -> pd.DataFrame:
    """Each task's mean gate weight per block and expert over its validation rows' tokens (prompt and target)."""
    model.eval()
    frames = []
    for i, task in enumerate(config["tasks"]):
        examples: list[Example] = task_examples(config, task, "validation", tokenizer, i)
        gates.start_recording()
        score(model, examples)
        tokens, usage = gates.tokens, gates.stop_recording()
        frames.append(pd.DataFrame([{"task": task, "layer": block, "expert": expert, "weight": float(weight),
                                     "tokens": tokens}
                                    for block, row in enumerate(usage) for expert, weight in zip(config["tasks"], row)]))
    return pd.concat(frames, ignore_index=True)
