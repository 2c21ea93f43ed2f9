"""Every composition method in one table: its kind, the parameters a `methods` entry may set with their
defaults, what it is built from (so the DAG trains only that), how `moa compose` builds it, how it is applied
to the base model, whether the task-count sweep builds it again on a subset, and what evaluation measures of it
besides its scores. Adding a method is one entry plus its functions; a merge is a row of moa.compose.merge's
MERGES, from which its entry here is made.

A build function writes the composition's own files into its (scratch) folder and returns what the
manifest, compositions/{name}/composition.json, records about it; a load function applies the built
composition to a freshly loaded base model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors.torch import load_file

from moa.compose.merge import (
    MERGES,
    MergeMethod,
    MergeSpec,
    Update,
    default_grid,
    dense_report,
    dense_updates,
    is_dense,
    merge_adapters,
    merge_parameters,
    resolved_weights,
)
from moa.compose.tune import tune
from moa.config import Config
from moa.data.batching import encode_prompts
from moa.data.splits import read_split
from moa.data.tasks import Task
from moa.errors import MoaError
from moa.gates import GateSpec, TokenGates, load_gates
from moa.generate import Generation
from moa.implicit import implicit_routing
from moa.io import read_json, write_safetensors
from moa.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CENTROID_EVAL,
    CENTROIDS,
    LEARNED_COEFFICIENTS,
    LEARNED_INFO,
    MERGE_REPORT,
    MIXED,
    ROUTER_WEIGHTS,
    TUNE,
    ExperimentPaths,
    trained_task_adapters,
)
from moa.lora import (
    Arrow,
    activate,
    add_to_weights,
    attach_experts,
    load_adapter,
    merge_and_unload,
    write_adapter,
)
from moa.model import DTYPES
from moa.model.llama import Transformer
from moa.model.prepared import base_model, device
from moa.roles import BASE, MOA, ORACLE
from moa.routing import CentroidRouter, LearnedRouter, SequenceRouter, Strategy, fit_centroids, load_routers


class Kind(StrEnum):
    BASE = "base"  # the base model alone
    ADAPTER = "adapter"  # one adapter trained on every task, folded into the weights
    ROUTE = "route"  # the task adapters as experts, each sequence (arrow, xlora, loraflow: each token) served by its own
    MERGE = "merge"  # the task adapters merged into one adapter, folded into the weights


class Need(StrEnum):
    """What a composition is built from."""

    TASK_ADAPTERS = "task_adapters"  # adapters/{task}/ of every task
    MIXED_ADAPTER = "mixed_adapter"  # adapters/_mixed/
    ROUTERS = "routers"  # moa/ (routers and experts)
    TASK_PROMPTS = "task_prompts"  # every task's train/validation prompts, read through the base model
    LEARNED = "learned"  # learned/{name}/: the coefficients `moa learn-merge` found


@dataclass(frozen=True)
class Applied:
    """A composition applied to the base model: which task each expert index stands for, and how each
    sequence's expert is picked: by its task (`by_task`, the oracle) or by a router from its prompt."""

    experts: tuple[str, ...] = ()
    by_task: bool = False
    router: SequenceRouter | None = None
    gates: TokenGates | None = None  # xlora, loraflow: attached, each token's expert weights from the gate


Build = Callable[[Config, str, dict[str, Any], Path], dict[str, Any]]  # (config, name, params, folder) -> entries
Load = Callable[[Config, Mapping[str, Any], Transformer, bool], Applied]  # (config, manifest, model, fold)
# (config, params, tasks, test rows, generations per task) -> eval/{method}/{task}/implicit_routing.parquet per task
ImplicitRouting = Callable[[Config, Mapping[str, Any], Sequence[Task], Mapping[str, pd.DataFrame],
                            Mapping[str, Sequence[Generation]]], dict[str, pd.DataFrame]]


@dataclass(frozen=True)
class Method:
    kind: Kind
    build: Build  # called with the entry's parameters, its defaults filled in (see `settings`)
    load: Load
    needs: frozenset[Need] = frozenset()
    # The keys a `methods` entry may set besides `method`, each with its default (None: decided when built).
    params: Mapping[str, Any] = field(default_factory=dict)
    recomposed: bool = False  # the sweep builds it again on each subset of the tasks
    implicit_routing: ImplicitRouting | None = None  # evaluation also measures its components' responses


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
    """The merge of a `methods` entry: what it sets, else MergeSpec's defaults; weights given per task are put
    in task order, and the seed is the config's unless set."""
    given = {key: value for key, value in params.items()
             if key not in ("method", "tune", "tune_rows") and value is not None}
    weights = given.pop("weights", None)
    if isinstance(weights, dict):
        weights = [weights[task] for task in config["tasks"]]
    return MergeSpec(params["method"], tuple(weights) if weights else None, **({"seed": config["seed"]} | given))


def tune_grid(config: Config, params: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """A tuned merge's grid: what its `tune` sets, the family's default (moa.compose.merge.default_grid) else."""
    given = {key: tuple(values) for key, values in (params["tune"] or {}).items()}
    return given or default_grid(merge_spec(config, params), len(config["tasks"]))


def _build_merge(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """The merge of the task adapters; with `tune`, at the setting of its grid that is best on validation
    (compositions/{name}/tune.parquet holds every candidate's scores)."""
    dirs = trained_task_adapters(config)
    tuned: dict[str, Any] = {}
    if params["tune"] is not None:
        start, grid = time.perf_counter(), tune_grid(config, params)
        result = tune(config, merge_spec(config, params), grid, dirs, params["tune_rows"])
        result.table.to_parquet(out / TUNE, index=False)
        tuned = {"tuned": result.chosen, "tuning": {"grid": {k: list(v) for k, v in grid.items()},
                                                    "criterion": result.criterion, "labelled": result.labelled,
                                                    "seconds": round(time.perf_counter() - start, 2)}}
    spec, adapters = merge_spec(config, params | tuned.get("tuned", {})), [load_adapter(d) for d in dirs]
    if is_dense(spec):  # nothing to store: loading merges the task adapters again (dense_updates is deterministic)
        report, built = dense_report(spec, adapters, [d.name for d in dirs]), {"dense": True}
    else:
        adapter_config, state, report = merge_adapters(spec, adapters, [d.name for d in dirs])
        write_adapter(out, adapter_config, state)
        built = {"adapter": "."}
    (out / MERGE_REPORT).write_text(json.dumps({"name": name} | report, indent=2) + "\n")
    return built | {"rank": report["rank"]} | tuned


def _implicit_routing(config: Config, params: Mapping[str, Any], tasks: Sequence[Task],
                      frames: Mapping[str, pd.DataFrame],
                      generated: Mapping[str, Sequence[Generation]]) -> dict[str, pd.DataFrame]:
    """An exact merge is the sum of its task components: how much each moves every evaluated sequence."""
    weights = resolved_weights(merge_spec(config, params), len(config["tasks"]))
    return implicit_routing(config, trained_task_adapters(config), weights, tasks, frames, generated)


def _load_merge(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    """A merge's adapter, or an untruncated element-wise merge's dense update, always folded (no factors hold it)."""
    if not manifest.get("dense"):
        return _load_folded(config, manifest, model, fold)
    spec = merge_spec(config, settings(manifest["params"]) | manifest.get("tuned", {}))
    dirs = trained_task_adapters(config)
    add_to_weights(model, dense_updates(spec, [load_adapter(d) for d in dirs], [d.name for d in dirs]))
    return Applied()


def _load_folded(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    attach(model, [ExperimentPaths.of(config).composition(manifest["name"]) / manifest["adapter"]])
    if fold:
        merge_and_unload(model)
    return Applied()


def _build_learned(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """A learned merge: the task adapters merged by the coefficients `moa learn-merge` found (one weight per task,
    or per module and task), as the learner's merge (learned.json) combines them."""
    paths = ExperimentPaths.of(config)
    learned = read_json(paths.learned(name) / LEARNED_INFO, f"run `moa learn-merge --config ... --method {name}` first")
    coefficients = load_file(paths.learned(name) / LEARNED_COEFFICIENTS)["coefficients"]
    dirs = trained_task_adapters(config)
    if learned["tasks"] != [d.name for d in dirs]:
        raise MoaError(f"{paths.learned(name)}: learned over tasks {learned['tasks']}, not the config's; rerun "
                       f"`moa learn-merge --method {name}`")
    per_module = dict(zip(learned["modules"], coefficients.tolist())) if learned["modules"] else None
    spec = MergeSpec(learned["merge"], None if per_module else tuple(coefficients.tolist()))
    adapter_config, state, report = merge_adapters(spec, [load_adapter(d) for d in dirs], [d.name for d in dirs],
                                                   per_module)
    if per_module:  # each task's mean weight over the modules
        report["weights"] = coefficients.mean(0).tolist()
    write_adapter(out, adapter_config, state)
    (out / MERGE_REPORT).write_text(json.dumps({"name": name} | report, indent=2) + "\n")
    data = {key: learned[key] for key in ("labelled", "unlabelled", "objective", "seconds")}
    return {"adapter": ".", "rank": report["rank"], "learned": data}


# --- the task adapters as experts -------------------------------------------------------------------------


def _build_oracle(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    root = ExperimentPaths.of(config).root
    return {"adapters": [str(d.relative_to(root)) for d in trained_task_adapters(config)]}


def _load_oracle(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    root = ExperimentPaths.of(config).root
    attach(model, [root / path for path in manifest["adapters"]])
    return Applied(tuple(manifest["tasks"]), by_task=True)


def _build_moa(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    paths = ExperimentPaths.of(config)
    if not (paths.moa / ROUTER_WEIGHTS).is_file():
        raise MoaError(f"{paths.moa}: no trained MoA routers; run `moa train-router --config ...` first")
    return {"strategy": params["strategy"], "router": str(paths.moa.relative_to(paths.root)),
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
    root, dirs = ExperimentPaths.of(config).root, trained_task_adapters(config)
    model, tokenizer = base_model(config)
    model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval()  # the dtype it routes in at inference

    def prompts(split: str, limit: int | None) -> list[list[list[int]]]:
        return [encode_prompts(read_split(config, task, split).prompt.tolist()[:limit], tokenizer,
                               config["data"]["chat_template"]) for task in config["tasks"]]

    samples, layer = params["samples"], params["layer"]
    centroids, accuracy = fit_centroids(model, prompts("train", samples), prompts("validation", None))
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
    """Arrow is training-free: the task adapters and the routing settings (top_k capped at the number of tasks,
    so the default serves two tasks too)."""
    top_k = min(params["top_k"], len(config["tasks"]))
    return _build_oracle(config, name, params, out) | {"top_k": top_k, "temperature": params["temperature"]}


def _load_arrow(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    """The task adapters as experts, every LoRA layer routing each token itself (no router, no per-sequence
    expert: the engine leaves the layers' Arrow mode alone)."""
    root = ExperimentPaths.of(config).root
    attach(model, [root / path for path in manifest["adapters"]])
    activate(model, Arrow(manifest["top_k"], manifest["temperature"]))
    return Applied(tuple(manifest["tasks"]))


def _build_gated(config: Config, name: str, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """A token-level gate: the task adapters as experts and the gate `moa learn-merge` trained over them."""
    paths = ExperimentPaths.of(config)
    learned = read_json(paths.learned(name) / LEARNED_INFO, f"run `moa learn-merge --config ... --method {name}` first")
    if learned["tasks"] != list(config["tasks"]):
        raise MoaError(f"{paths.learned(name)}: gate trained over tasks {learned['tasks']}, not the config's; rerun "
                       f"`moa learn-merge --method {name}`")
    data = {key: learned[key] for key in ("labelled", "unlabelled", "objective", "seconds")}
    return _build_oracle(config, name, params, out) | {
        "gate": str(paths.learned(name).relative_to(paths.root)), "parameters": learned["parameters"],
        "passes": learned["passes"], "learned": data}


def _load_gated(config: Config, manifest: Mapping[str, Any], model: Transformer, fold: bool) -> Applied:
    """The task adapters as experts, every token's expert weights from the gate (no router, no per-sequence
    expert: the engine leaves the layers to the gate's hooks)."""
    root = ExperimentPaths.of(config).root
    attach(model, [root / path for path in manifest["adapters"]])
    gates = load_gates(root / manifest["gate"])
    return Applied(tuple(manifest["tasks"]), gates=gates.attach(model))


# --- the table ----------------------------------------------------------------------------------------

_TASK_ADAPTERS = frozenset({Need.TASK_ADAPTERS})


def _merge(method: MergeMethod) -> Method:
    """A merge's entry, from its row of MERGES: the sweep merges a subset's adapters again, and evaluation measures
    an exact merge's implicit routing."""
    params = merge_parameters(method) | {"tune": None, "tune_rows": None}  # tune None: untuned; {}: the family's grid
    if "seed" in params:
        params["seed"] = None  # the config's (merge_spec)
    implicit = _implicit_routing if MERGES[method].update == Update.EXACT else None
    return Method(Kind.MERGE, _build_merge, _load_merge, _TASK_ADAPTERS, params, recomposed=True,
                  implicit_routing=implicit)


# Not recomposed by the sweep: base, the oracle (each task served by its own LoRA alone, whatever else is composed)
# and the mixed-data LoRA (trained on every task; a LoRA is never retrained).
METHODS: dict[str, Method] = {
    BASE: Method(Kind.BASE, _build_nothing, _load_nothing),
    ORACLE: Method(Kind.ROUTE, _build_oracle, _load_oracle, _TASK_ADAPTERS),
    "mixed": Method(Kind.ADAPTER, _build_mixed, _load_folded, frozenset({Need.MIXED_ADAPTER})),
    MOA: Method(Kind.ROUTE, _build_moa, _load_moa, frozenset({Need.ROUTERS}), {"strategy": Strategy.LAST},
                  recomposed=True),
    "centroid": Method(Kind.ROUTE, _build_centroid, _load_centroid, _TASK_ADAPTERS | {Need.TASK_PROMPTS},
                       {"layer": None, "samples": 64}, recomposed=True),  # layer None: the best on validation
    "arrow": Method(Kind.ROUTE, _build_arrow, _load_arrow, _TASK_ADAPTERS,
                    {"top_k": Arrow().top_k, "temperature": Arrow().temperature}, recomposed=True),  # PEFT's
} | {method: _merge(method) for method in MERGES} | {
    # Learned merges: coefficients found on data by `moa learn-merge` (moa.train.merge), folded like any merge; the
    # sweep learns them again on each subset.
    "cat": Method(Kind.MERGE, _build_learned, _load_folded, _TASK_ADAPTERS | {Need.LEARNED},
                  {"examples": None, "steps": None, "lr": 0.05}, recomposed=True),
    "lorahub": Method(Kind.MERGE, _build_learned, _load_folded, _TASK_ADAPTERS | {Need.LEARNED},
                      {"shots": 5, "budget": 40, "combine": "factors", "seed": None}, recomposed=True),
    "adamerging": Method(Kind.MERGE, _build_learned, _load_folded, _TASK_ADAPTERS | {Need.LEARNED},
                         {"init": 0.3, "steps": None, "lr": 0.05, "prompts": None}, recomposed=True),
} | {
    # Token-level gates: trained by `moa learn-merge` (moa.train.gates) on the router's rows (examples None) for one
    # epoch of them (steps None) at 3 / hidden size (lr None: moa.train.gates), the task LoRAs served as experts;
    # the sweep trains them again on each subset. X-LoRA's settings are PEFT's.
    "xlora": Method(Kind.ROUTE, _build_gated, _load_gated, _TASK_ADAPTERS | {Need.LEARNED},
                    {"examples": None, "steps": None, "lr": None} | {key: getattr(GateSpec, key) for key in (
                        "xlora_depth", "xlora_size", "xlora_dropout_p", "layerwise_scalings", "enable_softmax",
                        "enable_softmax_topk", "softmax_temperature", "top_k_lora", "global_scaling_weight")},
                    recomposed=True),
    "loraflow": Method(Kind.ROUTE, _build_gated, _load_gated, _TASK_ADAPTERS | {Need.LEARNED},
                       {"examples": None, "steps": None, "lr": None}, recomposed=True),
}
LEARNED = frozenset(name for name, method in METHODS.items() if Need.LEARNED in method.needs)
GATED_METHODS = frozenset(name for name in LEARNED if METHODS[name].kind == Kind.ROUTE)


class Tier(StrEnum):
    """Where a composition stands in the verdict's comparison: the routed ones against the best merge of each tier."""

    REFERENCE = "reference"  # base, the oracle, the mixed-data LoRA
    ROUTED = "routed"  # MoA, centroid, arrow: the task LoRAs as experts
    GATED = "token-gated"  # xlora, loraflow: learned per-token gates over the task LoRAs
    TRAINING_FREE = "training-free merge"  # a merge at fixed settings, no data
    TUNED = "tuned merge"  # a merge at the setting of its grid best on validation
    LEARNED = "learned merge"  # coefficients learned from data (moa learn-merge)



def tier_of(params: Mapping[str, Any]) -> Tier:
    if params["method"] in GATED_METHODS:
        return Tier.GATED
    method = method_of(params)
    if method.kind != Kind.MERGE:
        return Tier.ROUTED if method.kind == Kind.ROUTE and params["method"] != ORACLE else Tier.REFERENCE
    if Need.LEARNED in method.needs:
        return Tier.LEARNED
    return Tier.TUNED if params.get("tune") is not None else Tier.TRAINING_FREE


def needs_of(params: Mapping[str, Any]) -> frozenset[Need]:
    """What a `methods` entry is built from: its method's needs, and the tasks' prompts where it is tuned."""
    tuned = {Need.TASK_PROMPTS} if params.get("tune") is not None else set()
    return method_of(params).needs | tuned


def method_of(params: Mapping[str, Any]) -> Method:
    """The registry entry of a `methods` entry's parameters (see moa.config.method_params)."""
    return METHODS[params["method"]]


def settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """A `methods` entry's parameters with its method's defaults filled in."""
    return dict(method_of(params).params) | dict(params)
