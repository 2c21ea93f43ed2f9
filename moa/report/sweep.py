"""The task-count sweep's scores (report/sweep.parquet): each subset's multitask scores and their differences to a
reference, on the same subsets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import pandas as pd

from moa.config import Config
from moa.data.tasks import get_task
from moa.report.inputs import read_evaluations
from moa.report.uncertainty import references, resamples
from moa.roles import FLOOR, ORACLE
from moa.stats import Evaluated, bootstrap, comparisons, intervals
from moa.sweep import Subset, restrict, subsets, swept_methods

SWEEP_COLUMNS = ["method", "n_tasks", "subset", "tasks", "multitask_score", "lo", "hi", "reference", "difference",
                 "difference_lo", "difference_hi", "p", "p_holm", "significant"]


@dataclass(frozen=True)
class Sweep:
    table: pd.DataFrame  # sweep.parquet
    reference: str | None  # what each subset's methods are compared with
    notes: list[str]  # the methods a subset has no score of


def sweep_reference(config: Config) -> str | None:
    """What each subset's methods are compared with: the first reference (report.compare_to, by default moa) that
    the sweep recomposes."""
    swept = swept_methods(config)
    return next((r for r in references(config) if r in swept), None)


def subset_scores(config: Config, subset: Subset, evaluations: Mapping[tuple[str, str], Evaluated],
                  reference: str | None) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One subset's rows of sweep.parquet: the multitask score of base and of every recomposed method over the
    subset's tasks with signal, normalized by the main oracle's evaluations, with its interval and its paired
    difference to the reference's (Holm over the subset's methods); and the methods without a score, with the
    tasks they lack."""
    settings, scoped = config["report"], restrict(config, subset)
    reused = {(m, t): e for (m, t), e in evaluations.items() if m in (FLOOR, ORACLE) and t in subset.tasks}
    methods = [m for m in (ORACLE, FLOOR) if m in config["methods"]] + list(scoped["methods"])
    tasks = {t: get_task(config, t).metrics for t in subset.tasks}
    result = bootstrap(reused | read_evaluations(scoped), methods, tasks, resamples(config, len(methods) - 1),
                       config["seed"], settings["alpha"])
    # the multitask scores alone (not the oracle's, 1 by definition): the figures and the Holm family of the sweep
    scored = replace(result, metrics={}, normalized={},
                     multitask={m: v for m, v in result.multitask.items() if m != ORACLE})
    scores = intervals(scored, settings["alpha"]).rename(columns={"value": "multitask_score"})
    differences = comparisons(scored, [reference] if reference else [], settings["alpha"])
    table = scores[["method", "multitask_score", "lo", "hi"]].merge(
        differences[["method", "difference", "lo", "hi", "p", "p_holm", "significant"]].rename(
            columns={"lo": "difference_lo", "hi": "difference_hi"}), on="method", how="left")
    table = table.assign(n_tasks=subset.n_tasks, subset=subset.name, tasks=",".join(subset.tasks), reference=reference)
    return table.astype({"significant": "boolean"})[SWEEP_COLUMNS], result.missing


def sweep_scores(config: Config, evaluations: Mapping[tuple[str, str], Evaluated]) -> Sweep:
    """Every subset's rows (subset_scores), and notes on the methods a subset has no score of."""
    reference, frames, notes = sweep_reference(config), [], []
    for subset in subsets(config):
        table, missing = subset_scores(config, subset, evaluations, reference)
        frames.append(table)
        notes += [f"`{m}` has no multitask score on sweep subset {subset.name}: no evaluation on {', '.join(tasks)}"
                  for m, tasks in missing.items()]
    empty = pd.DataFrame(columns=SWEEP_COLUMNS).astype({"significant": "boolean"})
    return Sweep(pd.concat(frames, ignore_index=True) if frames else empty, reference, notes)
