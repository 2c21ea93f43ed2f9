"""The lm-evaluation-harness tasks of every composition (lm_eval/{method}/, the lm-eval step): each task's metrics
with paired bootstrap intervals over its documents, and their differences to the references (moa and the oracle)
with Holm's correction, as the report does for moa's own tasks (moa.stats).

A figure is resampled from the harness's per-sample logs: the harness's aggregations that are functions of sums over
documents (mean, perplexity, weighted perplexity, bits per byte, weighted mean) are recomputed from each resample's
counts, and the one whose value on all documents equals the harness's own figure is the figure's aggregation. Any
other aggregation (corpus BLEU, F1, ...) keeps the harness's value without an interval, and a note says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moa.config import Config
from moa.io import read_json
from moa.layout import ExperimentPaths
from moa.metrics import harness_figures, harness_metric
from moa.report.uncertainty import references, resamples
from moa.roles import ORACLE
from moa.stats import interval, paired_differences, resample_counts, task_rng

FIGURE_COLUMNS = ["method", "task", "metric", "value", "lo", "hi", "n", "higher_is_better"]
MATCH = 1e-6  # relative: a recomputed figure is the harness's own

# aggregation -> (how the sums' ratio becomes the figure, whether a document logs a pair (value, weight))
Transform = Callable[[np.ndarray], np.ndarray]
AGGREGATIONS: dict[str, tuple[Transform, bool]] = {
    "mean": (lambda r: r, False),
    "perplexity": (lambda r: np.exp(-r), False),
    "weighted_mean": (lambda r: r, True),
    "weighted_perplexity": (lambda r: np.exp(-r), True),
    "bits_per_byte": (lambda r: -r / math.log(2), True),
}


@dataclass(frozen=True)
class Harness:
    figures: pd.DataFrame  # report/lm_eval.parquet (FIGURE_COLUMNS)
    comparisons: pd.DataFrame  # report/lm_eval_comparisons.parquet (moa.stats.paired_differences)
    notes: list[str]


def unmapped(config: Config) -> list[str]:
    """The harness tasks of evaluation.lm_eval without a moa task, which the oracle cannot serve."""
    settings = config["evaluation"]["lm_eval"]
    return [task for task in settings["tasks"] if task not in (settings["task_map"] or {})]


def harness_methods(config: Config) -> list[str]:
    """The compositions the lm-eval step runs on: every one, but the oracle where a harness task has no moa task."""
    if config["evaluation"]["lm_eval"] is None:
        return []
    return [m for m in config["methods"] if m != ORACLE or not unmapped(config)]


def _samples(path: str) -> list[dict]:
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _terms(values: Sequence[object], pair: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Each document's (numerator, denominator) of an aggregation's ratio of sums, or None where the logged values
    do not have its shape."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return None
    if pair:
        return (array[:, 0], array[:, 1]) if array.ndim == 2 and array.shape[1] == 2 else None
    if array.ndim != 1:
        return None
    defined = ~np.isnan(array)  # nanmean: a NaN document counts in neither sum
    return np.where(defined, array, 0.0), defined.astype(float)


def resampled(values: Sequence[object], reported: float, weights: np.ndarray) -> np.ndarray | None:
    """The figure on all documents and in each resample ([1 + B]), by the aggregation that gives the harness's
    `reported` value; None where none does."""
    for transform, pair in AGGREGATIONS.values():
        terms = _terms(values, pair)
        if terms is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            figure = transform((weights @ terms[0]) / (weights @ terms[1]))
        if math.isclose(figure[0], reported, rel_tol=MATCH, abs_tol=MATCH):
            return figure
    return None


def _read(config: Config, methods: Sequence[str]) -> tuple[dict[str, dict], list[str]]:
    """Each composition's results.json, and notes on those missing."""
    paths, results, notes = ExperimentPaths.of(config), {}, []
    for method in methods:
        path = paths.harness_results(method)
        if path.is_file():
            results[method] = read_json(path, f"rerun `moa lm-eval --method {method}`")
        else:
            notes.append(f"`{method}` has no harness results ({path.relative_to(paths.root)})")
    return results, notes


def read_harness(config: Config) -> Harness:
    """Every composition's harness figures with intervals, and the comparisons with the references."""
    methods = harness_methods(config)
    results, notes = _read(config, methods)
    if ORACLE in config["methods"] and ORACLE not in methods:
        notes.append(f"`{ORACLE}` ran no harness task: it serves each request with its task's LoRA, and "
                     f"{', '.join(unmapped(config))} has no moa task in evaluation.lm_eval.task_map")
    count = resamples(config, len(methods) - 1)
    figures: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    rows = []
    for task in dict.fromkeys(t for result in results.values() for t in result["results"]):
        by_method = {m: r for m, r in results.items() if task in r["results"]}
        documents = _documents(config, task, by_method, notes)
        weights = None
        for method, result in by_method.items():
            higher = result.get("higher_is_better", {}).get(task, {})
            for key, value in harness_figures(result["results"][task]).items():
                metric, (name, kept) = harness_metric(key), key.split(",", 1)
                row = {"method": method, "task": task, "metric": metric, "value": value, "lo": np.nan,
                       "hi": np.nan, "n": result.get("n-samples", {}).get(task, {}).get("effective", 0),
                       "higher_is_better": bool(higher.get(name, True))}
                logged = documents.get(method, {}).get(kept)
                if logged is not None:
                    if weights is None:
                        n = len(logged)
                        weights = np.vstack([np.ones(n), resample_counts(n, count, task_rng(config["seed"],
                                                                                              f"lm_eval/{task}"))])
                    figure = resampled([sample[name] for sample in logged], value, weights)
                    if figure is not None:
                        figures.setdefault((task, metric), {})[method] = figure
                        row |= dict(zip(("lo", "hi"), interval(figure[1:], config["report"]["alpha"]))) | {"n": len(logged)}
                    else:
                        notes.append(f"harness {task} {metric}: its aggregation is not a sum over documents, so it has "
                                     "no interval (the harness's value is shown)")
                rows.append(row)
    comparisons = paired_differences(figures, references(config), config["report"]["alpha"])
    return Harness(pd.DataFrame(rows, columns=FIGURE_COLUMNS), comparisons, list(dict.fromkeys(notes)))


def _documents(config: Config, task: str, results: Mapping[str, dict],
               notes: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Each composition's per-sample logs of `task` by filter, in the first one's document order; a composition
    whose documents differ (another limit, another task version) cannot be paired and is left out, with a note."""
    paths, logged = ExperimentPaths.of(config), {}
    for method in results:
        path = paths.harness_samples(method, task)
        if path.is_file():
            by_filter: dict[str, dict] = {}
            for sample in _samples(str(path)):
                by_filter.setdefault(sample.get("filter", "none"), {})[sample["doc_id"]] = sample
            logged[method] = by_filter
    if not logged:
        return {}
    first, reference = next(iter(logged.items()))
    documents = {}
    for method, by_filter in logged.items():
        if {f: d.keys() for f, d in by_filter.items()} != {f: d.keys() for f, d in reference.items()}:
            notes.append(f"`{method}` ran other documents of harness task {task} than `{first}`, so the two cannot "
                         f"be paired: rerun `moa lm-eval --method {method}` with the same evaluation.lm_eval")
            continue
        documents[method] = {f: [d[i] for i in reference[f]] for f, d in by_filter.items()}
    return documents
