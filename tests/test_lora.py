"""LoRA layer, injection and PEFT-format I/O, checked against transformers + PEFT on a tiny LLaMA."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from moa.errors import MoaError
from moa.lora import (
    ExpertSpec,
    LoRALinear,
    activate,
    activated,
    add_expert,
    attach_adapter,
    fold_lora,
    inject_lora,
    load_adapter,
    lora_layers,
    mark_only_lora_as_trainable,
    save_adapter,
    unfold_lora,
)

FINGERPRINT = {"arch": "llama", "hidden_size": 64, "n_layers": 2, "vocab_size": 128}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        torch_dtype=torch.float32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))


def randomize_b(model: torch.nn.Module, seed: int) -> None:
    """B is zero at init, which would make every comparison trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def moa_model(base: LlamaForCausalLM, specs: list[ExpertSpec], seed: int = 2) -> LlamaForCausalLM:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    inject_lora(model, TARGETS, experts=specs)
    randomize_b(model, seed)
    return model


def saved_adapter(base: LlamaForCausalLM, tmp_path: Path, spec: ExpertSpec = ExpertSpec(4, 8.0)) -> Path:
    return save_adapter(tmp_path / "ad", moa_model(base, [spec]), 0, "tiny-llama", FINGERPRINT)


# -- interoperability with PEFT -------------------------------------------------------------------


@pytest.mark.parametrize("spec", [ExpertSpec(4, 8.0), ExpertSpec(8, 4.0, use_rslora=True)])
def test_moa_adapter_loads_in_peft(base, ids, tmp_path, spec):
    model = moa_model(base, [spec])
    save_adapter(tmp_path, model, 0, "tiny-llama", FINGERPRINT)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Unexpected keyword arguments")  # moa adds no config keys
        peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (logits(peft, ids) - logits(model, ids)).abs().max() <= 1e-5
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3  # the adapter matters


def test_peft_adapter_loads_in_moa(base, ids, tmp_path):
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_b(peft, 3)
    peft.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    assert attach_adapter(model, tmp_path, FINGERPRINT) == 0  # PEFT adapters carry no fingerprint
    assert len(lora_layers(model)) == 6
    assert (logits(peft, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_weighted_sum_equals_peft_multi_adapter(base, ids, tmp_path):
    specs = [ExpertSpec(2, 4.0), ExpertSpec(6, 12.0, use_rslora=True)]
    source = moa_model(base, specs)
    for i in range(2):
        save_adapter(tmp_path / f"a{i}", source, i)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a0", adapter_name="a0")
    peft.load_adapter(tmp_path / "a1", adapter_name="a1")
    peft.base_model.set_adapter(["a0", "a1"])
    model = copy.deepcopy(base)
    assert [attach_adapter(model, tmp_path / f"a{i}") for i in range(2)] == [0, 1]
    activate(model, [1.0, 1.0])
    assert (logits(peft.eval(), ids) - logits(model, ids)).abs().max() <= 1e-5


# -- routing modes --------------------------------------------------------------------------------


def test_per_sequence_route_equals_each_sequence_alone(base, ids):
    model = moa_model(base, [ExpertSpec(2, 4.0), ExpertSpec(4, 8.0, use_rslora=True), ExpertSpec(8, 8.0)])
    route = torch.tensor([2, 0, 1])
    activate(model, route)
    mixed = logits(model, ids)
    for row, expert in enumerate(route.tolist()):
        with activated(model, expert):
            alone = logits(model, ids[row : row + 1])
        assert (mixed[row] - alone[0]).abs().max() <= 1e-5


def test_weighted_route_matches_definition():
    # Weights != 1 have no PEFT counterpart: compare with y = W0 x + b + sum_i w_i s_i B_i A_i x.
    torch.manual_seed(4)
    specs = [ExpertSpec(2, 4.0), ExpertSpec(5, 10.0, use_rslora=True), ExpertSpec(3, 1.0)]
    layer = LoRALinear(torch.nn.Linear(16, 12), specs)
    randomize_b(layer, 4)
    x = torch.randn(2, 5, 16)
    w = torch.tensor([[0.2, -1.5, 0.7], [1.0, 0.0, 0.3]])
    deltas = [s.scaling * b @ a for s, a, b in zip(specs, layer.lora_A, layer.lora_B)]
    with torch.no_grad():
        for row in range(2):
            dw = sum(wi * d for wi, d in zip(w[row], deltas))
            expected = torch.nn.functional.linear(x[row], layer.weight + dw, layer.bias)
            layer.active = w[row]
            assert (layer(x[row : row + 1])[0] - expected).abs().max() <= 1e-5
        layer.active = w
        per_seq = layer(x)
        layer.active = w[1]
        assert (per_seq[1] - layer(x[1:])[0]).abs().max() <= 1e-5


def test_fold_equals_unfolded_and_unfold_restores(base, ids):
    model = moa_model(base, [ExpertSpec(2, 4.0), ExpertSpec(4, 8.0)])
    weight = model.model.layers[1].mlp.down_proj.weight.clone()
    for route in (1, [0.5, 2.0]):
        activate(model, route)
        routed = logits(model, ids)
        fold_lora(model, route)
        assert (logits(model, ids) - routed).abs().max() <= 1e-5
        with pytest.raises(MoaError, match="unfold"):
            add_expert(model, ExpertSpec(2, 2.0))
        unfold_lora(model)
        torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, weight, atol=1e-6, rtol=0)
    activate(model, None)
    assert (logits(model, ids) - logits(base, ids)).abs().max() <= 1e-5  # W0 restored up to rounding


def test_stacked_cache_follows_in_place_updates_and_grads_flow(base, ids):
    model = moa_model(base, [ExpertSpec(2, 4.0), ExpertSpec(4, 8.0)])
    activate(model, torch.tensor([1, 0, 1]))
    before = logits(model, ids)
    randomize_b(model, 9)  # in-place under no_grad: the cached stack must be rebuilt
    assert (logits(model, ids) - before).abs().max() > 1e-4
    mark_only_lora_as_trainable(model)
    model(input_ids=ids).logits.square().mean().backward()
    layer = lora_layers(model)["model.layers.0.self_attn.v_proj"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (*layer.lora_A, *layer.lora_B))


# -- training setup and base checkpoints ------------------------------------------------------------


def test_only_lora_trainable_and_base_keys_unchanged(base):
    model = copy.deepcopy(base)
    names = inject_lora(model, rank=4, alpha=8.0)
    assert len(names) == 14 and "lm_head" not in names
    mark_only_lora_as_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    base_keys = set(base.state_dict())
    assert {k for k in model.state_dict() if ".lora_" not in k} == base_keys
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".lora_" in k for k in result.missing_keys)


def test_unknown_target_modules_lists_available(base):
    with pytest.raises(MoaError, match=r"available: \[.*'q_proj'"):
        inject_lora(copy.deepcopy(base), ["query"])


# -- bad input ----------------------------------------------------------------------------------------


def test_missing_files(base, tmp_path):
    with pytest.raises(MoaError, match="adapter_config.json: not found"):
        load_adapter(tmp_path)
    path = saved_adapter(base, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(MoaError, match="adapter_model.safetensors: not found"):
        load_adapter(path)


def test_corrupt_safetensors(base, tmp_path):
    path = saved_adapter(base, tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\x13\x37garbage" * 10)
    with pytest.raises(MoaError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(path)


def rewrite(path: Path, edit) -> None:
    file = path / "adapter_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)


def test_wrong_shape(base, tmp_path):
    path = saved_adapter(base, tmp_path)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    rewrite(path, lambda s: s.update({key: torch.zeros(4, 65)}))
    with pytest.raises(MoaError, match=rf"{key} has shape \[4, 65\], expected \[4, 128\]"):
        attach_adapter(copy.deepcopy(base), path)


def test_extra_and_missing_keys(base, tmp_path):
    path = saved_adapter(base, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    rewrite(path, lambda s: s.pop(key))
    with pytest.raises(MoaError, match=f"missing tensor {key}"):
        attach_adapter(copy.deepcopy(base), path)
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"  # k_proj is not a target
    rewrite(path, lambda s: s.update({key: torch.zeros(64, 4), extra: torch.zeros(4, 64)}))
    with pytest.raises(MoaError, match=f"unexpected tensor {extra}"):
        attach_adapter(copy.deepcopy(base), path)
    rewrite(path, lambda s: s.update({"lm_head.weight": torch.zeros(1)}))
    with pytest.raises(MoaError, match="adapter_model.safetensors: unexpected tensor lm_head.weight"):
        load_adapter(path)


def test_fingerprint_mismatch(base, tmp_path):
    path = saved_adapter(base, tmp_path)
    assert load_adapter(path)[0].arch_fingerprint == FINGERPRINT
    with pytest.raises(MoaError, match="adapter_model.safetensors: adapter was saved for hidden_size=64"):
        attach_adapter(copy.deepcopy(base), path, {**FINGERPRINT, "hidden_size": 96})


@pytest.mark.parametrize(
    ("edit", "message"),
    [({"peft_type": "IA3"}, "peft_type is 'IA3'"), ({"rank_pattern": {"q_proj": 2}}, "rank_pattern=")],
)
def test_unsupported_config(base, tmp_path, edit, message):
    path = saved_adapter(base, tmp_path)
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    with pytest.raises(MoaError, match=f"adapter_config.json: {message}"):
        load_adapter(path)


def test_moa_model_adapter_roundtrips_with_peft(tiny, tmp_path: Path) -> None:
    """The same check on moa's own Transformer: its adapter loads in transformers+PEFT and back."""
    from moa.model import save_hf_dir

    base_model, tokenizer = tiny
    base_dir = save_hf_dir(base_model, tokenizer, tmp_path / "base")
    ours = copy.deepcopy(base_model)
    inject_lora(ours, rank=4, alpha=8)
    randomize_b(ours, seed=5)
    fingerprint = ours.config.fingerprint()
    save_adapter(tmp_path / "adapter", ours, base_model_name_or_path=str(base_dir), arch_fingerprint=fingerprint)
    ids = torch.randint(0, 300, (2, 9))
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = reference(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= 1e-5
        reloaded = copy.deepcopy(base_model)
        attach_adapter(reloaded, tmp_path / "adapter", arch_fingerprint=fingerprint)
        assert (reloaded(ids) - expected).abs().max().item() <= 1e-5


def test_adapter_for_another_base_is_refused(tiny, tmp_path: Path) -> None:
    from moa.model import preset

    model = copy.deepcopy(tiny[0])
    inject_lora(model, rank=2)
    save_adapter(tmp_path / "a", model, arch_fingerprint=preset("smollm2-135m").fingerprint())
    with pytest.raises(MoaError, match=r"adapter_model\.safetensors: adapter was saved for head_dim=64 but the base model has head_dim=16"):
        attach_adapter(copy.deepcopy(tiny[0]), tmp_path / "a", arch_fingerprint=model.config.fingerprint())


def test_injected_layers_follow_the_model_mode(tiny) -> None:
    model = copy.deepcopy(tiny[0]).eval()
    inject_lora(model, rank=2, dropout=0.5)
    assert not any(layer.training for layer in lora_layers(model).values())


def test_component_norms_are_each_experts_weighted_update_norm() -> None:
    """||w_i s_i B_i A_i x|| of every expert at every token, from rank-r projections, equals the dense
    update's norm."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 10), [ExpertSpec(2, 4.0), ExpertSpec(3, 1.5, use_rslora=True)])
    for b in layer.lora_B:
        torch.nn.init.normal_(b)
    x, weights = torch.randn(2, 5, 12), torch.tensor([0.7, -1.3])
    norms = layer.component_norms(x, weights)
    for i, (a, b, spec) in enumerate(zip(layer.lora_A, layer.lora_B, layer.specs)):
        dense = weights[i] * spec.scaling * (b @ a)
        torch.testing.assert_close(norms[:, i], (x.reshape(-1, 12) @ dense.T).norm(dim=-1), atol=1e-5, rtol=1e-5)
