"""What the report reads from results/{experiment}/: the evaluations, the router's, the adapters' and the training
logs. Any of them may be missing: a reader returns what there is (and notes on what is not)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open

from moa.compose.registry import GATED_METHODS, tier_of
from moa.config import Config, method_params
from moa.data.tasks import get_task
from moa.implicit import summarize
from moa.io import read_json
from moa.layout import (
    ADAPTER_WEIGHTS,
    CENTROID_EVAL,
    CENTROIDS,
    GATE_USAGE,
    LEARNED_INFO,
    MIXED,
    ROUTER_CONFIG,
    TRAIN_LOG,
    ExperimentPaths,
)
from moa.lora.peft_io import load_adapter
from moa.metrics import ROUTER_ACCURACY, read_statistics
from moa.report.cosine import adapter_cosine
from moa.roles import MOA
from moa.stats import Evaluated

COLUMNS = ["method", "task", "metric", "value", "n"]
ROUTING_COLUMNS = ["method", "task", "chosen", "count"]
IMPLICIT_COLUMNS = ["method", "task", "layer", "module", "segment", "share_true", "accuracy", "top_task", "n"]
GATE_COLUMNS = ["method", "task", "layer", "expert", "weight", "tokens"]


def read_metrics(config: Config) -> tuple[pd.DataFrame, list[str]]:
    """All eval/{method}/{task}/metrics.parquet of the config's methods and tasks, and notes on the missing."""
    layout, frames, notes = ExperimentPaths.of(config), [], []
    for method in config["methods"]:
        paths = {task: layout.metrics(method, task) for task in config["tasks"]}
        frames += [pd.read_parquet(path, columns=COLUMNS) for path in paths.values() if path.is_file()]
        missing = [task for task, path in paths.items() if not path.is_file()]
        if missing:
            where = layout.metrics(method, "TASK").relative_to(layout.root)
            notes.append(f"`{method}` has no evaluation on {', '.join(missing)} ({where})")
    empty = pd.DataFrame({c: pd.Series(dtype=float if c == "value" else int if c == "n" else str) for c in COLUMNS})
    return pd.concat([empty, *frames], ignore_index=True).astype({"value": float}), notes


def read_evaluations(config: Config) -> dict[tuple[str, str], Evaluated]:
    """Every evaluation's test-row ids and per-example statistics (eval/{method}/{task}/predictions.parquet)."""
    layout, evaluations = ExperimentPaths.of(config), {}
    for task in config["tasks"]:
        metrics = get_task(config, task).evaluated_metrics
        for method in config["methods"]:
            path = layout.predictions(method, task)
            if path.is_file():
                frame = pd.read_parquet(path)
                evaluations[method, task] = Evaluated(frame["id"].to_numpy(), read_statistics(frame, metrics, str(path)))
    return evaluations


def evaluated_routing(config: Config, metrics: pd.DataFrame) -> pd.DataFrame:
    """report/routing.parquet (method, task, chosen, count): how many of a task's evaluated test prompts each expert
    served, for every evaluation in which a router chose one expert per sequence (evaluate reports its
    router_accuracy there: not for the oracle, whose expert is the task itself, nor for per-layer routing), read
    from the predictions' `expert` column; every expert has a row, unchosen ones with count 0."""
    layout = ExperimentPaths.of(config)
    routed = metrics.loc[metrics["metric"] == ROUTER_ACCURACY, ["method", "task"]].drop_duplicates()
    rows = []
    for method, task in routed.itertuples(index=False):
        chosen = pd.read_parquet(layout.predictions(method, task), columns=["expert"])["expert"].value_counts()
        rows += [{"method": method, "task": task, "chosen": expert, "count": int(chosen.get(expert, 0))}
                 for expert in dict.fromkeys([*config["tasks"], *chosen.index])]
    return pd.DataFrame(rows, columns=ROUTING_COLUMNS).astype({"method": str, "task": str, "chosen": str,
                                                               "count": "int64"})


def read_implicit(config: Config) -> pd.DataFrame:
    """Every exact merge's implicit routing (moa.implicit.summarize of its evaluations' component responses)."""
    paths, frames = ExperimentPaths.of(config), []
    for method in config["methods"]:
        for task in config["tasks"]:
            path = paths.implicit_routing(method, task)
            if path.is_file():
                frames.append(summarize(pd.read_parquet(path), method, task, list(config["tasks"])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=IMPLICIT_COLUMNS)


def read_tuning(config: Config) -> pd.DataFrame:
    """Every tuned composition's candidates (its tune.parquet), named by `composition`, with the validation rows
    they were scored on (`labelled`)."""
    paths = ExperimentPaths.of(config)
    frames = [pd.read_parquet(paths.tune(name)).assign(
                  composition=name, labelled=read_json(paths.manifest(name), "rerun compose")["tuning"]["labelled"])
              for name in config["methods"] if paths.tune(name).is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["composition", "candidate"])


def gated(config: Config) -> list[str]:
    """The compositions that gate the task LoRAs per token (xlora, loraflow)."""
    return [name for name in config["methods"] if method_params(config, name)["method"] in GATED_METHODS]


def read_gates(config: Config) -> pd.DataFrame:
    """Every gated composition's learned/{name}/gate_usage.parquet, named by `method`: the mean gate weight on
    each expert per true task and layer over its validation tokens."""
    paths = ExperimentPaths.of(config)
    frames = [pd.read_parquet(paths.learned(name) / GATE_USAGE).assign(method=name)
              for name in gated(config) if (paths.learned(name) / GATE_USAGE).is_file()]
    empty = pd.DataFrame({c: pd.Series(dtype=int if c in ("layer", "tokens") else float if c == "weight" else str)
                          for c in GATE_COLUMNS})
    return pd.concat([empty, *(f[GATE_COLUMNS] for f in frames)], ignore_index=True)


BUDGET_COLUMNS = ["method", "tier", "labelled", "unlabelled", "seconds", "parameters", "passes"]


def read_budgets(config: Config) -> pd.DataFrame:
    """What each composition was built from beyond the task LoRAs, and how long building it took: its tier, the
    labelled rows (task-labelled prompts for the routers; prompt and target for tuning and learning) and unlabelled
    prompts it used, the seconds of compose plus what it was learned by (train-router, learn-merge), and what it
    costs at decoding beyond the base model and its LoRAs (_decoding). NaN where its composition is not there (and
    labelled for `mixed`, which trains its own LoRA on every training row)."""
    paths, rows = ExperimentPaths.of(config), []
    for name in config["methods"]:
        params = method_params(config, name)
        manifest = read_json(paths.manifest(name), "rerun compose") if paths.manifest(name).is_file() else None
        row = {"method": name, "tier": str(tier_of(params))} | dict.fromkeys(BUDGET_COLUMNS[2:], np.nan)
        if manifest is not None:
            row |= {"unlabelled": 0.0} | _budget(config, params, manifest) | {"seconds": _seconds(config, manifest)}
            row |= _decoding(config, name, params["method"], manifest)
        rows.append(row)
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)


def _budget(config: Config, params: dict, manifest: dict) -> dict[str, float]:
    n = len(config["tasks"])
    if "learned" in manifest:
        return {k: float(manifest["learned"][k]) for k in ("labelled", "unlabelled")}
    if "tuning" in manifest:
        return {"labelled": float(manifest["tuning"]["labelled"])}
    if params["method"] == MOA:
        return {"labelled": float(config["router"]["prompts_per_task"] * n)}
    if params["method"] == "centroid":  # its centroids' training prompts, and every validation prompt for its layer
        validation = pd.read_parquet(ExperimentPaths.of(config).composition(manifest["name"]) / CENTROID_EVAL)["n"]
        return {"labelled": float(manifest["samples"] * n + validation.iloc[0])}
    return {"labelled": np.nan if params["method"] == "mixed" else 0.0}


def _seconds(config: Config, manifest: dict) -> float:
    learned = manifest.get("learned", {}).get("seconds", 0.0)
    router = router_config(config).get("seconds", 0.0) if manifest["method"] == MOA else 0.0
    return float(manifest.get("build_seconds", np.nan)) + learned + router


def _decoding(config: Config, name: str, method: str, manifest: dict) -> dict[str, float]:
    """The parameters a composition adds at decoding beyond the base model and the task LoRAs (MoA's routers, the
    centroids of the layer routed at, a gate's; 0 for a folded merge and for arrow, whose prototypes come from the
    LoRAs), and the model's forward passes per generated token (2 for xlora's scaling pass); NaN where unknown."""
    paths = ExperimentPaths.of(config)
    if method in GATED_METHODS:  # as composed, else as learned (learned.json)
        info = paths.learned(name) / LEARNED_INFO
        learned = read_json(info, f"rerun `moa learn-merge --method {name}`") if info.is_file() else {}
        return {key: float(manifest.get(key, learned.get(key, np.nan))) for key in ("parameters", "passes")}
    if method == MOA:
        return {"parameters": float(router_config(config).get("parameters", np.nan)), "passes": 1.0}
    if method == "centroid" and (paths.composition(name) / CENTROIDS).is_file():
        with safe_open(paths.composition(name) / CENTROIDS, "np") as file:  # [layers, tasks, hidden]: one layer's
            _, tasks, hidden = file.get_slice("centroids").get_shape()
        return {"parameters": float(tasks * hidden), "passes": 1.0}
    return {"parameters": np.nan if method == "centroid" else 0.0, "passes": 1.0}


def parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def router_config(config: Config) -> Mapping[str, object]:
    """moa/router_config.json, or nothing before the router is trained."""
    path = ExperimentPaths.of(config).moa / ROUTER_CONFIG
    return read_json(path, "rerun `moa train-router`") if path.is_file() else {}


def task_adapter_cosine(config: Config) -> tuple[list[str], np.ndarray] | None:
    """The trained task adapters (at least two) and their cosine matrix."""
    dirs = ExperimentPaths.of(config).task_adapters(config["tasks"])
    adapters = [(d.name, *load_adapter(d)) for d in dirs if (d / ADAPTER_WEIGHTS).is_file()]
    if len(adapters) < 2:
        return None
    cosine = adapter_cosine([state for *_, state in adapters], [cfg.spec.scaling for _, cfg, _ in adapters])
    return [name for name, *_ in adapters], cosine


def train_logs(config: Config) -> dict[str, pd.DataFrame]:
    layout = ExperimentPaths.of(config)
    paths = {task: layout.adapter(task) for task in config["tasks"]}
    paths |= {"mixed (all tasks)": layout.adapter(MIXED), "router": layout.moa}
    return {name: pd.read_parquet(p / TRAIN_LOG) for name, p in paths.items() if (p / TRAIN_LOG).is_file()}
