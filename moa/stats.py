"""The report's uncertainty: a paired bootstrap over each task's test items (Koehn 2004; Dror et al. 2018).

Every resample draws a task's test items with replacement, the same draw for every method (the comparison
is paired), and recomputes every figure inside it: each method's metrics from its per-example statistics
(moa.metrics.aggregate, so a resample's corpus BLEU is sacrebleu's corpus BLEU of the drawn items), its
oracle-normalized scores and its multitask score, normalizing inside the resample as the point estimate
does. Percentile intervals and two-sided p-values of paired differences follow from the resampled
values; Holm's correction controls the family-wise error over the methods compared with one reference.

All of it is array arithmetic over [1 + resamples] values per figure, index 0 being the test set itself:
no metric library runs per resample.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from moa.errors import MoaError
from moa.metrics import METRICS, Statistics, aggregate
from moa.roles import FLOOR, ORACLE

ALL_TASKS = "all"  # the `task` of the multitask score's rows
MULTITASK, NORMALIZED = "multitask_score", "normalized"  # `metric` of the multitask and normalized rows
POWER = 0.8  # of the smallest detectable difference


# --- the statistics of one resampled figure ------------------------------------------------------------


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n]: how often each of n items is drawn in each resample of n draws with replacement."""
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(float)


MIN_RESAMPLES = 1000
P_FLOOR_SHARE = 10  # the smallest attainable Holm-adjusted p is at most alpha / P_FLOOR_SHARE


def resamples_for(compared: int, alpha: float) -> int:
    """Resamples B for `compared` methods tested against one reference at `alpha`: no p-value is below
    2 / (B + 1) and Holm multiplies the smallest by `compared`, so B + 1 >= 2 * compared * P_FLOOR_SHARE / alpha
    keeps that floor at alpha / P_FLOOR_SHARE, far from the threshold; at least MIN_RESAMPLES."""
    return max(MIN_RESAMPLES, math.ceil(2 * max(compared, 1) * P_FLOOR_SHARE / alpha) - 1)


def interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    """The (1 - alpha) percentile interval of the resampled values (NaN ones, undefined, left out)."""
    defined = samples[~np.isnan(samples)]
    if not len(defined):
        return np.nan, np.nan
    lo, hi = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of a paired difference from its resampled values (Koehn 2004's paired bootstrap,
    both tails): twice the share of resamples on the far side of zero, ties counted on both sides, with
    the +1 that keeps the test valid for few resamples. 1 when every resample ties (identical systems);
    2 / (B + 1) when every resample favours one side."""
    defined = differences[~np.isnan(differences)]
    if not len(defined):
        return np.nan
    tail = min(int((defined <= 0).sum()), int((defined >= 0).sum()))
    return min(1.0, 2 * (1 + tail) / (len(defined) + 1))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1), made monotone and
    capped at 1, so rejecting where adjusted p < alpha keeps the family-wise error at alpha. NaN stays
    NaN and does not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    scaled = p[order] * (len(order) - np.arange(len(order)))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def detectable_difference(differences: np.ndarray, alpha: float, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `alpha` detects with `power`, given the spread of
    the resampled differences: (z_{1-alpha/2} + z_power) x their standard deviation."""
    defined = differences[~np.isnan(differences)]
    if len(defined) < 2:
        return np.nan
    z = NormalDist().inv_cdf
    return float((z(1 - alpha / 2) + z(power)) * defined.std(ddof=1))


# --- the experiment's bootstrap -------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    """One method's evaluation on one task: the test rows' ids and the per-example statistics."""

    ids: np.ndarray
    stats: Statistics


@dataclass(frozen=True)
class Bootstrap:
    """Every figure of the report on the test sets (index 0) and in each paired resample (1..B)."""

    metrics: dict[tuple[str, str, str], np.ndarray]  # (method, task, metric) -> [1 + B]
    normalized: dict[tuple[str, str], np.ndarray]  # (method, signal task) -> representative metric / oracle's
    multitask: dict[str, np.ndarray]  # method -> mean of its normalized scores over the signal tasks
    items: dict[str, int]  # task -> test items
    excluded: dict[str, str]  # task -> why it carries no signal (left out of the multitask score)
    missing: dict[str, list[str]]  # method -> the signal tasks it was not evaluated on (no multitask score)


def task_rng(seed: int, task: str) -> np.random.Generator:
    """A task's resamples depend only on the seed, the task's name and its test size: adding a method or a
    task changes no other figure."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def _aligned(task: str, evaluated: Mapping[str, Evaluated]) -> dict[str, Statistics]:
    """Each method's statistics in the first method's item order; items that differ cannot be paired."""
    (first, reference), *others = evaluated.items()
    position = {item: i for i, item in enumerate(reference.ids.tolist())}
    aligned = {first: reference.stats}
    for method, other in others:
        ids = other.ids.tolist()
        if len(ids) != len(position) or set(ids) != position.keys():
            differ = len(set(ids) ^ position.keys())
            raise MoaError(f"`{method}` was evaluated on other test rows of {task} than `{first}` ({differ} ids "
                           f"differ), so the two cannot be paired; rerun `moa evaluate --method {method} --task "
                           f"{task}` (and `{first}`) on the same data")
        order = np.argsort([position[item] for item in ids])
        aligned[method] = {name: values[order] for name, values in other.stats.items()}
    return aligned


def _ratio(values: np.ndarray, oracle: np.ndarray, metric: str) -> np.ndarray:
    """The method's metric relative to the oracle's (inverted where lower is better); NaN where the
    ratio is undefined (an oracle at 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = values / oracle if METRICS[metric].higher_is_better else oracle / values
    return np.where(np.isfinite(ratio), ratio, np.nan)


def no_signal(metrics: Mapping[tuple[str, str, str], np.ndarray], task: str, metric: str,
              alpha: float) -> str | None:
    """Why a task carries no signal for the multitask score, or None if it does: the oracle must beat the
    base model on the representative metric beyond the interval of their paired difference (where base
    was not evaluated: beyond zero), else normalizing by the oracle divides noise by noise, or by zero."""
    oracle = metrics.get((ORACLE, task, metric))
    if oracle is None:
        return "the oracle was not evaluated on it"
    sign = 1 if METRICS[metric].higher_is_better else -1
    base = metrics.get((FLOOR, task, metric))
    if base is None:
        lo, hi = interval(sign * oracle[1:], alpha) if sign > 0 else (np.inf, np.inf)  # a perplexity is > 0
        return None if lo > 0 else f"base was not evaluated and the oracle's interval reaches 0 [{lo:.4g}, {hi:.4g}]"
    lo, hi = interval(sign * (oracle[1:] - base[1:]), alpha)
    if lo > 0:
        return None
    return (f"the oracle ({oracle[0]:.4g}) is not above base ({base[0]:.4g}) beyond the {1 - alpha:.0%} "
            f"interval of their difference [{sign * lo:.4g}, {sign * hi:.4g}]")


def bootstrap(evaluations: Mapping[tuple[str, str], Evaluated], methods: Sequence[str],
              tasks: Mapping[str, Sequence[str]], resamples: int, seed: int, alpha: float) -> Bootstrap:
    """The paired bootstrap of `methods` (in order) on `tasks` (task -> its metrics, representative first),
    from the evaluations there are; a method or task without evaluations is left out."""
    metrics: dict[tuple[str, str, str], np.ndarray] = {}
    items: dict[str, int] = {}
    for task, names in tasks.items():
        evaluated = {m: evaluations[m, task] for m in methods if (m, task) in evaluations}
        if not evaluated:
            continue
        aligned = _aligned(task, evaluated)
        items[task] = n = len(next(iter(evaluated.values())).ids)
        weights = np.vstack([np.ones(n), resample_counts(n, resamples, task_rng(seed, task))])
        for method, stats in aligned.items():
            metrics |= {(method, task, metric): aggregate(metric, stats, weights) for metric in names}
    representative = {task: names[0] for task, names in tasks.items()}
    excluded = {task: why for task, metric in representative.items() if (why := no_signal(metrics, task, metric, alpha))}
    signal = [task for task in tasks if task not in excluded]
    normalized = {(m, t): _ratio(metrics[m, t, representative[t]], metrics[ORACLE, t, representative[t]],
                                 representative[t])
                  for m in methods for t in signal if (m, t, representative[t]) in metrics}
    missing = {m: [t for t in signal if (m, t) not in normalized] for m in methods}
    multitask = {m: np.mean([normalized[m, t] for t in signal], axis=0) for m in methods
                 if signal and not missing[m]}
    return Bootstrap(metrics, normalized, multitask, items, excluded, {m: t for m, t in missing.items() if t})


def _figures(result: Bootstrap) -> dict[tuple[str, str, str], tuple[np.ndarray, int]]:
    """Every figure with an interval: metrics, normalized scores, multitask scores, and its n (items, or
    tasks averaged for a multitask score)."""
    signal = len(result.items.keys() - result.excluded.keys())
    return ({key: (values, result.items[key[1]]) for key, values in result.metrics.items()}
            | {(m, t, NORMALIZED): (values, result.items[t]) for (m, t), values in result.normalized.items()}
            | {(m, ALL_TASKS, MULTITASK): (values, signal) for m, values in result.multitask.items()})


def intervals(result: Bootstrap, alpha: float) -> pd.DataFrame:
    """report/intervals.parquet: method, task, metric, value (on the test set), lo, hi (the 1 - alpha
    percentile interval), n."""
    rows = [{"method": m, "task": t, "metric": k, "value": float(values[0]),
             **dict(zip(("lo", "hi"), interval(values[1:], alpha))), "n": n}
            for (m, t, k), (values, n) in _figures(result).items()]
    return pd.DataFrame(rows, columns=["method", "task", "metric", "value", "lo", "hi", "n"])


def comparisons(result: Bootstrap, references: Sequence[str], alpha: float) -> pd.DataFrame:
    """report/comparisons.parquet: for every method and reference, the paired difference (method minus
    reference) of the multitask score and of each task's normalized score, with its interval, two-sided
    p-value, Holm-adjusted p-value (over the methods compared with that reference on that figure), whether
    it is significant at alpha after Holm, and the smallest difference detectable at this test size."""
    by_figure: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for (method, task, metric), (values, _) in _figures(result).items():
        if metric in (NORMALIZED, MULTITASK):
            by_figure.setdefault((task, metric), {})[method] = values
    return paired_differences(by_figure, references, alpha)


def paired_differences(by_figure: Mapping[tuple[str, str], Mapping[str, np.ndarray]], references: Sequence[str],
                       alpha: float) -> pd.DataFrame:
    """Every method minus each reference on each (task, metric) figure, from their values on the test items
    (index 0) and in each paired resample: the difference, its interval, p, Holm's p over the methods compared with
    that reference on that figure, significance at alpha, and the smallest detectable difference."""
    rows = []
    for (task, metric), values in by_figure.items():
        for reference in (r for r in references if r in values):
            for method in (m for m in values if m != reference):
                differences = values[method] - values[reference]
                lo, hi = interval(differences[1:], alpha)
                rows.append({"method": method, "reference": reference, "task": task, "metric": metric,
                             "difference": float(differences[0]), "lo": lo, "hi": hi, "p": p_value(differences[1:]),
                             "detectable": detectable_difference(differences[1:], alpha)})
    table = pd.DataFrame(rows, columns=["method", "reference", "task", "metric", "difference", "lo", "hi", "p",
                                        "detectable"])
    table.insert(8, "p_holm", table.groupby(["reference", "task", "metric"])["p"].transform(holm))
    table.insert(9, "significant", table["p_holm"] < alpha)
    return table
