"""Learned token-level gates over the task LoRAs: every token's expert weights in every LoRA module come from a
small learned gate, where MoA's routers fix one expert per sequence and Arrow's rule is not trained.

- `FlowGates`, LoRA-Flow (Wang et al., ACL 2024): per transformer block l, w_t = softmax(W_l x_t) + b_l from the
  block's input x_t at each token, shared by the block's LoRA modules (W_l [N, H], b_l [N]). As MoA's routers,
  the gate reads x_t through a parameter-free RMS norm (the residual stream's scale grows with depth, and one
  learning rate should suit every block). W and b start at 0: the uniform average of the experts.
- `XLoraGates`, X-LoRA (Buehler & Buehler 2024) as PEFT's tuners/xlora defines it: a scaling pass of the base
  model (PEFT disables the adapters for it, so its scaling_pass_value has no effect) and a classifier on that
  pass's last hidden state (after the final norm) give each token's scalings for every LoRA module
  [B, T, M, N] (`layerwise_scalings`) or one for all of them; softmax over the experts with a temperature
  (`enable_softmax`), the top `top_k_lora` kept (and re-normalized by a softmax with `enable_softmax_topk`),
  times `global_scaling_weight`. The classifier is one linear layer (`xlora_depth` 1) or an MLP of width
  `xlora_size` with ReLU and dropout `xlora_dropout_p`.

Both are causal (token t's weights depend on tokens <= t only), so the engine's packed prefill, prefix caching
and continuous batching serve them as they are: LoRA-Flow from forward pre-hooks on the blocks, X-LoRA from the
model's `before_blocks` hook, its scaling pass keeping its own keys and values in the slot cache (a second pass
of cache layers, `Transformer.cache_passes`). Training sees the same hooks, so the gates learn from the LM loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moa.errors import MoaError
from moa.io import read_json
from moa.layout import LEARNED_COEFFICIENTS, LEARNED_INFO
from moa.lora import Active, LoRALinear, lora_layers
from moa.model.llama import Documents, SlotCache, Transformer


class GateKind(StrEnum):
    XLORA = "xlora"
    LORAFLOW = "loraflow"


@dataclass(frozen=True)
class GateSpec:
    """Everything needed to rebuild a gate (gate_config.json). The X-LoRA fields keep PEFT's XLoraConfig names
    and defaults; LoRA-Flow reads none of them."""

    kind: GateKind
    hidden_size: int
    n_blocks: int  # transformer blocks
    n_modules: int  # LoRA modules (X-LoRA's "layers")
    tasks: tuple[str, ...]  # the experts, in order
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    global_scaling_weight: float = 1.0

    @property
    def n_experts(self) -> int:
        return len(self.tasks)

    @property
    def passes(self) -> int:
        """Forward passes of the model per step: X-LoRA's scaling pass comes first."""
        return 2 if self.kind == GateKind.XLORA else 1

    def check(self) -> None:
        """One line naming the bad setting, before any model is built."""
        if self.n_experts < 2:
            raise MoaError(f"a {self.kind} gate over {self.n_experts} task LoRA has nothing to choose; configure at "
                           "least two tasks")
        if self.kind != GateKind.XLORA:
            return
        checks = [(self.xlora_depth >= 1, f"xlora_depth {self.xlora_depth} must be >= 1"),
                  (self.xlora_size >= 1, f"xlora_size {self.xlora_size} must be >= 1"),
                  (0 <= self.xlora_dropout_p < 1, f"xlora_dropout_p {self.xlora_dropout_p} must be in [0, 1)"),
                  (self.softmax_temperature > 0, f"softmax_temperature {self.softmax_temperature} must be > 0"),
                  (self.top_k_lora is None or 1 <= self.top_k_lora <= self.n_experts,
                   f"top_k_lora {self.top_k_lora} must be in 1..{self.n_experts} (the tasks) or null")]
        for ok, message in checks:
            if not ok:
                raise MoaError(f"{message}; fix it in the config")


class TokenGates(nn.Module):
    """A gate over the N experts of every LoRA module of a model; `attach` makes the model's LoRA layers follow
    it, `recording` sums the weights it gives per block (the report's mean gate per task and layer)."""

    def __init__(self, spec: GateSpec) -> None:
        super().__init__()
        spec.check()
        self.spec = spec
        self._handles: list[RemovableHandle | _Restore] = []
        self._previous: dict[LoRALinear, Active] = {}
        self.usage: Tensor | None = None  # [blocks, N] summed weights while recording
        self.tokens = 0

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach(self, model: Transformer) -> TokenGates:
        layers = lora_layers(model)
        if len(layers) != self.spec.n_modules or any(m.n_experts != self.spec.n_experts for m in layers.values()):
            raise MoaError(f"{self.spec.kind} gate for {self.spec.n_modules} LoRA modules of {self.spec.n_experts} "
                           f"experts, but the model has {len(layers)} modules of "
                           f"{next(iter(layers.values())).n_experts if layers else 0}; rerun `moa learn-merge`")
        self.detach()
        self._previous = {layer: layer.active for layer in layers.values()}
        self._hook(model, list(layers.values()))
        return self

    def detach(self) -> None:
        """Take the gate off: the LoRA layers' experts are what they were before `attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer, active in self._previous.items():
            layer.active = active
        self._previous = {}

    def _hook(self, model: Transformer, layers: list[LoRALinear]) -> None:
        raise NotImplementedError

    def start_recording(self) -> None:
        self.usage, self.tokens = torch.zeros(self.spec.n_blocks, self.spec.n_experts, dtype=torch.float64), 0

    def stop_recording(self) -> Tensor:
        """The mean weight [blocks, N] per token since start_recording."""
        usage, self.usage = self.usage, None
        return usage / max(self.tokens, 1)

    def _record(self, block: int, weights: Tensor, count: bool) -> None:
        if self.usage is not None:
            self.usage[block] += weights.detach().reshape(-1, weights.shape[-1]).sum(0).double().cpu()
            if count:
                self.tokens += weights.shape[0] * weights.shape[1]


class FlowGates(TokenGates):
    """LoRA-Flow: per block, softmax(W_l rms(x_t)) + b_l over the experts, for every LoRA module of the block."""

    def __init__(self, spec: GateSpec) -> None:
        super().__init__(spec)
        self.weight = nn.Parameter(torch.zeros(spec.n_blocks, spec.n_experts, spec.hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.n_blocks, spec.n_experts))

    def weights(self, block: int, x: Tensor) -> Tensor:
        """The expert weights [B, T, N] of block `block` from its input x [B, T, H]."""
        x = F.rms_norm(x.to(self.weight.dtype), (x.shape[-1],))
        return torch.softmax(F.linear(x, self.weight[block]), dim=-1) + self.bias[block]

    def _hook(self, model: Transformer, layers: list[LoRALinear]) -> None:
        by_block = _by_block(model, layers)
        for block, module in enumerate(model.model.layers):
            self._handles.append(module.register_forward_pre_hook(partial(self._gate, block, by_block[block])))

    def _gate(self, block: int, layers: list[LoRALinear], module: nn.Module, args: tuple) -> None:
        weights = self.weights(block, args[0])
        self._record(block, weights, count=block == 0)
        for layer in layers:
            layer.active = weights


class XLoraGates(TokenGates):
    """X-LoRA as PEFT's XLoraModel: the scaling pass, the classifier, the per-module top-k and softmax."""

    def __init__(self, spec: GateSpec) -> None:
        super().__init__(spec)
        out = spec.n_experts * (spec.n_modules if spec.layerwise_scalings else 1)
        layers: list[nn.Module] = []
        width = spec.hidden_size
        for _ in range(spec.xlora_depth - 1):  # PEFT: Linear, ReLU, Dropout (if p > 0) per hidden layer
            layers += [nn.Linear(width, spec.xlora_size), nn.ReLU()]
            layers += [nn.Dropout(spec.xlora_dropout_p)] if spec.xlora_dropout_p > 0 else []
            width = spec.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))  # PEFT's internal_xlora_classifier.layers
        self._blocks: list[int] = []

    def scalings(self, hidden: Tensor) -> Tensor:
        """The classifier's scalings [B, T, M, N] from the scaling pass's last hidden state [B, T, H]."""
        spec = self.spec
        logits = self.layers(hidden.to(self.layers[-1].weight.dtype))
        logits = logits.view(*hidden.shape[:2], -1, spec.n_experts).expand(-1, -1, spec.n_modules, -1)
        return torch.softmax(logits / spec.softmax_temperature, dim=-1) if spec.enable_softmax else logits

    def module_weights(self, scalings: Tensor) -> Tensor:
        """PEFT's get_maybe_topk_scalings for every module at once, times global_scaling_weight: [B, T, M, N]."""
        spec = self.spec
        if spec.top_k_lora is not None:
            kept = torch.zeros_like(scalings, dtype=torch.bool).scatter_(
                -1, scalings.topk(spec.top_k_lora, dim=-1).indices, True)
            scalings = scalings * kept
        if spec.enable_softmax_topk:
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0)
        return scalings * spec.global_scaling_weight

    def _hook(self, model: Transformer, layers: list[LoRALinear]) -> None:
        by_block = _by_block(model, layers)
        self._blocks = [b for b, block_layers in enumerate(by_block) for _ in block_layers]
        model.before_blocks, model.cache_passes = partial(self._scaling_pass, model, layers), 2
        self._handles.append(_Restore(model))

    @torch.no_grad()
    def base_hidden(self, model: Transformer, layers: list[LoRALinear], x: Tensor, cos: Tensor, sin: Tensor,
                    attn_mask: Tensor | Documents | None, cache: SlotCache | None) -> Tensor:
        """The scaling pass: the base model (every LoRA layer off) from the embeddings x; its keys and values go
        to the cache's second pass."""
        for layer in layers:
            layer.active = None
        view = cache.pass_view(1) if cache is not None else None
        for block in model.model.layers:
            x = block(x, cos, sin, attn_mask, view)
        return model.model.norm(x)

    def _scaling_pass(self, model: Transformer, layers: list[LoRALinear], x: Tensor, cos: Tensor, sin: Tensor,
                      attn_mask: Tensor | Documents | None, cache: SlotCache | None) -> None:
        weights = self.module_weights(self.scalings(self.base_hidden(model, layers, x, cos, sin, attn_mask, cache)))
        for m, layer in enumerate(layers):
            layer.active = weights[:, :, m]
        if self.usage is not None:
            per_block = torch.zeros(*weights.shape[:2], self.spec.n_blocks, self.spec.n_experts, dtype=weights.dtype,
                                    device=weights.device)
            blocks = torch.tensor(self._blocks, device=weights.device)
            per_block.index_add_(2, blocks, weights)
            per_block /= torch.bincount(blocks, minlength=self.spec.n_blocks).clamp(min=1)[:, None]
            for block in range(self.spec.n_blocks):
                self._record(block, per_block[:, :, block], count=block == 0)


class _Restore:
    """A handle that takes X-LoRA's scaling pass off the model again."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def remove(self) -> None:
        self.model.before_blocks, self.model.cache_passes = None, 1


def _by_block(model: Transformer, layers: Sequence[LoRALinear]) -> list[list[LoRALinear]]:
    """The LoRA layers of each transformer block, in module order."""
    owned = [[layer for layer in layers if any(layer is m for m in block.modules())] for block in model.model.layers]
    if sum(map(len, owned)) != len(layers):
        raise MoaError("token gates need every LoRA module inside a transformer block; target the blocks' modules")
    return owned


GATES: dict[GateKind, type[TokenGates]] = {GateKind.XLORA: XLoraGates, GateKind.LORAFLOW: FlowGates}


def build_gates(spec: GateSpec) -> TokenGates:
    return GATES[spec.kind](spec)


def gate_spec(kind: str, model: Transformer, tasks: Sequence[str], **settings: Any) -> GateSpec:
    """The spec of a gate of `kind` over `model`'s LoRA modules; `settings` are X-LoRA's (PEFT's names)."""
    return GateSpec(GateKind(kind), model.config.hidden_size, model.config.num_hidden_layers,
                    len(lora_layers(model)), tuple(tasks), **settings)


def gate_info(gates: TokenGates) -> dict[str, Any]:
    """What learned.json records of a gate: its spec, its parameters and the passes per step it costs."""
    return {"gate": asdict(gates.spec), "parameters": gates.n_parameters, "passes": gates.spec.passes}


def load_gates(directory: Path) -> TokenGates:
    """The gate `moa learn-merge` wrote into `directory` (learned/{name}/): its spec from learned.json, its weights
    from coefficients.safetensors."""
    hint = "run `moa learn-merge --config ... --method NAME` again"
    raw = read_json(directory / LEARNED_INFO, hint).get("gate")
    try:
        spec = GateSpec(**raw | {"kind": GateKind(raw["kind"]), "tasks": tuple(raw["tasks"])})
        gates = build_gates(spec)
        gates.load_state_dict(load_file(directory / LEARNED_COEFFICIENTS))
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError, FileNotFoundError) as error:
        raise MoaError(f"{directory}: not a readable gate ({str(error).splitlines()[0]}); {hint}") from error
    return gates.eval()
