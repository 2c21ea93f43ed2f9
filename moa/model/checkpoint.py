"""Hugging Face-format model directories: read (single or sharded safetensors) and write."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
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


def check_state(model: Transformer, shapes: dict[str, list[int]], source: str) -> set[str]:
    """The checkpoint's names to load, after checking all of them (`shapes`: name -> shape) against the
    model, so that a bad checkpoint fails before any tensor is read."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    names = {k for k in shapes if not IGNORED_KEYS.fullmatch(k)}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        names.discard("lm_head.weight")
    unknown = sorted(names - set(expected))
    if unknown:
        raise MoaError(f"{source}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all) "
                       f"for a {model.config.model_type} model")
    missing = sorted(set(expected) - names)
    if missing:
        raise MoaError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if list(shapes[name]) != shape:
            raise MoaError(f"{source}: tensor {name!r} has shape {list(shapes[name])}, the config implies {shape}")
    return names


def assign(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Put checked tensors in place of the model's meta ones, as they are (no copy)."""
    model.load_state_dict(tensors, strict=False, assign=True)


def finish(model: Transformer, device: torch.device | str) -> Transformer:
    model.tie_weights()  # the LM head still holds its meta placeholder
    model = model.to(device)  # what is still elsewhere: RoPE's buffer, made on the CPU at construction
    model.tie_weights()  # a move to another kind of device (meta) makes new parameters
    return model.eval().requires_grad_(False)


def load_state(model: Transformer, tensors: dict[str, torch.Tensor], source: str,
               device: torch.device | str = "cpu") -> Transformer:
    """Check and assign tensors already read in the model's dtype onto `device`."""
    names = check_state(model, {k: list(v.shape) for k, v in tensors.items()}, source)
    assign(model, {k: tensors[k] for k in names})
    return finish(model, device)


@contextlib.contextmanager
def open_shard(path: Path) -> Iterator[safe_open]:
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise MoaError(f"{path}: cannot read safetensors ({err}); re-download or re-convert the model") from err


def shard_shapes(paths: list[Path]) -> dict[Path, dict[str, list[int]]]:
    """Each shard's tensor names and shapes, from its header alone (no tensor data is read)."""
    shapes = {}
    for path in paths:
        with open_shard(path) as f:
            shapes[path] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    return shapes


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


def load_hf_dir(directory: str | Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer]:
    """Every tensor goes to `dtype` on `device` as soon as it is read, one shard at a time: the host holds
    at most one shard beyond the model (none of the model when `device` is a GPU)."""
    directory = Path(directory)
    model = empty_model(read_config(directory))
    shards = shard_shapes(weight_files(directory))
    names = check_state(model, {k: v for shapes in shards.values() for k, v in shapes.items()}, str(directory))
    for path, shapes in shards.items():
        with open_shard(path) as f:
            assign(model, {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in shapes if k in names})
    return finish(model, device), Tokenizer.from_dir(directory)


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
