"""`moa export`: a merge as a merged HF directory transformers loads (its logits: moa's folded composition's) and as
a PEFT adapter; a routed composition as its task LoRAs, its routers and a README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moa.cli import main
from moa.compose.composition import load_composition
from moa.experiment import load_config
from moa.layout import ExperimentPaths
from tests.conftest import TINY_FAST, composed_experiment

TASKS = ["qa", "sentiment"]
FAST = [*TINY_FAST, "evaluation.dtype=float32", "router.steps=5"]
METHODS = {"oracle": None, "moa": None, "task_arithmetic": None, "ties": None}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return composed_experiment(tmp_path_factory.mktemp("export"), TASKS, METHODS, FAST)


def export(experiment: Path, method: str, out: Path) -> Path:
    assert main(["export", "--config", str(experiment), *(x for s in FAST for x in ("--set", s)),
                 "--method", method, str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # an adapter; an untruncated dense update
def test_a_merge_exports_as_a_merged_directory_transformers_loads(experiment: Path, tmp_path: Path,
                                                                  method: str) -> None:
    out = export(experiment, method, tmp_path / "out")
    config = load_config(experiment, FAST)
    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    with torch.no_grad():
        ours = load_composition(config, method).model(ids)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", torch_dtype=torch.float32).eval()
        torch.testing.assert_close(merged(ids).logits, ours, atol=2e-5, rtol=1e-4)
        if method == "task_arithmetic":
            base = AutoModelForCausalLM.from_pretrained(ExperimentPaths.of(config).model, torch_dtype=torch.float32)
            adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
            torch.testing.assert_close(adapted(ids).logits, ours, atol=2e-5, rtol=1e-4)
    assert (out / "adapter").is_dir() == (method == "task_arithmetic")
    assert json.loads((out / "composition.json").read_text())["name"] == method


def test_moa_exports_its_experts_routers_and_how_they_fit(experiment: Path, tmp_path: Path) -> None:
    out = export(experiment, "moa", tmp_path / "moa")
    assert sorted(p.name for p in (out / "experts").iterdir()) == TASKS
    assert all((out / "experts" / t / "adapter_model.safetensors").is_file() for t in TASKS)
    assert sorted(p.name for p in (out / "router").iterdir()) == ["router_config.json", "routers.safetensors"]
    readme = (out / "README.md").read_text()
    assert "learned router" in readme and "strategy (`last`" in readme and "qa, sentiment" in readme
    oracle = export(experiment, "oracle", tmp_path / "oracle")
    assert "set_adapter" in (oracle / "README.md").read_text() and not (oracle / "router").exists()
