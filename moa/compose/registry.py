"""Every composition method in one table: its kind, the parameters a `methods` entry may set, what it is
built from (so the DAG trains only that), how `moa compose` builds it and how it is applied to the base
model. Adding a method is one entry plus its functions.

A build function writes the composition's own files into its (scratch) folder and returns what the
manifest, compositions/{name}/composition.json, records about it; a load function applies the built
composition to a freshly loaded base model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors.torch import load_file

from moa.compose.merge import MergeMethod, MergeSpec, merge_adapters
from moa.config import Config
from moa.data.batching import encode_prompts
from moa.data.prepare import read_split
from moa.errors import MoaError
from moa.io import write_safetensors
from moa.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CENTROID_EVAL,
    CENTROIDS,
    MERGE_REPORT,
    MIXED,
    ROUTER_WEIGHTS,
    ExperimentPaths,
)
from moa.lora import Arrow, activate, attach_experts, load_adapter, merge_and_unload, write_adapter
from moa.model import DTYPES
from moa.model.llama import Transformer
from moa.model.prepare import base_model, device
from moa.routing import CentroidRouter, LearnedRouter, SequenceRouter, Strategy, fit_centroids, load_routers


class Kind(StrEnum):
    BASE = "base"  # the base model alone
    ADAPTER = "adapter"  # one adapter trained on every task, folded into the weights
    ROUTE = "route"  # the task adapters as experts, each sequence (arrow: each token) served by its own
    MERGE = "merge"  # the task adapters merged into one adapter, folded into the weights


class Need(StrEnum):
    """What a composition is built from."""

    TASK_ADAPTERS = "task_adapters"  # adapters/{task}/ of every task
    MIXED_ADAPTER = "mixed_adapter"  # adapters/_mixed/
    ROUTERS = "routers"  # moa/ (routers and experts)
    TASK_PROMPTS = "task_prompts"  # every task's train/validation prompts, read through the base model


@dataclass(frozen=True)
class Applied:
    """A composition applied to the base model: which task each expert index stands for, and how each
    sequence's expert is picked: by its task (`by_task`, the oracle) or by a router from its prompt."""

    experts: tuple[str, ...] = ()
    by_task: bool = False
    router: SequenceRouter | None = None


CENTROID_SAMPLES = 64  # training prompts per task that make its centroid

Build = Callable[[Config, str, dict[str, Any], Path], dict[str, Any]]  # (config, name, params, folder) -> entries
Load = Callable[[Config, Mapping[str, Any], Transformer, bool], Applied]  # (config, manifest, model, fold)


@dataclass(frozen=True)
class Method:
    kind: Kind
    build: Build
    load: Load
    needs: frozenset[Need] = frozenset()
    params: frozenset[str] = frozenset()  # the keys a `methods` entry may set besides `method`


def task_adapters(config: Config) -> list[Path]:
    """The task LoRAs (experts 0..N-1 in config task order); each must exist."""
    paths = ExperimentPaths.of(config)
    dirs = [paths.adapter(task) for task in config["tasks"]]
    for path in dirs:
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise MoaError(f"{path}: no trained adapter for task {path.name!r}; "
                           f"run `moa train-lora --config ... --task {path.name}` first")
    return dirs


def attach(model: Transformer, dirs: list[Path]) -> None:
    for path in dirs:
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise MoaError(f"{path}: adapter not found; rerun the step that writes it (moa train-lora / compose)")
    attach_experts(model, dirs)


# --- base --------------------------------------------------------------------------------------------


def _build_nothing(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    return {}


def _load_nothing(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    return Applied()


# --- one adapter, folded (mixed and every merge) ---------------------------------------------------------


def _build_mixed(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    source = ExperimentPaths.of(config).adapter(MIXED)
    if not (source / ADAPTER_WEIGHTS).is_file():
        raise MoaError(f"{source}: the mixed-data adapter is not trained; run `moa train-mixed --config ...` first")
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(source / file, out / file)
    return {"adapter": "."}


def merge_spec(config: Config, params: Mapping[str, Any]) -> MergeSpec:
    """The merge of a `methods` entry; weights given per task are put in task order."""
    weights = params.get("weights")
    if isinstance(weights, dict):
        weights = [weights[task] for task in config["tasks"]]
    return MergeSpec(params["method"], tuple(weights) if weights else None, params.get("k"),
                     params.get("density", 0.5), params.get("majority_sign_method", "total"),
                     params.get("seed", config["seed"]))


def _build_merge(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    dirs = task_adapters(config)
    adapter_config, state, report = merge_adapters(merge_spec(config, params), [load_adapter(d) for d in dirs],
                                                   [d.name for d in dirs])
    write_adapter(out, adapter_config, state)
    (out / MERGE_REPORT).write_text(json.dumps({"name": name} | report, indent=2) + "\n")
    return {"adapter": ".", "rank": report["rank"]}


def _load_folded(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    attach(model, [ExperimentPaths.of(config).composition(manifest["name"]) / manifest["adapter"]])
    if fold:
        merge_and_unload(model)
    return Applied()


# --- the task adapters as experts -------------------------------------------------------------------------


def _build_oracle(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    root = ExperimentPaths.of(config).root
    return {"adapters": [str(d.relative_to(root)) for d in task_adapters(config)]}


def _load_oracle(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    root = ExperimentPaths.of(config).root
    attach(model, [root / path for path in manifest["adapters"]])
    return Applied(tuple(manifest["tasks"]), by_task=True)


def _build_moa(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    paths = ExperimentPaths.of(config)
    if not (paths.moa / ROUTER_WEIGHTS).is_file():
        raise MoaError(f"{paths.moa}: no trained MoA routers; run `moa train-router --config ...` first")
    return {"strategy": params.get("strategy", Strategy.LAST), "router": str(paths.moa.relative_to(paths.root)),
            "adapters": [str(paths.expert(task).relative_to(paths.root)) for task in config["tasks"]]}


def _load_moa(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    root = ExperimentPaths.of(config).root
    attach(model, [root / path for path in manifest["adapters"]])
    routers = load_routers(root / manifest["router"])
    return Applied(tuple(routers.spec.tasks), router=LearnedRouter(routers.eval(), Strategy(manifest["strategy"])))


def _build_centroid(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Each task's centroid of the base model's mean-pooled block inputs over (up to `samples` of) its
    training prompts, at every layer; the layer used is `layer`, else the earliest with the best
    nearest-centroid accuracy on the validation prompts."""
    root, dirs = ExperimentPaths.of(config).root, task_adapters(config)
    model, tokenizer = base_model(config)
    model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval()  # the dtype it routes in at inference

    def prompts(split: str, limit: int | None) -> list[list[list[int]]]:
        return [encode_prompts(read_split(config, task, split).prompt.tolist()[:limit], tokenizer,
                               config["data"]["chat_template"]) for task in config["tasks"]]

    samples = params.get("samples", CENTROID_SAMPLES)
    centroids, accuracy = fit_centroids(model, prompts("train", samples), prompts("validation", None))
    layer = params.get("layer")
    if layer is None:
        layer = int(accuracy.argmax())  # the first of the best: the cheapest routing pass
    elif layer >= len(accuracy):
        raise MoaError(f"methods.{name}.layer: {layer} is not a layer of the model (0..{len(accuracy) - 1})")
    write_safetensors(out / CENTROIDS, {"centroids": centroids.float()})
    pd.DataFrame({"layer": range(len(accuracy)), "accuracy": accuracy.cpu().numpy(),
                  "n": sum(map(len, prompts("validation", None)))}).to_parquet(out / CENTROID_EVAL, index=False)
    return {"adapters": [str(d.relative_to(root)) for d in dirs], "layer": layer, "samples": samples,
            "validation_accuracy": float(accuracy[layer])}


def _load_centroid(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    paths = ExperimentPaths.of(config)
    attach(model, [paths.root / path for path in manifest["adapters"]])
    centroids = load_file(paths.composition(manifest["name"]) / CENTROIDS)["centroids"][manifest["layer"]]
    return Applied(tuple(manifest["tasks"]), router=CentroidRouter(centroids, manifest["layer"]))


def _build_arrow(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Arrow is training-free: the task adapters and the routing settings (PEFT's defaults; top_k capped at
    the number of tasks, so the default serves two tasks too)."""
    default = Arrow()
    top_k = min(params.get("top_k", default.top_k), len(config["tasks"]))
    return _build_oracle(config, name, params, out) | {"top_k": top_k,
                                                       "temperature": params.get("temperature", default.temperature)}


def _load_arrow(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    """The task adapters as experts, every LoRA layer routing each token itself (no router, no per-sequence
    expert: the engine leaves the layers' Arrow mode alone)."""
    root = ExperimentPaths.of(config).root
    attach(model, [root / path for path in manifest["adapters"]])
    activate(model, Arrow(manifest["top_k"], manifest["temperature"]))
    return Applied(tuple(manifest["tasks"]))


# --- the table ----------------------------------------------------------------------------------------

_MERGE = frozenset({Need.TASK_ADAPTERS})
_WEIGHTS = frozenset({"weights"})
_SVD = _WEIGHTS | {"k"}
_PRUNED = _SVD | {"density"}

METHODS: dict[str, Method] = {
    "base": Method(Kind.BASE, _build_nothing, _load_nothing),
    "oracle": Method(Kind.ROUTE, _build_oracle, _load_oracle, _MERGE),
    "mixed": Method(Kind.ADAPTER, _build_mixed, _load_folded, frozenset({Need.MIXED_ADAPTER})),
    "moa": Method(Kind.ROUTE, _build_moa, _load_moa, frozenset({Need.ROUTERS}), frozenset({"strategy"})),
    "centroid": Method(Kind.ROUTE, _build_centroid, _load_centroid, _MERGE | {Need.TASK_PROMPTS},
                       frozenset({"layer", "samples"})),
    "arrow": Method(Kind.ROUTE, _build_arrow, _load_arrow, _MERGE, frozenset({"top_k", "temperature"})),
    MergeMethod.CONCAT: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _WEIGHTS),
    MergeMethod.LINEAR: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _WEIGHTS),
    MergeMethod.AVG: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _WEIGHTS),
    MergeMethod.TASK_ARITHMETIC: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _WEIGHTS),
    MergeMethod.SVD: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _SVD),
    MergeMethod.TIES: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _PRUNED | {"majority_sign_method"}),
    MergeMethod.DARE_LINEAR: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _PRUNED | {"seed"}),
    MergeMethod.DARE_TIES: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE,
                                  _PRUNED | {"majority_sign_method", "seed"}),
    MergeMethod.MAGNITUDE_PRUNE: Method(Kind.MERGE, _build_merge, _load_folded, _MERGE, _PRUNED),
}


def method_of(params: Mapping[str, Any]) -> Method:
    """The registry entry of a `methods` entry's parameters (see moa.config.method_params)."""
    return METHODS[params["method"]]
