"""Read a llama.cpp GGUF file: config from its metadata, dequantized weights, and its tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from moa.errors import MoaError
from moa.model.config import ModelConfig
from moa.model.tokenizer import Tokenizer, byte_level_bpe

# Declarative key map: GGUF tensor name (layer index as {i}) -> Hugging Face name.
KEY_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")
CONTROL_TOKEN = 3  # llama.cpp's token type of special tokens such as <|im_end|>


def hf_name(gguf_name: str, path: Path) -> str:
    layer = _LAYER.match(gguf_name)
    template = _LAYER.sub("blk.{i}.", gguf_name) if layer else gguf_name
    if template not in KEY_MAP:
        raise MoaError(f"{path}: unknown tensor {gguf_name!r} (moa maps {', '.join(KEY_MAP)})")
    return KEY_MAP[template].format(i=layer.group(1)) if layer else KEY_MAP[template]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k (interleaved RoPE) for rotate-half RoPE."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise MoaError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise MoaError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(err).__name__}: {err})") from err


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def read_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise MoaError(f"{path}: GGUF architecture {arch!r} is not supported (moa reads llama and qwen2)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise MoaError(f"{path}: LLaMA-3.1-style RoPE scaling in GGUF is not supported; "
                       "use the model's Hugging Face directory instead")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    heads = field(reader, f"{arch}.attention.head_count")
    return ModelConfig(
        model_type=arch,
        vocab_size=field(reader, f"{arch}.vocab_size", len(tokens)),
        hidden_size=field(reader, f"{arch}.embedding_length"),
        intermediate_size=field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=field(reader, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=field(reader, f"{arch}.attention.key_length"),
        rms_norm_eps=field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=field(reader, f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=field(reader, f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2",
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
    )


def read_tensors(reader: gguf.GGUFReader, config: ModelConfig, path: Path, dtype: torch.dtype,
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """Dequantized weights by Hugging Face name, each in `dtype` on `device` as soon as it is read."""
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name, path)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as err:
            raise MoaError(f"{path}: cannot dequantize tensor {t.name!r} ({err})") from err
        if config.model_type == "llama" and ".attn_q." in t.name:
            w = unpermute_qk(w, config.num_attention_heads)
        elif config.model_type == "llama" and ".attn_k." in t.name:
            w = unpermute_qk(w, config.num_key_value_heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(device=device, dtype=dtype)
    return tensors


def read_tokenizer(reader: gguf.GGUFReader, path: Path) -> Tokenizer:
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise MoaError(f"{path}: tokenizer model {kind!r} is not supported (moa rebuilds byte-level BPE, 'gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or []
    special = [tok for tok, ttype in zip(tokens, types) if ttype == CONTROL_TOKEN]
    backend = byte_level_bpe(tokens, field(reader, "tokenizer.ggml.merges") or [], special,
                             field(reader, "tokenizer.ggml.pre", "gpt2"))

    def token(key: str) -> str | None:
        index = field(reader, f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    return Tokenizer(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                     pad_token=token("padding_token_id"), chat_template=field(reader, "tokenizer.chat_template"),
                     add_bos_token=bool(field(reader, "tokenizer.ggml.add_bos_token", False)))


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    path = Path(path)
    reader = open_gguf(path)
    config = read_config(reader, path)
    return config, read_tensors(reader, config, path, dtype, device), read_tokenizer(reader, path)
