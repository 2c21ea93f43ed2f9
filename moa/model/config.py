"""One dataclass describes every supported LLaMA-family architecture.

Field names follow Hugging Face's config.json so that reading and writing it is a plain mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from moa.errors import MoaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names in configs/CLIs

# model_type -> the `architectures` entry transformers expects in config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise MoaError(
                f"unknown architecture {self.model_type!r}: moa supports {', '.join(ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoaError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def fingerprint(self) -> dict[str, Any]:
        """What an adapter must agree with to fit this model: shapes, not weights."""
        keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")
        spec = {k: getattr(self, k) for k in keys} | {"head_dim": self.dim_per_head}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        return spec | {"sha256": digest}

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a transformers config.json dict; unknown keys are ignored, a bad type is an error."""
        model_type = hf.get("model_type") or _model_type_of(hf.get("architectures") or [])
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in known and v is not None}
        if hf.get("rope_parameters") and "rope_scaling" not in values:  # transformers >= 5 spelling
            params = hf["rope_parameters"]
            values.setdefault("rope_theta", params.get("rope_theta", cls.rope_theta))
            if params.get("rope_type", "default") != "default":
                values["rope_scaling"] = params
        if model_type == "qwen2":
            values["attention_bias"] = True
        values.setdefault("num_key_value_heads", values.get("num_attention_heads", cls.num_attention_heads))
        return cls(**(values | {"model_type": model_type}))

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        hf = dataclasses.asdict(self)
        hf["architectures"] = [ARCHITECTURES[self.model_type]]
        hf["head_dim"] = self.dim_per_head
        hf["hidden_act"] = "silu"
        hf["torch_dtype"] = torch_dtype
        hf["use_cache"] = True
        if self.model_type == "qwen2":
            hf.pop("attention_bias")  # Qwen2's biases are implied by the architecture
        if self.rope_scaling is None:
            hf.pop("rope_scaling")
        return hf


def _model_type_of(architectures: list[str]) -> str:
    by_arch = {v: k for k, v in ARCHITECTURES.items()}
    for arch in architectures:
        if arch in by_arch:
            return by_arch[arch]
    raise MoaError(f"unknown architecture {architectures!r}: moa supports {', '.join(ARCHITECTURES.values())}")


PRESETS: dict[str, ModelConfig] = {
    # A random model small enough for the test suite to run in seconds.
    "tiny": ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "qwen2-0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896,
                              intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=32768, tie_word_embeddings=True,
                              attention_bias=True, bos_token_id=151643, eos_token_id=151645),
    "qwen2-1.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                              intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=32768, tie_word_embeddings=True,
                              attention_bias=True, bos_token_id=151643, eos_token_id=151645),
    "qwen2-7b": ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                            intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                            max_position_embeddings=32768, attention_bias=True,
                            bos_token_id=151643, eos_token_id=151645),
    "llama-2-7b": ModelConfig(),
    "llama-3-8b": ModelConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                              rope_theta=500000.0, max_position_embeddings=8192,
                              bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                                rope_theta=500000.0, max_position_embeddings=131072,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192},
                                bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": ModelConfig(model_type="mistral", intermediate_size=14336, num_key_value_heads=8,
                              max_position_embeddings=32768, rope_theta=10000.0),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise MoaError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
