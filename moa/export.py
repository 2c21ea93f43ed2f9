"""`moa export --method NAME OUT`: a composition where other tools load it.

- A merge (and `mixed`): `merged/`, the base model with the merge folded in, an HF directory transformers loads as
  is, in `model.dtype`; and `adapter/`, the PEFT adapter, where the merge is one (an untruncated element-wise merge is
  a dense update: no adapter; give it `k` to export a rank-k one).
- `base`: `merged/`, the prepared base model.
- A routed composition (the oracle, MoA, centroid, arrow, xlora, loraflow): `experts/{task}/`, each task's PEFT
  adapter; MoA's routers (`router/`: routers.safetensors and router_config.json), centroid's centroids or a token
  gate's weights and settings (`gate/`); and README.md saying how they fit together.

Every export holds composition.json, the manifest it was made from. OUT is written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moa.compose.composition import read_manifest
from moa.compose.registry import Kind, method_of
from moa.config import Config
from moa.io import atomic_dir
from moa.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CENTROIDS,
    LEARNED_COEFFICIENTS,
    LEARNED_INFO,
    MANIFEST,
    ROUTER_CONFIG,
    ROUTER_WEIGHTS,
    ExperimentPaths,
)
from moa.model import DTYPES, save_hf_dir
from moa.model.prepared import base_model
from moa.roles import MOA
from moa.step_result import StepResult

ROUTED = """# {name}: the task LoRAs as experts, {how}

`experts/{{task}}/` holds each task's LoRA as a PEFT adapter of {base} (tasks: {tasks}).
{routing}
moa serves it as is: `moa generate --config CONFIG --method {name}`; composition.json is moa's manifest.
"""
ROUTING = {
    "oracle": ("each prompt served by its own task's LoRA", "Pick the adapter by the prompt's task (PEFT: "
               "`model.set_adapter(task)`); nothing else is learned."),
    MOA: ("each prompt served by the expert a learned router picks", "`router/routers.safetensors` holds MoA's "
          "linear routers (one per block, over the mean-pooled block input of the prompt); `router/router_config.json`"
          " their tasks, layers and strategy (`{strategy}`: last = the last block's router decides). The route is "
          "decided once per prompt in its prefill and kept for every generated token."),
    "centroid": ("each prompt served by the task whose centroid it is nearest", "`centroids.safetensors` holds each "
                 "task's centroid of the base model's mean-pooled block inputs; the prompt goes to the nearest "
                 "(cosine) at block {layer}, decided in its prefill."),
    "xlora": ("each token's expert weights in every LoRA module from X-LoRA's classifier", "`gate/` holds the "
              "classifier (coefficients.safetensors: PEFT's `internal_xlora_classifier.layers.*` without that prefix) "
              "and its settings (learned.json `gate`: PEFT's XLoraConfig names). In PEFT: `XLoraConfig(adapters=...)` "
              "over `experts/` with those settings, then load the classifier's weights; every step runs the base "
              "model first (adapters off) and the classifier reads its last hidden state."),
    "loraflow": ("each token's expert weights per block from LoRA-Flow's gates", "`gate/coefficients.safetensors` "
                 "holds `weight` [blocks, tasks, hidden] and `bias` [blocks, tasks]: every LoRA module of block l "
                 "weighs the experts by softmax(weight[l] rms(x)) + bias[l], x the block's input at the token, rms "
                 "a parameter-free RMS norm."),
    "arrow": ("each token routed in every LoRA module (Arrow)", "Load the experts with PEFT's `ArrowConfig` (top_k "
              "{top_k}, router temperature {temperature}): every module routes each token to the experts whose "
              "prototype it aligns with most."),
}


def export(config: Config, method: str, out: Path) -> StepResult:
    """Write composition `method` into `out` (atomically)."""
    manifest = read_manifest(config, method)
    paths = ExperimentPaths.of(config)
    kind = method_of(manifest).kind
    with atomic_dir(Path(out)) as tmp:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if kind in (Kind.BASE, Kind.MERGE, Kind.ADAPTER):
            _merged(config, manifest, tmp)
        else:
            _routed(config, manifest, paths, tmp)
    return StepResult(Path(out), summary=", ".join(sorted(p.name for p in Path(out).iterdir())))


def _merged(config: Config, manifest: dict[str, Any], out: Path) -> None:
    """The base model with the composition folded in, in model.dtype, and its PEFT adapter where it has one."""
    model, tokenizer = base_model(config)
    method_of(manifest).load(config, manifest, model, True)
    save_hf_dir(model, tokenizer, out / "merged", DTYPES[config["model"]["dtype"]])
    if manifest.get("adapter"):
        source = ExperimentPaths.of(config).composition(manifest["name"]) / manifest["adapter"]
        (out / "adapter").mkdir()
        for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(source / file, out / "adapter" / file)


def _routed(config: Config, manifest: dict[str, Any], paths: ExperimentPaths, out: Path) -> None:
    """Every task's LoRA, what routes between them, and how they fit together."""
    tasks = list(manifest["tasks"])
    for task, adapter in zip(tasks, manifest["adapters"]):
        shutil.copytree(paths.root / adapter, out / "experts" / task)
    method = manifest["method"]
    details: dict[str, Any] = dict(manifest)
    if method == MOA:
        (out / "router").mkdir()
        for file in (ROUTER_WEIGHTS, ROUTER_CONFIG):
            shutil.copy2(paths.root / manifest["router"] / file, out / "router" / file)
    elif method == "centroid":
        shutil.copy2(paths.composition(manifest["name"]) / CENTROIDS, out / CENTROIDS)
    elif "gate" in manifest:
        (out / "gate").mkdir()
        for file in (LEARNED_COEFFICIENTS, LEARNED_INFO):
            shutil.copy2(paths.root / manifest["gate"] / file, out / "gate" / file)
    how, routing = ROUTING[method]
    (out / "README.md").write_text(ROUTED.format(name=manifest["name"], how=how, base=config["model"]["source"],
                                                 tasks=", ".join(tasks), routing=routing.format(**details)))
