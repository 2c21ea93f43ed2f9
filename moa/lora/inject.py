"""Small pure functions over a model: inject LoRA layers, activate experts, fold, and move expert factors in PEFT keys."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moa.errors import MoaError
from moa.lora.layer import Active, ExpertSpec, LoRALinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the wrapped model


def peft_key(module_name: str, factor: str) -> str:
    """PEFT's saved key of a LoRA factor ("A" or "B") of ``module_name``."""
    return f"{PEFT_PREFIX}{module_name}.lora_{factor}.weight"


def matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex over the full name, a list matches name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRA layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def expert_specs(model: nn.Module) -> list[ExpertSpec]:
    """The expert specs shared by every LoRA layer of ``model`` (empty without LoRA layers)."""
    layers = list(lora_layers(model).values())
    return list(layers[0].specs) if layers else []


def inject_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    experts: int | Sequence[ExpertSpec] = 1,
) -> list[str]:
    """Replace matching nn.Linear modules in place by LoRALinear; returns the replaced names.

    ``experts`` is a count of identical (rank, alpha, use_rslora) experts or per-expert specs.
    Layers added to a model that already has LoRA layers must get the same specs (zero B).
    """
    specs = [ExpertSpec(rank, alpha, use_rslora)] * experts if isinstance(experts, int) else list(experts)
    existing = lora_layers(model)
    if existing and specs != expert_specs(model):
        raise MoaError("new LoRA layers must have the model's existing expert specs; pass experts=expert_specs(model)")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [n for n in linears if matches_target(n, target_modules)]
    if not names and not any(matches_target(n, target_modules) for n in existing):
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise MoaError(f"LoRA target_modules {target_modules!r} match no linear layer; available: {available}")
    for name in names:
        _replace(model, name, LoRALinear(linears[name], specs, dropout))
    return names


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``name`` is, in the mode of what it replaces (an eval-mode model stays so)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, module.train(getattr(parent, child).training))


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything except the LoRA factors."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in (*layer.lora_A, *layer.lora_B):
            p.requires_grad_(True)


def add_expert(model: nn.Module, spec: ExpertSpec) -> int:
    """Append an expert (B zero: no effect until trained or loaded) to every LoRA layer."""
    indices = {layer.add_expert(spec) for layer in lora_layers(model).values()}
    if len(indices) != 1:
        raise MoaError("the model has no LoRA layers (or layers with different expert counts); call inject_lora first")
    return indices.pop()


def activate(model: nn.Module, active: Active | Sequence[float]) -> None:
    """Make the same experts active on every LoRA layer (see moa.lora.layer for the values)."""
    for layer in lora_layers(model).values():
        layer.active = active


@contextmanager
def activated(model: nn.Module, active: Active | Sequence[float]) -> Iterator[None]:
    """Temporarily activate experts on every LoRA layer; restores each layer's previous choice."""
    previous = {name: layer.active for name, layer in lora_layers(model).items()}
    activate(model, active)
    try:
        yield
    finally:
        for name, layer in lora_layers(model).items():
            layer.active = previous[name]


def fold_lora(model: nn.Module, experts: int | Tensor | Sequence[float]) -> None:
    """Fold one expert (int) or a weighted combination ([N]) into every base weight."""
    for layer in lora_layers(model).values():
        layer.fold(experts)


def merge_and_unload(model: nn.Module, experts: int | Tensor | Sequence[float] = 0) -> None:
    """Fold ``experts`` into the base weights and put plain nn.Linear layers back, as PEFT's
    merge_and_unload: the model then decodes at exactly the base model's cost."""
    for name, layer in lora_layers(model).items():
        layer.fold(experts)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias  # the folded Parameters themselves, no copy
        _replace(model, name, linear)


@torch.no_grad()
def add_to_weights(model: nn.Module, updates: Iterable[tuple[str, Tensor]]) -> None:
    """W += delta for each (module name, dense delta [out, in]): an update no LoRA factors hold (an untruncated
    element-wise merge), summed in fp32 and rounded once to W's dtype, one module at a time."""
    modules = dict(model.named_modules())
    for name, delta in updates:
        module = modules.get(name)
        if not isinstance(module, nn.Linear) or module.weight.shape != delta.shape:
            raise MoaError(f"update of {name} (shape {list(delta.shape)}) fits no linear layer of the model; the "
                           "adapters were trained for another base model")
        module.weight.copy_(module.weight.float() + delta.to(module.weight.device).float())


def unfold_lora(model: nn.Module) -> None:
    """Undo fold_lora on every layer."""
    for layer in lora_layers(model).values():
        layer.unfold()


def adapter_state_dict(model: nn.Module, expert: int = 0) -> dict[str, Tensor]:
    """Expert ``expert``'s factors under PEFT's keys (detached, sharing storage)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[peft_key(name, "A")] = layer.lora_A[expert].detach()
        state[peft_key(name, "B")] = layer.lora_B[expert].detach()
    return state


@torch.no_grad()
def load_adapter_state(
    model: nn.Module,
    state: dict[str, Tensor],
    expert: int = 0,
    targets: str | Sequence[str] | None = None,
    source: str = "adapter state",
) -> None:
    """Copy PEFT-keyed factors into expert ``expert``; checks keys and shapes against the model.

    With ``targets`` only matching LoRA layers are expected; the others get zero factors for this expert.
    """
    layers = lora_layers(model)
    if any(layer.folded for layer in layers.values()):
        raise MoaError(f"{source}: cannot load into a model with a folded LoRA delta; call unfold_lora first")
    wanted = {n for n in layers if targets is None or matches_target(n, targets)}
    params = {peft_key(n, f): getattr(layers[n], f"lora_{f}")[expert] for n in wanted for f in "AB"}
    _check_keys(state, params.keys(), source)
    for key, param in params.items():  # check every shape before changing anything
        if state[key].shape != param.shape:
            raise MoaError(f"{source}: tensor {key} has shape {list(state[key].shape)}, expected {list(param.shape)}")
    for key, param in params.items():
        param.copy_(state[key])
    for name in layers.keys() - wanted:
        layers[name].lora_A[expert].zero_()
        layers[name].lora_B[expert].zero_()


def _check_keys(state: dict[str, Tensor], expected: Iterable[str], source: str) -> None:
    for kind, keys in (("missing", set(expected) - state.keys()), ("unexpected", state.keys() - set(expected))):
        if keys:
            raise MoaError(
                f"{source}: {kind} tensor {min(keys)} ({len(keys)} {kind}); the adapter does not fit this model"
            )
