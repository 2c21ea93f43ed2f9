"""`moa compose`: turn the trained adapters into one composition per configured method, and load any
composition as a ready-to-decode model.

compositions/{name}/composition.json records the method, its parameters and the inputs (paths relative
to the experiment); merges and `mixed` also hold a PEFT adapter (+ merge_report.json for merges).
base, oracle and MoA reference adapters/ and moa/ instead of copying them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa import __version__
from moa.compose.merge import MERGE_METHODS, MergeSpec, merge_adapters
from moa.config import Config, experiment_dir, method_params
from moa.errors import MoaError
from moa.generate import Routing
from moa.io import atomic_dir, read_json
from moa.lora import load_adapter, merge_and_unload, write_adapter
from moa.lora.peft_io import CONFIG_FILE, WEIGHTS_FILE
from moa.model import Tokenizer, Transformer
from moa.tracking import log_step
from moa.train.lora import MIXED, base_model, device
from moa.train.router import adapter_dirs, attach_experts, load_routers

MANIFEST = "composition.json"
REPORT = "merge_report.json"


@dataclass
class Composed:
    """A composition loaded for inference."""

    model: Transformer
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    route: Routing | None = None  # MoA: picks each sequence's expert(s) from its prompt
    experts: tuple[str, ...] = ()  # the task each expert index stands for


def composition_dir(config: Config, name: str) -> Path:
    return experiment_dir(config) / "compositions" / name


def merge_spec(config: Config, params: dict[str, Any]) -> MergeSpec:
    """The merge of a `methods` entry; weights given per task are put in task order."""
    weights = params.get("weights")
    if isinstance(weights, dict):
        weights = [weights[task] for task in config["tasks"]]
    return MergeSpec(params["method"], tuple(weights) if weights else None, params.get("k"),
                     params.get("density", 0.5), params.get("majority_sign_method", "total"),
                     params.get("seed", config["seed"]))


def compose(config: Config, name: str) -> Path:
    """Write compositions/{name}/ atomically; returns it."""
    params = method_params(config, name)
    method, root = params["method"], experiment_dir(config)
    manifest: dict[str, Any] = {"name": name, "method": method, "params": params, "tasks": list(config["tasks"]),
                                "moa_version": __version__}
    with atomic_dir(composition_dir(config, name)) as tmp:
        if method == "oracle":
            manifest["adapters"] = [_relative(d, root) for d in adapter_dirs(config)]
        elif method == "mixed":
            _copy_adapter(_mixed_dir(config), tmp)
            manifest["adapter"] = "."
        elif method == "moa":
            _check_router(config)
            manifest |= {"strategy": params.get("strategy", "last"), "router": "moa",
                         "adapters": [f"moa/experts/{task}" for task in config["tasks"]]}
        elif method in MERGE_METHODS:
            report = _merge(config, name, merge_spec(config, params), tmp)
            manifest |= {"adapter": ".", "rank": report["rank"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    out = composition_dir(config, name)
    report = read_json(out / REPORT, "") if (out / REPORT).is_file() else {}
    log_step(config, f"compose:{name}", {"moa.step": "compose", "moa.method": name}, {"method": params},
             metrics={k: report[k] for k in ("rank", "relative_error", "retained_energy") if report.get(k) is not None},
             artifacts=[p for p in (out / MANIFEST, out / REPORT) if p.is_file()])
    return out


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _mixed_dir(config: Config) -> Path:
    path = experiment_dir(config) / "adapters" / MIXED
    if not (path / WEIGHTS_FILE).is_file():
        raise MoaError(f"{path}: the mixed-data adapter is not trained; run `moa train-mixed --config ...` first")
    return path


def _check_router(config: Config) -> None:
    path = experiment_dir(config) / "moa"
    if not (path / "routers.safetensors").is_file():
        raise MoaError(f"{path}: no trained MoA routers; run `moa train-router --config ...` first")


def _copy_adapter(source: Path, target: Path) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(source / name, target / name)


def _merge(config: Config, name: str, spec: MergeSpec, out: Path) -> dict[str, Any]:
    dirs = adapter_dirs(config)
    adapter_config, state, report = merge_adapters(spec, [load_adapter(d) for d in dirs], [d.name for d in dirs])
    write_adapter(out, adapter_config, state)
    (out / REPORT).write_text(json.dumps({"name": name} | report, indent=2) + "\n")
    return report


# --- loading --------------------------------------------------------------------------------------------


def read_manifest(config: Config, name: str) -> dict[str, Any]:
    method_params(config, name)  # an unknown name fails here, naming the known ones
    path = composition_dir(config, name) / MANIFEST
    return read_json(path, f"run `moa compose --config ... --method {name}` first")


def load_composition(config: Config, name: str, task: str | None = None, fold: bool = True) -> Composed:
    """The base model with composition `name` applied. `oracle` needs the task of the prompts; merges and
    `mixed` are folded into the base weights unless fold=False."""
    manifest = read_manifest(config, name)
    method, root = manifest["method"], experiment_dir(config)
    if method == "oracle":
        if task is None:
            raise MoaError(f"{name}: the oracle applies each task's own LoRA, so it needs the task (--task)")
        if task not in manifest["tasks"]:
            raise MoaError(f"{name}: no adapter for task {task!r}; composed tasks: {', '.join(manifest['tasks'])}")
    model, tokenizer = base_model(config)
    composed, routers = Composed(model, tokenizer, manifest), None
    if method == "oracle":
        _attach(model, [root / manifest["adapters"][manifest["tasks"].index(task)]])
        composed.experts = (task,)
    elif method == "moa":
        _attach(model, [root / path for path in manifest["adapters"]])
        routers = load_routers(root / manifest["router"])
        composed.experts = tuple(routers.spec.tasks)
    elif "adapter" in manifest:
        _attach(model, [composition_dir(config, name) / manifest["adapter"]])
        if fold:
            merge_and_unload(model)
    model.to(device()).eval()
    if routers is not None:
        composed.route = Routing(routers.to(device()).eval(), manifest["strategy"])
    return composed


def _attach(model: Transformer, dirs: Sequence[Path]) -> None:
    for path in dirs:
        if not (path / WEIGHTS_FILE).is_file():
            raise MoaError(f"{path}: adapter not found; rerun the step that writes it (moa train-lora / compose)")
    attach_experts(model, dirs)

