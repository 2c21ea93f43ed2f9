"""LoraHub against its reference (sail-sg/lorahub, lorahub/algorithm.py) on a small transformers model: the
combination of the LoRAs (get_final_weights, loaded with PEFT's set_peft_model_state_dict) and the objective
(get_score: default_get_loss on the model's own loss plus default_l1_regularization), written out here as the
reference computes them; and the search, seeded."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import LlamaForCausalLM

from moa.compose.merge import MergeSpec, merge_adapters
from moa.data.batching import Example
from moa.generate import score
from moa.lora import attach_experts, load_adapter, load_adapter_state
from moa.model.load import load_pretrained
from moa.train.merge import combined_factors, lorahub_objective, lorahub_search
from tests.conftest import hf_tiny_dir

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny HF llama and three PEFT LoRAs of it with random nonzero factors."""
    tmp = tmp_path_factory.mktemp("lorahub")
    model_dir = hf_tiny_dir(tmp, "llama")
    base = LlamaForCausalLM.from_pretrained(model_dir)
    dirs = []
    for i in range(3):
        torch.manual_seed(20 + i)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp / f"lora{i}")
        dirs.append(tmp / f"lora{i}")
    return model_dir, dirs


def examples() -> list[Example]:
    rng = np.random.default_rng(0)
    return [Example(rng.integers(3, 128, size=int(rng.integers(4, 9))).tolist(),
                    rng.integers(3, 128, size=int(rng.integers(2, 6))).tolist()) for _ in range(6)]


def reference_score(model_dir: Path, dirs: list[Path], weights: list[float], batch_size: int | None) -> float:
    """lorahub's get_score: the factors combined (get_final_weights) into the first LoRA's PeftModel, then
    default_get_loss (each batch's loss, right-padded with labels -100 on the prompt and the padding, summed over
    batches and divided by the number of examples) plus default_l1_regularization."""
    base = LlamaForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, dirs[0]).eval()
    cache = [get_peft_model_state_dict(PeftModel.from_pretrained(copy.deepcopy(base), d)) for d in dirs]
    final = {key: sum(w * state[key] for w, state in zip(weights, cache)) for key in cache[0]}
    set_peft_model_state_dict(model, final)
    rows = examples()
    size = len(rows) if batch_size is None else min(len(rows), batch_size)
    train_loss = 0.0
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        width = max(len(e) for e in batch)
        ids = torch.tensor([e.prompt_ids + e.target_ids + [0] * (width - len(e)) for e in batch])
        labels = torch.tensor([[-100] * len(e.prompt_ids) + e.target_ids + [-100] * (width - len(e)) for e in batch])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in batch])
        with torch.no_grad():
            train_loss += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    return train_loss / len(rows) + 0.05 * sum(abs(w) for w in weights) / len(weights)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_lorahub_objective_is_the_reference_get_score(setup, batch_size: int | None) -> None:
    model_dir, dirs = setup
    weights = [0.7, -0.4, 1.2]
    model, _ = load_pretrained(str(model_dir), torch.float32)
    attach_experts(model, dirs[:1])
    load_adapter_state(model, combined_factors([load_adapter(d)[1] for d in dirs], weights))
    ours = lorahub_objective(score(model.eval(), examples()), weights, batch_size)
    assert ours == pytest.approx(reference_score(model_dir, dirs, weights, batch_size), rel=1e-5)


def test_lorahub_combination_is_the_linear_merge(setup) -> None:
    """get_final_weights sums the weighted factors: moa's `linear` merge, which compose folds."""
    _, dirs = setup
    weights = (0.7, -0.4, 1.2)
    combined = combined_factors([load_adapter(d)[1] for d in dirs], weights)
    _, merged, _ = merge_adapters(MergeSpec("linear", weights), [load_adapter(d) for d in dirs], ["a", "b", "c"])
    assert combined.keys() == merged.keys()
    for key in combined:
        torch.testing.assert_close(combined[key], merged[key], rtol=1e-6, atol=1e-7)


def test_lorahub_search_stays_in_range_and_is_seeded() -> None:
    """NGOpt from 0 within [-1.5, 1.5], in the reference's 40 evaluations: on a quadratic with its minimum inside, it
    lands near it, and the same
    seed gives the same weights."""
    target = np.array([0.5, -1.0, 0.2])

    def objective(w: np.ndarray) -> float:
        return float(((w - target) ** 2).sum())

    first, again = lorahub_search(objective, 3, 40, seed=1), lorahub_search(objective, 3, 40, seed=1)
    assert first == again and all(-1.5 <= w <= 1.5 for w in first)
    np.testing.assert_allclose(first, target, atol=0.1)
