"""Shared fixtures: tiny random models (moa's own and transformers-written) and the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moa.model import Tokenizer, Transformer, default_gguf, load_pretrained, random_model


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny() -> tuple[Transformer, Tokenizer]:
    return random_model("tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Transformer, Tokenizer]:
    return load_pretrained()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return default_gguf()


def with_random_experts(model: Transformer, seed: int, experts: int = 3) -> Transformer:
    """A copy of `model` with `experts` random rank-4 LoRA experts (nonzero B, so each changes the output)."""
    import copy

    from moa.lora import inject_lora, lora_layers

    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    inject_lora(model, rank=4, alpha=8, experts=experts)
    for layer in lora_layers(model).values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.3)
    return model.eval()


def hf_tiny_dir(tmp_path: Path, arch: str, **overrides: object) -> Path:
    """A random transformers model of the given family, saved as an HF directory."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**(common | overrides)))
    out = tmp_path / arch
    model.save_pretrained(out)
    _write_byte_tokenizer(out)
    return out


def _write_byte_tokenizer(directory: Path) -> None:
    from moa.model.tokenizer import byte_tokenizer

    byte_tokenizer().save(directory)


TINY_FAST = ["training.steps=3", "training.batch_size=4", "training.warmup_steps=1", "training.eval_every=20",
             "training.checkpoint_every=100", "data.sizes.train=16", "data.sizes.test=4"]


def composed_experiment(root: Path, tasks: list[str], methods: dict, overrides: list[str]) -> Path:
    """config/smoke.yaml (the tiny model) on synthetic `tasks` under `root`: the model prepared as an HF directory,
    a LoRA per task, MoA's routers where `methods` has moa, every method composed; returns the config's path."""
    import yaml

    from moa.compose.composition import compose
    from moa.data.prepare import prepare_task
    from moa.experiment import load_config
    from moa.model.prepare import prepare_model
    from moa.model.tokenizer import byte_tokenizer
    from moa.train.lora import train_lora
    from moa.train.router import train_router

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/smoke.yaml").read_text())
    config |= {"results_dir": str(root / "results"), "tracking": {"enabled": False},
               "tasks": {task: {"source": {"type": "synthetic"}} for task in tasks}, "methods": methods}
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, overrides)
    prepare_model(loaded)
    for task in tasks:
        prepare_task(loaded, task, byte_tokenizer())
        train_lora(loaded, task)
    if "moa" in methods:
        train_router(loaded)
    for method in methods:
        compose(loaded, method)
    return path
