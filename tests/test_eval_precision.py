"""Each evaluation records the dtypes its composition ran in (info.json, logged with the run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moa.compose.composition import compose
from moa.config import method_params
from moa.data.prepare import prepare_task
from moa.evaluate import evaluate, precision
from moa.experiment import load_config
from moa.layout import MIXED, ExperimentPaths
from moa.lora import inject_lora, save_adapter
from moa.model import load_pretrained
from moa.model.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["evaluation.limit=2", "evaluation.max_new_tokens=2", "model.dtype=bfloat16", "evaluation.dtype=float32"]


@pytest.fixture
def smoke(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config |= {"results_dir": str(tmp_path / "results"), "tracking": {"enabled": False}}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("method", "fold", "folded"), [("base", True, False), ("oracle", True, False),
                                                         ("arrow", True, False), ("mixed", True, True),
                                                         ("ties", True, True), ("ties", False, False)])
def test_precision_names_the_fold_only_where_an_adapter_is_folded(smoke: Path, method: str, fold: bool,
                                                                  folded: bool) -> None:
    config = load_config(smoke, [*QUICK, f"evaluation.fold={str(fold).lower()}"])
    expected = {"weights": "bfloat16", "decode": "float32"} | ({"fold": "float32"} if folded else {})
    assert precision(config, method_params(config, method)) == expected


def test_info_json_records_the_precision_of_a_folded_adapter(smoke: Path) -> None:
    config = load_config(smoke, QUICK)
    prepare_task(config, "sentiment", byte_tokenizer())
    model, _ = load_pretrained("random:tiny")
    inject_lora(model, rank=2)
    save_adapter(ExperimentPaths.of(config).adapter(MIXED), model, arch_fingerprint=model.config.fingerprint())
    compose(config, "mixed")
    run = evaluate(config, "mixed", task="sentiment")
    info_path = ExperimentPaths.of(config).eval_info("mixed", "sentiment")
    info = json.loads(info_path.read_text())
    assert info["precision"] == {"weights": "bfloat16", "decode": "float32", "fold": "float32"}
    assert info_path in run.artifacts  # logged with the MLflow run, beside model.dtype and evaluation.* params
