"""The task-count sweep (config `sweep`): how each composition's multitask score changes with the number of tasks
it composes.

For each n of `sweep.n_tasks`, up to `sweep.subsets` distinct subsets of n of the config's tasks are drawn one at a
time by a generator seeded with (sweep.seed, n), repeats skipped: adding an n or raising `subsets` never changes a
subset drawn before, and where fewer distinct subsets exist, fewer are drawn. The k-th subset of size n is named
`n{n}-s{k}`; its tasks keep the config's order. On each subset, every method that combines the task LoRAs (merges,
MoA, any router or token gate over the LoRAs: `recomposed`; a gate not on a subset of one task) is built again from
the LoRAs already trained (MoA's routers are retrained on the subset's tasks; a LoRA never is) and evaluated on the
subset's tasks, under sweep/{subset}/.

The subset of every task is the main experiment itself: nothing of it is recomputed, its point of the curve is the
main compositions' and evaluations'. Base and the oracle serve each task the same whatever else is composed, so
their main evaluations are reused: the oracle's normalizes every subset's scores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moa.compose.registry import GATED_METHODS, method_of
from moa.config import Config, method_params
from moa.errors import MoaError
from moa.io import atomic_file
from moa.layout import SUBSET


@dataclass(frozen=True)
class Subset:
    name: str  # n{n}-s{k}
    tasks: tuple[str, ...]  # in the config's order

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


def sweep_rule(step: str) -> str:
    """The Snakemake rule (and MLflow run name) of a step run on a sweep subset: sweep_compose runs `moa compose`."""
    return f"sweep_{step}"


def draw(tasks: list[str], n: int, count: int, seed: int) -> list[tuple[str, ...]]:
    """Up to `count` distinct n-subsets of `tasks` (each in the tasks' order), drawn one at a time by a generator of
    their own, repeats skipped: the first k drawn are the same whatever `count` is."""
    rng = np.random.default_rng([seed, n])
    drawn: list[tuple[str, ...]] = []
    while len(drawn) < min(count, math.comb(len(tasks), n)):
        chosen = tuple(tasks[i] for i in sorted(rng.choice(len(tasks), size=n, replace=False)))
        if chosen not in drawn:
            drawn.append(chosen)
    return drawn


def subsets(config: Config) -> list[Subset]:
    """Every subset of the config's sweep (none without one), by n as configured, then k; the subset of every task
    among them is the main experiment."""
    sweep, tasks = config.get("sweep"), list(config["tasks"])
    if sweep is None:
        return []
    return [Subset(f"n{n}-s{k}", chosen) for n in sweep["n_tasks"]
            for k, chosen in enumerate(draw(tasks, n, sweep["subsets"], sweep["seed"]), start=1)]


def proper_subsets(config: Config) -> list[Subset]:
    """The subsets the sweep computes under sweep/{subset}/: all but the one of every task."""
    return [s for s in subsets(config) if s.n_tasks < len(config["tasks"])]


def recomposed(params: dict[str, Any]) -> bool:
    """Whether the sweep builds a method (a `methods` entry's parameters) again on each subset: its registry entry
    says (merges and routers over the task LoRAs do)."""
    return method_of(params).recomposed


def recomposable(config: Config) -> list[str]:
    """The configured methods a sweep can recompose, in the config's order."""
    return [name for name in config["methods"] if recomposed(method_params(config, name))]


def swept_methods(config: Config, subset: Subset | None = None) -> list[str]:
    """The methods the sweep recomposes, in the config's order: those of `sweep.methods`, or (null) every one it can;
    on a `subset` of one task, not a token gate (over one expert it has nothing to choose)."""
    chosen = (config.get("sweep") or {}).get("methods")
    swept = [name for name in recomposable(config) if chosen is None or name in chosen]
    if subset is not None and subset.n_tasks == 1:
        return [name for name in swept if method_params(config, name)["method"] not in GATED_METHODS]
    return swept


def _restricted_entry(entry: dict[str, Any] | None, tasks: list[str], kept: tuple[str, ...]) -> dict[str, Any] | None:
    """A `methods` entry on the kept tasks: per-task weights (a list in the tasks' order, or task -> weight) cut to
    theirs."""
    weights = (entry or {}).get("weights")
    if weights is None:
        return entry
    if isinstance(weights, dict):
        return entry | {"weights": {task: weights[task] for task in kept}}
    return entry | {"weights": [w for task, w in zip(tasks, weights) if task in kept]}


def restrict(config: Config, subset: Subset) -> Config:
    """The experiment of one subset: its tasks, the methods the sweep recomposes, and (a proper subset) its name,
    by which ExperimentPaths.of puts its routers, compositions, evaluations and checkpoints under sweep/{name}/.
    `config` itself is left as it is."""
    tasks = list(config["tasks"])
    methods = {m: _restricted_entry(config["methods"][m], tasks, subset.tasks) for m in swept_methods(config, subset)}
    scoped = config | {"tasks": {t: config["tasks"][t] for t in subset.tasks}, "methods": methods}
    return scoped | {SUBSET: subset.name} if subset.n_tasks < len(tasks) else scoped


def on_subset(config: Config, name: str | None) -> Config:
    """`config`, or with a subset name (`--subset`) the experiment of that proper subset of its sweep."""
    if name is None:
        return config
    known = {s.name: s for s in subsets(config)}
    if name not in known:
        names = ", ".join(s.name for s in proper_subsets(config))
        raise MoaError(f"--subset {name}: not a subset of the config's sweep; "
                       + (f"its subsets are {names}" if names else "the config has no `sweep` with a proper subset"))
    if known[name].n_tasks == len(config["tasks"]):
        raise MoaError(f"--subset {name}: it holds every task, so it is the main experiment; run the step without "
                       "--subset")
    return restrict(config, known[name])


def write_tasks(path: str | Path, subset: Subset) -> None:
    """sweep/{subset}/tasks.json, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"subset": subset.name, "n_tasks": subset.n_tasks, "tasks": list(subset.tasks)},
                                  indent=2) + "\n")
