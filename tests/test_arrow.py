"""Arrow routing (Ostapenko et al. 2024) in moa's LoRA layer, checked against PEFT's `create_arrow_model` on the
same adapters, against a dense SVD, and for per-token routing inside packed rows."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, create_arrow_model
from torch import nn
from transformers import LlamaForCausalLM

from moa.errors import MoaError
from moa.lora import (
    AdapterConfig,
    Arrow,
    ExpertSpec,
    LoRALinear,
    activate,
    attach_experts,
    lora_layers,
    matches_target,
    peft_key,
    write_adapter,
)
from moa.model import Documents, load_pretrained
from tests.conftest import hf_tiny_dir

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # in 64 and 96, out 32, 64 and 96
RANK, ALPHA, N = 4, 8, 3
SPECTRUM = (1.0, 0.3, 0.25, 0.2)  # of each module's B A: a gap of 1/0.3 between the top two singular values


def gapped_factors(out: int, inp: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] whose product has the singular values SPECTRUM / 2 and random singular vectors;
    a random mix (condition number 4) between the factors keeps them from being the SVD's own factors."""
    u = torch.linalg.qr(torch.randn(out, RANK, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(inp, RANK, generator=gen)).Q
    mix = torch.linalg.qr(torch.randn(RANK, RANK, generator=gen)).Q * torch.linspace(0.5, 2.0, RANK)
    core = torch.tensor(SPECTRUM)[:, None] / 2 * v.T  # diag(sigma) V^T
    return torch.linalg.solve(mix, core), u @ mix  # B A = U mix mix^-1 diag(sigma) V^T


def write_adapters(model_dir: Path, out: Path) -> list[Path]:
    """N PEFT-format adapters on the HF model's TARGETS, each with gapped random factors."""
    hf = LlamaForCausalLM.from_pretrained(model_dir)
    linears = {n: m for n, m in hf.named_modules() if isinstance(m, nn.Linear) and matches_target(n, TARGETS)}
    dirs = []
    for i in range(N):
        gen, state = torch.Generator().manual_seed(10 + i), {}
        for name, linear in linears.items():
            a, b = gapped_factors(linear.out_features, linear.in_features, gen)
            state |= {peft_key(name, "A"): a.contiguous(), peft_key(name, "B"): b.contiguous()}
        dirs.append(write_adapter(out / f"task{i}", AdapterConfig(RANK, ALPHA, TARGETS), state))
    return dirs


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("arrow")
    model_dir = hf_tiny_dir(tmp, "llama")
    return model_dir, write_adapters(model_dir, tmp / "adapters")


def moa_arrow(model_dir: Path, adapters: list[Path], arrow: Arrow | None) -> nn.Module:
    model, _ = load_pretrained(model_dir)
    attach_experts(model, adapters)
    activate(model, arrow)
    return model.eval()


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (2, 0.5), (3, 2.0)])
def test_arrow_equals_peft_create_arrow_model(library, top_k: int, temperature: float) -> None:
    """The same three adapters served by PEFT's Arrow and by moa's, logits within 1e-5.

    PEFT's prototype is 15 steps of power iteration on A^T B^T B A from a random start, moa's the exact top
    right singular vector. They agree to float precision only where the iteration has converged: every
    module's B A here has singular values 1 : 0.3 : ..., so 15 steps shrink the error by 0.09^15 ~ 1e-16,
    and the test first checks that PEFT's prototypes are moa's (up to sign) so that the logits compare the
    routing arithmetic (|x . p|, top-k, softmax over the temperature, scaled expert sum), not two estimates.
    """
    model_dir, adapters = library
    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    peft = create_arrow_model(base, [str(p) for p in adapters], config).eval()
    ours = moa_arrow(model_dir, adapters, Arrow(top_k, temperature))
    with torch.no_grad():
        expected = peft(input_ids=IDS).logits  # builds PEFT's prototypes
        got = ours(IDS)
    layers = lora_layers(ours)
    for name, module in peft.named_modules():
        if hasattr(module, "lora_arrow"):
            theirs, mine = module.lora_arrow["arrow_router"].prototypes, layers[name.removeprefix("base_model.model.")]
            signs = torch.sign((theirs * mine.prototypes()).sum(-1, keepdim=True))
            torch.testing.assert_close(theirs * signs, mine.prototypes(), atol=1e-6, rtol=0)
    assert (got - expected).abs().max() <= 1e-5
    plain = moa_arrow(model_dir, adapters, None)
    with torch.no_grad():
        assert (got - plain(IDS)).abs().max() > 1e-2  # the adapters matter


def test_top_k_changes_the_routing(library) -> None:
    """Keeping one, two or all three experts gives three different models (the comparison above is not blind
    to top_k)."""
    model_dir, adapters = library
    model = moa_arrow(model_dir, adapters, Arrow(1))
    outputs = []
    with torch.no_grad():
        for k in (1, 2, 3):
            activate(model, Arrow(k))
            outputs.append(model(IDS))
    assert min((outputs[i] - outputs[j]).abs().max() for i, j in ((0, 1), (1, 2), (0, 2))) > 1e-3


def layer_with_experts(specs: list[ExpertSpec], dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(4)
    layer = LoRALinear(nn.Linear(16, 12), specs, dropout)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def test_prototypes_are_the_top_right_singular_vectors_of_the_dense_updates() -> None:
    specs = [ExpertSpec(2, 4.0), ExpertSpec(5, 10.0, use_rslora=True), ExpertSpec(3, 1.0), ExpertSpec(2, 2.0)]
    layer = layer_with_experts(specs)
    with torch.no_grad():
        layer.lora_B[3].zero_()  # an expert that is zero here (a module its adapter does not target)
        prototypes = layer.prototypes()
        for spec, a, b, p in zip(specs[:3], layer.lora_A, layer.lora_B, prototypes):
            top = torch.linalg.svd(spec.scaling * b.double() @ a.double()).Vh[0].float()
            torch.testing.assert_close(p * torch.sign(p @ top), top, atol=1e-6, rtol=0)
        assert prototypes.shape == (4, 16) and not prototypes[3].any()  # scores 0: kept only when top_k forces it
        layer.lora_B[0].copy_(torch.randn_like(layer.lora_B[0]))  # in place: the cached prototypes are stale
        top = torch.linalg.svd(layer.lora_B[0] @ layer.lora_A[0]).Vh[0]
        assert abs(float(layer.prototypes()[0] @ top)) == pytest.approx(1.0, abs=1e-5)


def test_arrow_layer_matches_its_definition() -> None:
    """y = W0 x + b + sum_i c_i s_i B_i A_i x with c = softmax(|x . p| / T) over the top-k experts, per token."""
    specs = [ExpertSpec(2, 4.0), ExpertSpec(5, 10.0, use_rslora=True), ExpertSpec(3, 1.0)]
    layer = layer_with_experts(specs)
    x = torch.randn(2, 5, 16)
    layer.active = Arrow(2, 0.7)
    with torch.no_grad():
        y = layer(x)
        p = layer.prototypes()
        for row, t in itertools.product(range(2), range(5)):
            scores = (x[row, t] @ p.T).abs()
            kept = scores.topk(2).indices
            c = torch.zeros(3)
            c[kept] = torch.softmax(scores[kept] / 0.7, 0)
            dw = sum(ci * s.scaling * b @ a for ci, s, a, b in zip(c, specs, layer.lora_A, layer.lora_B))
            expected = nn.functional.linear(x[row, t], layer.weight + dw, layer.bias)
            torch.testing.assert_close(y[row, t], expected, atol=1e-5, rtol=0)


def test_dropout_applies_to_the_update_in_training_only() -> None:
    layer = layer_with_experts([ExpertSpec(2, 4.0), ExpertSpec(3, 6.0)], dropout=0.5)
    layer.active = Arrow(2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        base = nn.functional.linear(x, layer.weight, layer.bias)
        update = layer.eval()(x) - base  # eval: no dropout
        dropped = layer.train()(x) - base
    assert update.abs().min() > 0
    kept = dropped != 0  # each element of the update is dropped or scaled by 1 / (1 - p), as PEFT's Arrow
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], 2 * update[kept], atol=1e-5, rtol=1e-5)


def test_per_token_routing_in_a_packed_row_equals_each_document_alone(library) -> None:
    model_dir, adapters = library
    model = moa_arrow(model_dir, adapters, Arrow(2, 0.5))
    docs = [IDS[0, :7], IDS[1, :4], IDS[1]]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], positions=torch.cat([torch.arange(len(d)) for d in docs])[None],
                       attn_mask=Documents(tuple(len(d) for d in docs)))[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arrow", "message"), [
    (Arrow(0), r"Arrow top_k=0 is out of range: the model has 3 LoRA experts; choose 1\.\.3"),
    (Arrow(4), r"top_k=4 is out of range"),
    (Arrow(2, 0.0), r"Arrow temperature=0\.0 must be > 0"),
    (Arrow(2, math.nan), r"Arrow temperature=nan must be > 0"),
])
def test_bad_arrow_settings_are_one_line(arrow: Arrow, message: str) -> None:
    layer = layer_with_experts([ExpertSpec(2, 4.0)] * 3)
    with pytest.raises(MoaError, match=message):
        layer.active = arrow


def test_arrow_cannot_be_folded() -> None:
    layer = layer_with_experts([ExpertSpec(2, 4.0)] * 2)
    with pytest.raises(MoaError, match="Arrow's per-token routing cannot be folded"):
        layer.fold(Arrow(1))
