"""LoRA with N experts per layer, routing modes, folding, and PEFT-format adapter I/O."""

from moa.lora.inject import (
    DEFAULT_TARGETS,
    adapter_state_dict,
    add_expert,
    expert_specs,
    fold_lora,
    inject_lora,
    load_adapter_state,
    lora_layers,
    mark_only_lora_as_trainable,
    matches_target,
    peft_key,
    set_route,
    unfold_lora,
    use_route,
)
from moa.lora.layer import ExpertSpec, LoRALinear, Route
from moa.lora.peft_io import (
    AdapterConfig,
    attach_adapter,
    check_fingerprint,
    load_adapter,
    save_adapter,
    write_adapter,
)

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "ExpertSpec",
    "LoRALinear",
    "Route",
    "adapter_state_dict",
    "add_expert",
    "attach_adapter",
    "check_fingerprint",
    "expert_specs",
    "fold_lora",
    "inject_lora",
    "load_adapter",
    "load_adapter_state",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "matches_target",
    "peft_key",
    "save_adapter",
    "set_route",
    "unfold_lora",
    "use_route",
    "write_adapter",
]
