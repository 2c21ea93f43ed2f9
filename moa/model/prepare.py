"""`moa prepare-model`: the base model written once as an HF directory (a GGUF is dequantized there), which
every later step loads (moa.model.prepared)."""

from __future__ import annotations

import json

from moa.config import Config
from moa.io import atomic_file
from moa.layout import ExperimentPaths
from moa.model.checkpoint import save_hf_dir
from moa.model.config import DTYPES
from moa.model.load import load_pretrained
from moa.model.prepared import provenance
from moa.step_result import StepResult


def prepare_model(config: Config) -> StepResult:
    """results/{experiment}/model/: the base model as an HF directory, which every later step loads
    instead of the source."""
    paths = ExperimentPaths.of(config)
    dtype = DTYPES[config["model"]["dtype"]]
    model, tokenizer = load_pretrained(config["model"]["source"], dtype, seed=config["seed"])
    out = save_hf_dir(model, tokenizer, paths.model, dtype)
    with atomic_file(paths.model_source) as tmp:
        tmp.write_text(json.dumps(provenance(config), sort_keys=True) + "\n")
    return StepResult(out, metrics={"parameters": sum(p.numel() for p in model.parameters())},
                      artifacts=[out / "config.json"])
