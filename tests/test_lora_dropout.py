"""LoRA dropout in training: nn.Dropout's mask and gradients, drawn again in backward instead of saved, so a layer
saves x (shared by q, k and v) rather than a dropped copy and a mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moa.errors import MoaError
from moa.lora import ExpertSpec, LoRALinear, inject_lora, lora_layers
from moa.model import preset
from moa.model.llama import Block, rope_cos_sin, rope_inv_freq

P = 0.3


def layer_with(dropout: float, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(torch.nn.Linear(32, 24), [ExpertSpec(4, 8.0), ExpertSpec(2, 4.0)], dropout=dropout)
    for b in layer.lora_B:
        torch.nn.init.normal_(b)
    for p in (*layer.lora_A, *layer.lora_B):
        p.requires_grad_(True)
    return layer


def grads(layer: LoRALinear, x: torch.Tensor, autocast: bool = False) -> list[torch.Tensor]:
    """The output, then the gradients of x and of every factor of a fixed loss."""
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().square().sum().backward()
    out = [y.detach(), x.grad, *(p.grad for p in (*layer.lora_A, *layer.lora_B))]
    layer.zero_grad()
    return out


def explicit(layer: LoRALinear, keep: torch.Tensor) -> LoRALinear:
    """A copy of `layer` whose down-projection reads x * keep / (1 - p) by plain autograd: the formula."""
    plain = copy.deepcopy(layer)

    def down(x: torch.Tensor, a_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.matmul((x * keep.view(x.shape) * (1 / (1 - P))).to(dtype), a_t)

    plain._down = down
    return plain


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("active", [1, [0.4, 1.5], "per-row"])
def test_gradients_equal_the_explicit_formula_with_the_same_mask(active: object, autocast: bool) -> None:
    layer = layer_with(P).train()
    layer.active = torch.tensor([1, 0, 1]) if active == "per-row" else active
    x = torch.randn(3, 5, 32)
    state = torch.get_rng_state()
    got = grads(layer, x, autocast)
    torch.set_rng_state(state)
    keep = F.dropout(torch.ones_like(x), P) != 0  # nn.Dropout's mask from the same state: it is the same mask
    expected = grads(explicit(layer, keep), x, autocast)
    assert keep.float().mean().item() == pytest.approx(1 - P, abs=0.1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def graph(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced y."""
    names, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_eval_mode_and_no_dropout_take_the_plain_path() -> None:
    x = torch.randn(2, 5, 32, requires_grad=True)
    plain, evaluated = layer_with(0.0).train()(x), layer_with(P).eval()(x)
    assert torch.equal(evaluated, plain)
    assert not any("DroppedDown" in name for name in graph(plain) | graph(evaluated))
    assert any("DroppedDown" in name for name in graph(layer_with(P).train()(x)))


def test_a_seed_reproduces_the_masks_and_checkpointing_recomputes_them() -> None:
    layer, x = layer_with(P).train(), torch.randn(2, 5, 32)
    torch.manual_seed(7)
    first = grads(layer, x)
    torch.manual_seed(7)
    again = grads(layer, x)
    torch.manual_seed(7)
    x_ = x.clone().requires_grad_(True)
    checkpoint(layer, x_, use_reentrant=False).square().sum().backward()
    recomputed = [x_.grad, *(p.grad for p in (*layer.lora_A, *layer.lora_B))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first[1:], recomputed))
    torch.manual_seed(8)
    assert not torch.equal(grads(layer, x)[0], first[0])


def saved_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd saves for backward in a forward through `module`, each storage once, the module's
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(seen.values())


def test_a_layer_saves_x_and_no_dropped_copy() -> None:
    layer = layer_with(P).train()
    layer.weight.requires_grad_(False)
    x = torch.randn(1, 256, 32, requires_grad=True)
    # x, plus rank-sized tensors (h [256, r] for B's grad); a dropped copy alone would be as large as x
    assert saved_bytes(layer, x) < x.nbytes + 256 * 6 * 4 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_block_saves_as_much_with_dropout_as_without(dtype: torch.dtype) -> None:
    """Per token, a block with all seven targets saves as much with dropout as without: q, k and v read the
    same x, saved once, not three dropped copies and masks (nor any for o, gate, up and down)."""
    config = preset("tiny")
    per_token = []
    for dropout in (0.0, 0.1):
        torch.manual_seed(0)
        block = Block(config, 0).to(dtype).requires_grad_(False)
        inject_lora(block, rank=4, dropout=dropout)
        for layer in lora_layers(block).values():
            for p in (*layer.lora_A, *layer.lora_B):
                p.data = p.data.float().requires_grad_(True)
        saved = []
        for tokens in (64, 128):
            x = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
            cos, sin = rope_cos_sin(rope_inv_freq(config), torch.arange(tokens)[None], dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                saved.append(saved_bytes(block.train(), x, cos, sin, None, None))
        per_token.append((saved[1] - saved[0]) / 64)
    assert per_token[1] == per_token[0]


def test_dropout_of_one_is_refused() -> None:
    with pytest.raises(MoaError, match=r"lora\.dropout"):
        LoRALinear(torch.nn.Linear(4, 4), [ExpertSpec(2, 4.0)], dropout=1.0)
