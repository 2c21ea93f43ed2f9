"""fp32 LoRA factors on bf16 weights without autocast (training.precision fp32, model.dtype bfloat16) as PEFT runs
them, and folding into bf16 weights rounded once."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from moa.data.prepare import prepare_task
from moa.experiment import load_config
from moa.lora import Arrow, ExpertSpec, LoRALinear, inject_lora, save_adapter
from moa.model import save_hf_dir
from moa.model.tokenizer import byte_tokenizer
from moa.train.lora import train_lora, train_lora_factors_in_fp32
from tests.test_lora import randomize_b

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


def test_fp32_factors_on_bf16_weights_match_peft(tiny, tmp_path: Path) -> None:
    """Forward and backward without autocast: the logits are PEFT's, the LoRA gradients fp32 and PEFT's up to
    the bf16 backward through the base."""
    base, tokenizer = tiny
    base_dir = save_hf_dir(base, tokenizer, tmp_path / "base")
    ours = copy.deepcopy(base).to(BF16)
    inject_lora(ours, rank=4, alpha=8)
    train_lora_factors_in_fp32(ours)
    randomize_b(ours, 5)
    save_adapter(tmp_path / "adapter", ours, base_model_name_or_path=str(base_dir))
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=BF16),
                                          tmp_path / "adapter", is_trainable=True)
    ids = torch.randint(0, 300, (2, 9))
    got, expected = ours.train()(ids), reference.train()(ids).logits
    assert got.dtype == BF16
    assert (got.float() - expected.float()).abs().max() <= 2 ** -8  # a bf16 ulp at these logits (~0.6)
    got.float().square().mean().backward()
    expected.float().square().mean().backward()
    ref_grads = {n.removeprefix("base_model.model.").replace(".default.weight", ".0"): p.grad
                 for n, p in reference.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max() <= 2e-2 * ref_grads[name].abs().max(), name


@pytest.mark.parametrize("active", [1, [0.5, -1.0, 2.0], [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], [2, 0],
                                    [[0, 1, 2, 2, 1], [1, 1, 0, 0, 2]], Arrow(2, 0.5)],
                         ids=["expert", "weights", "row-weights", "per-row", "per-token", "arrow"])
def test_every_path_adds_the_fp32_update_and_rounds_once(active: object) -> None:
    torch.manual_seed(0)
    specs = [ExpertSpec(2, 4.0), ExpertSpec(4, 8.0, use_rslora=True), ExpertSpec(3, 3.0)]
    layer = LoRALinear(torch.nn.Linear(16, 12).to(BF16), specs).train()
    for a, b in zip(layer.lora_A, layer.lora_B):
        a.data, b.data = a.data.float().requires_grad_(True), torch.randn(b.shape).requires_grad_(True)
    layer.active = active if isinstance(active, (int, Arrow)) else torch.tensor(active)
    x = torch.randn(2, 5, 16).to(BF16).requires_grad_(True)
    y = layer(x)
    assert y.dtype == BF16
    y.float().sum().backward()
    assert x.grad.dtype == BF16 and all(p.grad.dtype == torch.float32 for p in (*layer.lora_A, *layer.lora_B))
    with torch.no_grad():
        reference = LoRALinear(torch.nn.Linear(16, 12), specs)  # the same layer, all in fp32
        reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        reference.active = layer.active
        update = reference(x.float()) - F.linear(x.float(), reference.weight, reference.bias)
        expected = (F.linear(x, layer.weight, layer.bias).float() + update).to(BF16)
    torch.testing.assert_close(y, expected, atol=0, rtol=1e-2)  # rounding once: at most one bf16 ulp apart


def test_training_in_fp32_on_bf16_weights(tmp_path: Path) -> None:
    """training.precision fp32 (no autocast) on model.dtype bfloat16, with dropout: a few steps run."""
    raw = yaml.safe_load((ROOT / "config/smoke.yaml").read_text()) | {"results_dir": str(tmp_path / "results")}
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "smoke.yaml", [
        "training.steps=3", "training.batch_size=2", "training.warmup_steps=1", "training.eval_every=3",
        "training.checkpoint_every=100", "lora.dropout=0.1", "model.dtype=bfloat16", "training.precision=fp32"])
    prepare_task(config, "sentiment", byte_tokenizer())
    out = train_lora(config, "sentiment").path
    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log.step) == [1, 2, 3] and log.loss.notna().all() and log.loss.lt(1e3).all()
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}


def test_fold_into_bf16_weights_rounds_once() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 48).to(BF16), [ExpertSpec(4, 8.0), ExpertSpec(2, 2.0)])
    for a, b in zip(layer.lora_A, layer.lora_B):
        a.data, b.data = a.data.float(), torch.randn(b.shape) * 1e-2  # an update below W's bf16 ulp, partly
    weight, weights = layer.weight.clone(), torch.tensor([0.7, 1.3])
    delta = layer.delta(weights)
    layer.fold(weights)
    assert torch.equal(layer.weight, (weight.float() + delta).to(BF16))
    assert not torch.equal(layer.weight, weight + delta.to(BF16))  # what rounding the delta first gave
    folded = layer.weight.clone()
    layer.unfold()
    assert torch.equal(layer.weight, (folded.float() - delta).to(BF16))
