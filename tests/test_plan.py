"""The memory plan: against peaks measured on CPU, the pre-flight's one line, and the paper-scale configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moa.cli import main
from moa.compose.merge import Factors, MergeSpec, delta_weight, dense_merge
from moa.data.batching import Example, lm_loss, pack
from moa.errors import MoaError
from moa.experiment import load_config
from moa.lora import inject_lora, mark_only_lora_as_trainable
from moa.lora.inject import DEFAULT_TARGETS
from moa.memory import PeakMemory
from moa.model.config import ModelConfig
from moa.model.llama import Transformer
from moa.plan import (
    GiB,
    LoraShape,
    Setting,
    Training,
    dense_merge_bytes,
    preflight,
    training_memory,
    with_checkpointing,
)
from moa.train.trainer import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2)


def measured_step_peak(dtype: torch.dtype, autocast: bool, checkpointing: bool, rows: int, seq: int,
                       target: int) -> tuple[int, int]:
    """(peak bytes of two AdamW steps of a LoRA on SMALL, the batch's loss tokens): weights and LoRA factors,
    plus every tensor alive at once during the steps."""
    torch.manual_seed(0)
    model = Transformer(SMALL).to(dtype)
    inject_lora(model, DEFAULT_TARGETS, rank=8, dropout=0.05)
    mark_only_lora_as_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.gradient_checkpointing = checkpointing
    [batch] = pack([Example([5] * (seq - target - 1), [6] * target + [2]) for _ in range(rows)], seq, rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with PeakMemory() as memory:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = lm_loss(model, batch, "sum")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    resident = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return memory.peak + resident, batch.loss_tokens


@pytest.mark.parametrize("dtype,autocast,checkpointing,rows,seq,target", [
    (torch.float32, False, False, 4, 512, 64),
    (torch.float32, True, False, 4, 512, 64),  # fp32 weights under bf16 autocast: its weight casts count
    (torch.bfloat16, True, False, 2, 1024, 256),
    (torch.float32, False, True, 4, 512, 64),
    (torch.bfloat16, True, True, 8, 512, 16),
])
def test_the_training_plan_is_within_15_percent_of_the_measured_peak(dtype, autocast, checkpointing, rows, seq,
                                                                      target) -> None:
    peak, loss_tokens = measured_step_peak(dtype, autocast, checkpointing, rows, seq, target)
    plan = training_memory(SMALL, LoraShape(DEFAULT_TARGETS, 8, 0.05), dtype,
                           Training(rows * seq, loss_tokens, checkpointing, torch.bfloat16 if autocast else None))
    assert 0.85 <= plan.device / peak <= 1.15, (plan, peak)


def test_checkpointing_keeps_a_fraction_of_the_activations() -> None:
    lora = LoraShape(DEFAULT_TARGETS, 8, 0.05)
    full, kept = (training_memory(SMALL, lora, torch.bfloat16, Training(4096, 512, c, torch.bfloat16))
                  for c in (False, True))
    assert kept.activations < full.activations / 2 and kept.weights == full.weights


@pytest.fixture
def smoke(tmp_path: Path) -> dict:
    return load_config(ROOT / "config/smoke.yaml", [f"results_dir={tmp_path}", "training.batch_size=64",
                                                   "training.seq_len=4096"])


def test_a_job_that_does_not_fit_names_the_micro_batch_that_does(smoke: dict, monkeypatch) -> None:
    """Planned against a small GPU: train-lora stops before loading anything, naming the setting that fits."""
    monkeypatch.setattr(Setting, "here", classmethod(lambda cls: cls(300 * 2**20, 64 * GiB)))
    with pytest.raises(MoaError, match=r"train_lora at micro-batch 64 x 4096, checkpointing needs .* GiB on the GPU "
                                       r".*; set training\.micro_batch_size: \d+ and "
                                       r"training\.gradient_checkpointing: true"):
        preflight(smoke, "train_lora")
    monkeypatch.setattr(Setting, "here", classmethod(lambda cls: cls(1 * 2**20, 64 * GiB)))
    with pytest.raises(MoaError, match=r"train_lora at .* needs .* GiB on the GPU .*even micro-batch 1"):
        preflight(smoke, "train_lora")


def test_auto_checkpointing_turns_on_only_when_needed(smoke: dict, monkeypatch) -> None:
    from moa.plan import shapes_of

    settings = TrainSettings.from_config(smoke["training"])
    assert settings.gradient_checkpointing == "auto"
    monkeypatch.setattr(Setting, "here", classmethod(lambda cls: cls(None, 64 * GiB)))
    assert with_checkpointing(settings, smoke, shapes_of(smoke), "train_lora").gradient_checkpointing is False
    monkeypatch.setattr(Setting, "here", classmethod(lambda cls: cls(30 * 2**20, 64 * GiB)))
    assert with_checkpointing(settings, smoke, shapes_of(smoke), "train_lora").gradient_checkpointing is True


@pytest.mark.parametrize("config,shapes", [("paper.yaml", "mistral-7b"), ("thesis.yaml", "qwen2-1.5b")])
def test_the_paper_scale_configs_fit_an_80gb_gpu(config: str, shapes: str, capsys) -> None:
    assert main(["plan", "--config", str(ROOT / "config" / config), "--model-config", shapes,
                 "--gpu-memory", "80GB", "--host-memory", "64GB"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows and all("  yes  " in row for row in rows)
    assert any(row.startswith("train_lora") and "  GPU  " in row for row in rows)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_the_dense_merge_estimate_bounds_its_measured_peak(smoke: dict, method: str) -> None:
    """An untruncated element-wise merge of SMALL's largest module from rank-8 adapters of every task: the planned
    host bytes hold the measured peak of forming it, within a factor 2; a truncated merge or a sum plans none."""
    n = len(smoke["tasks"])
    config = smoke | {"methods": {"m": {"method": method}, "k8": {"method": method, "k": 8}, "ta": None}}
    planned = dense_merge_bytes(config, SMALL, "m")
    assert dense_merge_bytes(config, SMALL, "k8") == dense_merge_bytes(config, SMALL, "ta") == 0
    gen = torch.Generator().manual_seed(0)
    factors = [Factors(torch.randn(8, SMALL.hidden_size, generator=gen),
                       torch.randn(SMALL.intermediate_size, 8, generator=gen), 2.0) for _ in range(n)]
    with PeakMemory() as memory:
        dense_merge(MergeSpec(method), [delta_weight(f) for f in factors], [1.0] * n, 0)
    assert memory.peak <= planned <= 2 * memory.peak


def test_the_harness_plan_counts_its_requests_and_names_what_fits(smoke: dict, monkeypatch) -> None:
    """The lm-eval job's KV cache holds lm_eval.batch_size requests of lm_eval.max_length tokens (the harness's
    contexts, not the config's data limits); where it does not fit, one line names the two settings."""
    from moa.plan import harness_plan, job_plan, plan_config, shapes_of

    shapes = shapes_of(smoke)
    settings = {"tasks": ["mmlu"], "num_fewshot": None, "limit": None, "batch_size": 8, "include_path": None,
                "task_map": None}
    plans = [harness_plan(smoke | {"evaluation": smoke["evaluation"] | {"lm_eval": settings | {"max_length": n}}},
                          shapes, "oracle", False) for n in (256, 512)]
    assert plans[1].memory.kv_cache == 2 * plans[0].memory.kv_cache > 0 and plans[0].job == "lm_eval:oracle"
    harnessed = smoke | {"evaluation": smoke["evaluation"] | {"lm_eval": settings | {"max_length": 512}}}
    where = Setting(None, 64 * GiB)
    assert [p.job for p in plan_config(harnessed, shapes, where) if p.job.startswith("lm_eval")] == [
        f"lm_eval:{m}" for m in harnessed["methods"]]
    assert job_plan(harnessed, shapes, "lm_eval", where, "moa") is not None
    monkeypatch.setattr(Setting, "here", classmethod(lambda cls: cls(plans[0].memory.device, 64 * GiB)))
    with pytest.raises(MoaError, match=r"lm_eval:oracle at 8 sequences x 512 tokens needs .* lower "
                                       r"evaluation\.lm_eval\.batch_size or evaluation\.lm_eval\.max_length"):
        preflight(harnessed, "lm_eval", "oracle")


def test_xlora_plans_a_second_kv_cache_for_its_scaling_pass(smoke: dict) -> None:
    """X-LoRA's scaling pass keeps its own keys and values (Transformer.cache_passes 2): twice the KV cache of any
    other composition served the same way; LoRA-Flow's gates add none."""
    from moa.gates import FlowGates, XLoraGates, gate_spec
    from moa.model import DTYPES, random_model
    from moa.model.llama import SlotCache
    from moa.plan import serving_plan, shapes_of
    from tests.conftest import with_random_experts

    shapes = shapes_of(smoke)
    config = smoke | {"methods": {"xlora": None, "loraflow": None, "oracle": None}}
    kv = {m: serving_plan(config, shapes, m, False, "evaluate", 8, 300, 2048, 8).memory.kv_cache
          for m in ("xlora", "loraflow", "oracle")}
    assert kv["xlora"] == 2 * kv["oracle"] == 2 * kv["loraflow"] > 0
    model = with_random_experts(random_model("tiny")[0], seed=0)
    dtype = DTYPES[smoke["evaluation"]["dtype"]]
    for gates, method in ((XLoraGates(gate_spec("xlora", model, "abc")), "xlora"),
                          (FlowGates(gate_spec("loraflow", model, "abc")), "loraflow")):
        gates.attach(model)  # the engine sizes its cache by the model's passes
        cache = SlotCache(model.config, 8, 300, dtype=dtype, passes=model.cache_passes)
        assert 2 * cache.k.numel() * cache.k.element_size() == kv[method]
        gates.detach()
