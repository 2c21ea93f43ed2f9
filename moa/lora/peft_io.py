"""PEFT-format adapters on disk: adapter_config.json + adapter_model.safetensors (never pickle).

moa's architecture fingerprint is stored in the safetensors metadata, not in adapter_config.json:
PEFT ignores metadata silently, whereas an unknown config key makes it warn on every load that the
file came from a newer PEFT.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from moa.errors import MoaError
from moa.io import atomic_file, read_json, write_safetensors
from moa.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from moa.lora.inject import (
    PEFT_PREFIX,
    adapter_state_dict,
    add_expert,
    expert_specs,
    inject_lora,
    load_adapter_state,
    lora_layers,
    matches_target,
)
from moa.lora.layer import ExpertSpec, LoRALinear

FINGERPRINT_KEY = "moa.arch_fingerprint"

# LoraConfig fields that change the math or the tensor set; moa supports only their empty defaults.
_UNSUPPORTED = (
    "rank_pattern", "alpha_pattern", "exclude_modules", "fan_in_fan_out", "modules_to_save",
    "layers_to_transform", "layer_replication", "trainable_token_indices", "use_dora", "lora_bias",
    "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
    "kasa_config", "velora_config", "monteclora_config",
)  # fmt: skip


@dataclass
class AdapterConfig:
    """The part of PEFT's LoraConfig that moa reads and writes."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    arch_fingerprint: dict[str, Any] | None = None

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.r, self.lora_alpha, self.use_rslora)

    def to_peft_json(self) -> dict[str, Any]:
        alpha = int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": alpha,
            "target_modules": self.target_modules,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
        }

    @classmethod
    def from_peft_json(cls, raw: dict[str, Any], source: Path) -> AdapterConfig:
        if raw.get("peft_type") != "LORA":
            raise MoaError(f"{source}: peft_type is {raw.get('peft_type')!r}; moa reads only LORA adapters")
        for key in _UNSUPPORTED:
            if raw.get(key):
                raise MoaError(f"{source}: {key}={raw[key]!r} is not supported by moa; save the adapter without it")
        if raw.get("bias", "none") != "none":
            raise MoaError(f"{source}: bias={raw['bias']!r} is not supported by moa; train with bias='none'")
        if not raw.get("target_modules"):
            raise MoaError(f"{source}: target_modules is missing; write the module names into the config")
        targets = raw["target_modules"]
        return cls(
            r=int(raw.get("r", 8)),  # PEFT's defaults
            lora_alpha=raw.get("lora_alpha", 8),
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            lora_dropout=float(raw.get("lora_dropout", 0.0)),
            use_rslora=bool(raw.get("use_rslora", False)),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )


def write_adapter(path: str | os.PathLike, config: AdapterConfig, state: dict[str, Tensor]) -> Path:
    """Write ``state`` (PEFT keys) and ``config`` into directory ``path``; each file atomically.

    Other files in the directory (e.g. a training log) are left alone.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {}
    if config.arch_fingerprint is not None:
        metadata[FINGERPRINT_KEY] = json.dumps(config.arch_fingerprint, sort_keys=True)
    write_safetensors(path / ADAPTER_WEIGHTS, state, metadata)
    with atomic_file(path / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(config.to_peft_json(), indent=2, sort_keys=True) + "\n")
    return path


def save_adapter(
    path: str | os.PathLike,
    model: nn.Module,
    expert: int = 0,
    base_model_name_or_path: str | None = None,
    arch_fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Save expert ``expert`` of ``model`` as a PEFT adapter."""
    layers = lora_layers(model)
    specs = expert_specs(model)
    if not 0 <= expert < len(specs):
        raise MoaError(f"cannot save expert {expert}: the model has {len(specs)} LoRA experts")
    spec = specs[expert]
    config = AdapterConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=_target_modules(model, layers),
        lora_dropout=next(iter(layers.values())).dropout,
        use_rslora=spec.use_rslora,
        base_model_name_or_path=base_model_name_or_path,
        arch_fingerprint=arch_fingerprint,
    )
    return write_adapter(path, config, adapter_state_dict(model, expert))


def load_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """Read a PEFT LoRA adapter directory (moa's or PEFT's); checks files, config and ranks."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    hint = f"a PEFT adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
    config = AdapterConfig.from_peft_json(read_json(config_file, hint), config_file)
    if not weights_file.is_file():
        raise MoaError(f"{weights_file}: not found; {hint}")
    try:
        with safe_open(weights_file, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MoaError(f"{weights_file}: not a readable safetensors file ({e}); re-save the adapter") from None
    if FINGERPRINT_KEY in metadata:
        config.arch_fingerprint = json.loads(metadata[FINGERPRINT_KEY])
    _check_factors(config, state, weights_file)
    return config, state


def check_fingerprint(config: AdapterConfig, arch_fingerprint: dict[str, Any] | None, source: str) -> None:
    """Raise if the adapter was saved for a different architecture (skipped when either side has none)."""
    if config.arch_fingerprint is None or arch_fingerprint is None:
        return
    ours = json.loads(json.dumps(arch_fingerprint))  # tuples -> lists, as stored
    theirs = config.arch_fingerprint
    for key in sorted(ours.keys() | theirs.keys()):
        if ours.get(key) != theirs.get(key):
            base = config.base_model_name_or_path or "the model it was trained on"
            raise MoaError(
                f"{source}: adapter was saved for {key}={theirs.get(key)!r} but the base model has "
                f"{key}={ours.get(key)!r}; load it onto {base}"
            )


def attach_adapter(model: nn.Module, path: str | os.PathLike, arch_fingerprint: dict[str, Any] | None = None) -> int:
    """Load an adapter as a new expert of ``model`` (injecting LoRA layers as needed); returns its index.

    Layers the adapter does not target get zero factors for it; on a model without LoRA it becomes the active one.
    """
    config, state = load_adapter(path)
    source = str(Path(path) / ADAPTER_WEIGHTS)
    check_fingerprint(config, arch_fingerprint, source)
    try:
        inject_lora(model, config.target_modules, dropout=config.lora_dropout, experts=expert_specs(model))
    except MoaError as e:
        raise MoaError(f"{Path(path) / ADAPTER_CONFIG}: {e}") from None
    expert = add_expert(model, config.spec)
    load_adapter_state(model, state, expert, config.target_modules, source)
    return expert


def attach_experts(model: nn.Module, dirs: Sequence[Path]) -> None:
    """Load PEFT adapters as experts 0..N-1, in order, all frozen."""
    for path in dirs:
        attach_adapter(model, path, model.config.fingerprint())
    for param in model.parameters():
        param.requires_grad_(False)


def _check_factors(config: AdapterConfig, state: dict[str, Tensor], source: Path) -> None:
    for key, t in state.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise MoaError(f"{source}: unexpected tensor {key}; expected only {PEFT_PREFIX}<module>.lora_A/B.weight")
        rank_dim = 0 if key.endswith(".lora_A.weight") else 1
        if t.dim() != 2 or t.shape[rank_dim] != config.r:
            shape = list(t.shape)
            raise MoaError(f"{source}: tensor {key} has shape {shape}, expected rank r={config.r} on dim {rank_dim}")


def _target_modules(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    """Leaf names (PEFT's usual form) when they select exactly the LoRA layers, else full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    return leaves if {n for n in linears if matches_target(n, leaves)} == layers.keys() else sorted(layers)

