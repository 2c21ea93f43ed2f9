"""`moa compose`: build one composition per configured method (see moa.compose.registry), and load any
composition as a ready-to-decode model.

compositions/{name}/composition.json records the method, its parameters and the inputs (paths relative
to the experiment); merges and `mixed` also hold a PEFT adapter (+ merge_report.json for merges).
base, oracle, MoA and arrow reference adapters/ and moa/ instead of copying them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from moa import __version__
from moa.compose.registry import Applied, method_of, settings
from moa.gates import TokenGates
from moa.config import Config, method_params
from moa.errors import MoaError
from moa.io import atomic_dir, read_json
from moa.layout import MANIFEST, ExperimentPaths
from moa.model import DTYPES, Tokenizer, Transformer
from moa.model.prepared import base_model, device
from moa.routing import SequenceRouter
from moa.step_result import StepResult

MERGE_METRICS = ("rank", "relative_error", "retained_energy")  # of merge_report.json, logged to MLflow


@dataclass
class Composed:
    """A composition loaded for inference."""

    model: Transformer
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    experts: tuple[str, ...] = ()  # the task each expert index stands for
    by_task: bool = False  # each sequence is served by its task's expert (the oracle)
    router: SequenceRouter | None = None  # MoA, centroid: picks each sequence's expert(s) from its prompt
    gates: TokenGates | None = None  # xlora, loraflow: each token's expert weights, from hooks on the model

    def expert_for(self, task: str | None) -> int | None:
        """The expert that serves a prompt of `task`: its own for the oracle, else None (no LoRA, a merge
        folded into the weights, the router's choice, or arrow's per-token routing)."""
        if not self.by_task:
            return None
        name = self.manifest["name"]
        if task is None:
            raise MoaError(f"{name}: the oracle serves each prompt with its task's LoRA, so it needs the task (--task)")
        if task not in self.experts:
            raise MoaError(f"{name}: no adapter for task {task!r}; composed tasks: {', '.join(self.experts)}")
        return self.experts.index(task)


def compose(config: Config, method: str) -> StepResult:
    """Write compositions/{method}/ atomically."""
    params = method_params(config, method)
    paths = ExperimentPaths.of(config)
    manifest: dict[str, Any] = {"name": method, "method": params["method"], "params": params,
                                "tasks": list(config["tasks"]), "moa_version": __version__}
    start = time.perf_counter()
    with atomic_dir(paths.composition(method)) as tmp:
        manifest |= method_of(params).build(config, method, settings(params), tmp)
        manifest["build_seconds"] = round(time.perf_counter() - start, 2)  # what `moa compose` took (tuning too)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    report = paths.merge_report(method)
    merge = read_json(report, "") if report.is_file() else {}
    metrics = {k: merge[k] for k in MERGE_METRICS if merge.get(k) is not None}
    if "tuned" in manifest:
        metrics |= {f"tuned.{k}": v for k, v in manifest["tuned"].items()}
        metrics |= {f"tuning.{k}": manifest["tuning"][k] for k in ("criterion", "labelled", "seconds")}
    return StepResult(paths.composition(method), metrics=metrics,
                      artifacts=[p for p in (paths.manifest(method), report, paths.tune(method)) if p.is_file()])


def read_manifest(config: Config, method: str) -> dict[str, Any]:
    method_params(config, method)  # an unknown name fails here, naming the known ones
    return read_json(ExperimentPaths.of(config).manifest(method),
                     f"run `moa compose --config ... --method {method}` first")


def load_composition(config: Config, method: str, fold: bool = True) -> Composed:
    """The base model with composition `method` applied, in `evaluation.dtype`; merges and `mixed` are folded
    into the base weights unless fold=False (folding happens in the base dtype, before the cast)."""
    manifest = read_manifest(config, method)
    model, tokenizer = base_model(config)
    applied: Applied = method_of(manifest).load(config, manifest, model, fold)
    model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval()
    router = None if applied.router is None else applied.router.to(device())  # float32: it reads float32 features
    if applied.gates is not None:
        applied.gates.to(device())  # float32, as trained: each hook casts the hidden states it reads
    return Composed(model, tokenizer, manifest, applied.experts, applied.by_task, router, applied.gates)
