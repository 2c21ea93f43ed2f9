"""`moa train-lora` (one LoRA per task) and `moa train-mixed` (one LoRA on all tasks' data, balanced)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from moa.config import Config, experiment_dir
from moa.data.batching import Example, encode_examples
from moa.data.prepare import read_split
from moa.io import atomic_dir, atomic_file
from moa.lora import inject_lora, mark_only_lora_as_trainable, save_adapter
from moa.model import DTYPES, Tokenizer, Transformer, load_pretrained, save_hf_dir
from moa.tracking import log_step
from moa.train.trainer import Trainer, TrainSettings

MIXED = "_mixed"  # adapters/_mixed/: the paper's "Single-LoRA (mixed)" baseline


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PROVENANCE_FILE = "moa_source.json"  # in model/: which config.model it was prepared from


def prepared_model_dir(config: Config) -> Path:
    return experiment_dir(config) / "model"


def prepare_model(config: Config) -> Path:
    """results/{experiment}/model/: the base model as an HF directory (a GGUF dequantized once), which
    every later step loads instead of the source."""
    dtype = DTYPES[config["model"]["dtype"]]
    model, tokenizer = load_pretrained(config["model"]["source"], dtype, seed=config["seed"])
    out = save_hf_dir(model, tokenizer, prepared_model_dir(config), dtype)
    with atomic_file(out / PROVENANCE_FILE) as tmp:
        tmp.write_text(json.dumps(_provenance(config), sort_keys=True) + "\n")
    log_step(config, "prepare_model", {"moa.step": "prepare_model"}, _provenance(config),
             metrics={"parameters": sum(p.numel() for p in model.parameters())}, artifacts=[out / "config.json"])
    return out


def _provenance(config: Config) -> dict[str, object]:
    return {"model": config["model"], "seed": config["seed"]}  # random:PRESET models depend on the seed


def base_model(config: Config) -> tuple[Transformer, Tokenizer]:
    """The prepared model/ when it was made from this config's model, else the source itself."""
    prepared = prepared_model_dir(config)
    stamp = prepared / PROVENANCE_FILE
    fresh = stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(_provenance(config)))
    source = prepared if fresh else config["model"]["source"]
    return load_pretrained(source, DTYPES[config["model"]["dtype"]], seed=config["seed"])


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
                   name: str) -> Path:
    """Train, then write adapters/{name}/ (PEFT format + train_log.parquet) in one atomic step."""
    root = experiment_dir(config)
    trainer = Trainer(model, train, validation, TrainSettings.from_config(config["training"]), config["seed"],
                      root / "checkpoints" / name, desc=f"train {name}")
    log = trainer.run()
    out = root / "adapters" / name
    with atomic_dir(out) as tmp:
        save_adapter(tmp, model, base_model_name_or_path=config["model"]["source"],
                     arch_fingerprint=model.config.fingerprint())
        log.to_parquet(tmp / "train_log.parquet", index=False)
    trainer.discard_checkpoints()
    step = "train_mixed" if name == MIXED else f"train_lora:{name}"
    log_step(config, step, {"moa.step": step.split(":")[0], "moa.task": name},
             {k: config[k] for k in ("model", "lora", "training", "data", "seed")}, curves=log,
             artifacts=[out / "train_log.parquet", out / "adapter_config.json"])
    return out


def train_lora(config: Config, task: str) -> Path:
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


def train_mixed(config: Config) -> Path:
    model, tokenizer = lora_model(config)
    tasks = list(config["tasks"])
    train = balanced([task_examples(config, t, "train", tokenizer, i) for i, t in enumerate(tasks)], config["seed"])
    validation = [e for i, t in enumerate(tasks) for e in task_examples(config, t, "validation", tokenizer, i)]
    return train_and_save(config, model, train, validation, MIXED)
