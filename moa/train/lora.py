"""`moa train-lora` (one LoRA per task) and `moa train-mixed` (one LoRA on all tasks' data, balanced)."""

from __future__ import annotations

import random

import torch

from moa.config import Config
from moa.data.batching import Example, encode_examples
from moa.data.splits import read_split
from moa.io import atomic_dir
from moa.layout import ADAPTER_CONFIG, MIXED, TRAIN_LOG, ExperimentPaths
from moa.lora import inject_lora, mark_only_lora_as_trainable, save_adapter
from moa.model import Tokenizer, Transformer
from moa.model.prepared import base_model, device
from moa.plan import with_checkpointing
from moa.step_result import StepResult
from moa.train.trainer import Trainer, TrainSettings


def train_lora_factors_in_fp32(model: Transformer) -> None:
    """Only the LoRA factors train, kept in fp32 whatever the base dtype (optimizer state follows them)."""
    mark_only_lora_as_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_model(config: Config) -> tuple[Transformer, Tokenizer]:
    """The base model with one fresh LoRA expert (seeded init), ready to train."""
    model, tokenizer = base_model(config)
    lora = config["lora"]
    torch.manual_seed(config["seed"])
    inject_lora(model, lora["target_modules"], rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                use_rslora=lora["use_rslora"])
    train_lora_factors_in_fp32(model)
    return model.to(device()), tokenizer


def task_examples(config: Config, task: str, split: str, tokenizer: Tokenizer, index: int = 0) -> list[Example]:
    frame = read_split(config, task, split)
    return encode_examples(frame.prompt.tolist(), frame.target.tolist(), tokenizer,
                           chat_template=config["data"]["chat_template"], tasks=[index] * len(frame))


def train_and_save(config: Config, model: Transformer, train: list[Example], validation: list[Example],
                   name: str) -> StepResult:
    """Train, then write adapters/{name}/ (PEFT format + train_log.parquet) in one atomic step."""
    paths = ExperimentPaths.of(config)
    settings = with_checkpointing(TrainSettings.from_config(config["training"]), config, model.config,
                                  "train_mixed" if name == MIXED else "train_lora")
    trainer = Trainer(model, train, validation, settings, config["seed"], paths.checkpoint(name), desc=f"train {name}")
    log = trainer.run()
    out = paths.adapter(name)
    with atomic_dir(out) as tmp:
        save_adapter(tmp, model, base_model_name_or_path=config["model"]["source"],
                     arch_fingerprint=model.config.fingerprint())
        log.to_parquet(tmp / TRAIN_LOG, index=False)
    trainer.discard_checkpoints()
    return StepResult(out, curves=log, artifacts=[out / TRAIN_LOG, out / ADAPTER_CONFIG])


def train_lora(config: Config, task: str) -> StepResult:
    model, tokenizer = lora_model(config)
    return train_and_save(config, model, task_examples(config, task, "train", tokenizer),
                          task_examples(config, task, "validation", tokenizer), task)


def balanced(per_task: list[list[Example]], seed: int) -> list[Example]:
    """Every task upsampled (seeded, whole copies first) to the largest task's size."""
    largest = max(map(len, per_task))
    rng = random.Random(f"balance:{seed}")
    mixed = []
    for examples in per_task:
        copies, rest = divmod(largest, len(examples))
        mixed += examples * copies + rng.sample(examples, rest)
    return mixed


def all_task_examples(config: Config, tokenizer: Tokenizer) -> tuple[list[Example], list[Example]]:
    """Every task's train examples, balanced, and validation examples, labelled with the task's index."""
    tasks = list(config["tasks"])
    train = balanced([task_examples(config, t, "train", tokenizer, i) for i, t in enumerate(tasks)], config["seed"])
    validation = [e for i, t in enumerate(tasks) for e in task_examples(config, t, "validation", tokenizer, i)]
    return train, validation


def train_mixed(config: Config) -> StepResult:
    model, tokenizer = lora_model(config)
    return train_and_save(config, model, *all_task_examples(config, tokenizer), MIXED)
