"""Hugging Face-format model directories: read (single or sharded safetensors) and write."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moa.errors import MoaError
from moa.io import atomic_dir, read_json, write_safetensors
from moa.model.config import ModelConfig
from moa.model.llama import Transformer
from moa.model.tokenizer import Tokenizer

# Checkpoint entries that carry no weights moa needs (older HF exports store the RoPE table).
IGNORED_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def empty_model(config: ModelConfig) -> Transformer:
    """A model whose parameters are not allocated yet: loading assigns the checkpoint's tensors."""
    with torch.device("meta"):
        return Transformer(config)


def load_state(model: Transformer, tensors: dict[str, torch.Tensor], source: str,
               dtype: torch.dtype = torch.float32) -> Transformer:
    """Check names and shapes against the model, then assign the tensors (no copy when dtypes agree)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    tensors = {k: v for k, v in tensors.items() if not IGNORED_KEYS.fullmatch(k)}
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise MoaError(f"{source}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all) "
                       f"for a {model.config.model_type} model")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MoaError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise MoaError(f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                           f"the config implies {list(shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise MoaError(f"{path}: cannot read safetensors ({err}); re-download or re-convert the model") from err


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "re-download or re-convert the model").get("weight_map")
        if not isinstance(weight_map, dict):
            raise MoaError(f"{index}: not a valid safetensors index (needs a 'weight_map')")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise MoaError(f"{directory / missing[0]}: shard listed in {index.name} is missing")
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise MoaError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                       "(moa reads safetensors only; convert .bin checkpoints with transformers first)")
    return [single]


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    hf = read_json(path, "a model directory needs a transformers config.json")
    try:
        return ModelConfig.from_hf(hf)
    except TypeError as err:
        raise MoaError(f"{path}: unexpected value ({err})") from err


def load_hf_dir(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    directory = Path(directory)
    config = read_config(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        tensors |= read_safetensors(path)
    model = load_state(empty_model(config), tensors, str(directory), dtype)
    return model, Tokenizer.from_dir(directory)


def save_hf_dir(model: Transformer, tokenizer: Tokenizer, out: str | Path,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors and the tokenizer files that transformers loads as is."""
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # shared with the embedding; safetensors refuses aliased tensors
    hf = model.config.to_hf(torch_dtype=str(dtype).removeprefix("torch."))
    if tokenizer.pad_token_id is not None:
        hf["pad_token_id"] = tokenizer.pad_token_id
    generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_safetensors(tmp / "model.safetensors", state)
        tokenizer.save(tmp)
    return Path(out)
