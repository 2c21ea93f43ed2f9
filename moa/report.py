"""The report step: results/{experiment}/report/ holds every evaluation in one long table (metrics.parquet), the
paired bootstrap's intervals and comparisons (intervals.parquet, comparisons.parquet, see moa.stats), the routing
of the evaluated test prompts (routing.parquet), the summary with its verdict (summary.md) and PNG plots.

Any input may be missing (a step not run yet, a failed job): what it would have fed is skipped or shown
as "–", and the summary's notes say so, so a partial report is still a report.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from moa.compose.registry import Kind, method_of
from moa.config import Config, method_params
from moa.data.tasks import get_task
from moa.implicit import ALL, EVERY_LAYER, summarize
from moa.io import atomic_dir, read_json
from moa.layout import ADAPTER_WEIGHTS, MIXED, ROUTER_CONFIG, TRAIN_LOG, ExperimentPaths, Plot
from moa.lora.peft_io import load_adapter
from moa.metrics import FORMAT_ADHERENCE, ROUTER_ACCURACY, read_statistics
from moa.plots import (
    label,
    placeholder,
    plot_confusion,
    plot_cosine,
    plot_differences,
    plot_format_adherence,
    plot_implicit,
    plot_layer_accuracy,
    plot_multitask,
    plot_scores,
    plot_sweep,
    plot_train_loss,
)
from moa.stats import (
    ALL_TASKS,
    BASE,
    MULTITASK,
    NORMALIZED,
    ORACLE,
    POWER,
    Bootstrap,
    Evaluated,
    bootstrap,
    comparisons,
    intervals,
)
from moa.sweep import Subset, restrict, subsets, swept_methods
from moa.tracking import COMPARISON_TABLE, StepResult

COLUMNS = ["method", "task", "metric", "value", "n"]
ROUTING_COLUMNS = ["method", "task", "chosen", "count"]
DPI = 120
DEFAULT_REFERENCES = ("moa", ORACLE)  # report.compare_to: null
SCORE_NOTE = ("Task metrics on a 0–100 scale (perplexity: lower is better). Multitask score: the mean over the tasks "
              "with signal of the method's representative metric (the first of each task) divided by the oracle's "
              "(inverted for perplexity); oracle = 1.000, base is the floor.")
IMPLICIT_NOTE = ("An exact merge adds every task's update at once. Implicit routing accuracy: how often the true "
                 "task's component moves a sequence's hidden states most (the largest share of the summed "
                 "||w_i s_i B_i A_i x|| over every LoRA module), over its prompt and over its generated tokens "
                 "(a scored task: its reference), in %; chance is 100/N. MoA's router accuracy on the same test "
                 "prompts for comparison. Per layer: implicit_routing.png and report/implicit_routing.parquet.")


def references(config: Config) -> list[str]:
    """The methods every other is compared with: report.compare_to, or moa and the oracle where configured."""
    return config["report"]["compare_to"] or [m for m in DEFAULT_REFERENCES if m in config["methods"]]


def kinds(config: Config) -> dict[str, Kind]:
    return {m: method_of(method_params(config, m)).kind for m in config["methods"]}


# --- adapter similarity ------------------------------------------------------------------------------


def _factors(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A [r, in], B [out, r]) in float64, so near-orthogonal adapters do not round to noise."""
    return {key.removesuffix(".lora_A.weight"): (a.double(), state[key.replace(".lora_A.", ".lora_B.")].double())
            for key, a in state.items() if key.endswith(".lora_A.weight")}


def _inner(x: Mapping[str, tuple[Tensor, Tensor]], y: Mapping[str, tuple[Tensor, Tensor]]) -> float:
    """sum over modules of <B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)): r x r products, no out x in matrix.
    A module only one adapter targets is zero in the other's vector and adds nothing."""
    total = 0.0
    for module in x.keys() & y.keys():
        (a1, b1), (a2, b2) = x[module], y[module]
        total += ((b1.T @ b2) * (a2 @ a1.T).T).sum().item()
    return total


def adapter_cosine(states: Sequence[Mapping[str, Tensor]], scalings: Sequence[float]) -> np.ndarray:
    """Cosine similarity between the adapters' full updates dW_i = s_i B_i A_i, all modules as one vector."""
    factors = [_factors(state) for state in states]
    gram = np.zeros((len(states), len(states)))
    for i, j in itertools.combinations_with_replacement(range(len(states)), 2):
        gram[i, j] = gram[j, i] = scalings[i] * scalings[j] * _inner(factors[i], factors[j])
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero (untrained) adapter has no direction
        return gram / np.outer(norms, norms)


# --- inputs ------------------------------------------------------------------------------------------


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


def _parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def task_adapter_cosine(config: Config) -> tuple[list[str], np.ndarray] | None:
    """The trained task adapters (at least two) and their cosine matrix."""
    dirs = [ExperimentPaths.of(config).adapter(task) for task in config["tasks"]]
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


# --- what the report computes --------------------------------------------------------------------------


class Uncertainty:
    """The bootstrap of one report and its two tables, with the lookups the summary and plots need."""

    def __init__(self, config: Config, evaluations: Mapping[tuple[str, str], Evaluated]) -> None:
        settings = config["report"]
        self.alpha = settings["alpha"]
        self.methods = list(config["methods"])
        specs = [get_task(config, task) for task in config["tasks"]]
        self.tasks = {task.name: task.metrics for task in specs}
        self.formats = {task.name: task.format.rule for task in specs if task.format}  # the tasks with a check
        self.resamples = settings["bootstrap"]["resamples"]
        self.references = references(config)
        self.result: Bootstrap = bootstrap(evaluations, self.methods, {t.name: t.evaluated_metrics for t in specs},
                                           self.resamples, config["seed"], self.alpha)
        self.intervals = intervals(self.result, self.alpha)
        self.comparisons = comparisons(self.result, self.references, self.alpha)
        self._figures = self.intervals.set_index(["method", "task", "metric"])
        self._compared = self.comparisons.set_index(["method", "reference", "task", "metric"])

    @property
    def confidence(self) -> float:
        return 1 - self.alpha

    @property
    def signal(self) -> list[str]:
        return [t for t in self.tasks if t in self.result.items and t not in self.result.excluded]

    def figure(self, method: str, task: str, metric: str) -> pd.Series | None:
        key = (method, task, metric)
        return self._figures.loc[key] if key in self._figures.index else None

    def compared(self, method: str, reference: str, task: str = ALL_TASKS,
                 metric: str = MULTITASK) -> pd.Series | None:
        key = (method, reference, task, metric)
        return self._compared.loc[key] if key in self._compared.index else None

    def multitask(self) -> pd.DataFrame:
        """Methods with a multitask score, best first: value, lo, hi."""
        rows = self.intervals[self.intervals["metric"] == MULTITASK].set_index("method")[["value", "lo", "hi"]]
        return rows.sort_values("value", ascending=False, kind="stable")

    def normalized(self) -> pd.DataFrame:
        """Methods x tasks: the oracle-normalized score on the test set (NaN where there is none)."""
        return self._methods_by_tasks(NORMALIZED, list(self.tasks))

    def adherence(self) -> pd.DataFrame:
        """Methods x tasks with a format check: the format adherence on the test set (NaN where not evaluated)."""
        return self._methods_by_tasks(FORMAT_ADHERENCE, list(self.formats))

    def _methods_by_tasks(self, metric: str, tasks: list[str]) -> pd.DataFrame:
        rows = self.intervals[self.intervals["metric"] == metric]
        return rows.pivot(index="method", columns="task", values="value").reindex(index=self.methods, columns=tasks)

    def resolution(self) -> str | None:
        """Why no comparison can be significant, if so: the smallest bootstrap p-value is 2 / (B + 1), and Holm
        multiplies the smallest of m by m."""
        family = self.comparisons.groupby(["reference", "task", "metric"]).size().max() if len(self.comparisons) else 0
        if family * 2 / (self.resamples + 1) < self.alpha:
            return None
        needed = int(np.ceil(2 * family / self.alpha))
        return (f"with {self.resamples} resamples no p-value is below {2 / (self.resamples + 1):.4f}, so after Holm "
                f"over {family} methods no difference can be significant at alpha {self.alpha:g}: raise "
                f"report.bootstrap.resamples to at least {needed}")

    def tasks_used(self) -> str:
        """Which tasks the multitask score averages, in words."""
        if not self.signal:
            return "cannot be computed: no task carries signal"
        left_out = f"; left out: {', '.join(self.result.excluded)}" if self.result.excluded else ""
        return f"over {', '.join(self.signal)}{left_out}"


# --- the task-count sweep ------------------------------------------------------------------------------

SWEEP_COLUMNS = ["method", "n_tasks", "subset", "tasks", "multitask_score", "lo", "hi", "reference", "difference",
                 "difference_lo", "difference_hi", "p", "p_holm", "significant"]


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
    reused = {(m, t): e for (m, t), e in evaluations.items() if m in (BASE, ORACLE) and t in subset.tasks}
    methods = [m for m in (ORACLE, BASE) if m in config["methods"]] + list(scoped["methods"])
    tasks = {t: get_task(config, t).metrics for t in subset.tasks}
    result = bootstrap(reused | read_evaluations(scoped), methods, tasks, settings["bootstrap"]["resamples"],
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


def sweep_scores(config: Config, evaluations: Mapping[tuple[str, str], Evaluated]) -> tuple[pd.DataFrame, list[str]]:
    """report/sweep.parquet: every subset's rows (subset_scores); notes on the methods a subset has no score of."""
    reference, frames, notes = sweep_reference(config), [], []
    for subset in subsets(config):
        table, missing = subset_scores(config, subset, evaluations, reference)
        frames.append(table)
        notes += [f"`{m}` has no multitask score on sweep subset {subset.name}: no evaluation on {', '.join(tasks)}"
                  for m, tasks in missing.items()]
    empty = pd.DataFrame(columns=SWEEP_COLUMNS).astype({"significant": "boolean"})
    return pd.concat(frames, ignore_index=True) if frames else empty, notes


# --- the summary ---------------------------------------------------------------------------------------


def _fmt(value: object, digits: int, sign: bool = False) -> str:
    if value is None or not np.isfinite(float(value)):
        return "–"
    return format(float(value), f"{'+' if sign else ''}.{digits}f").replace("-", "−")


def _with_interval(row: pd.Series | None, digits: int, sign: bool = False, value: str = "value") -> str:
    if row is None or not np.isfinite(row[value]):
        return "–"
    return f"{_fmt(row[value], digits, sign)} [{_fmt(row['lo'], digits, sign)}, {_fmt(row['hi'], digits, sign)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """First column left-aligned (names), the rest right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def score_table(config: Config, metrics: pd.DataFrame, uncertainty: Uncertainty) -> list[str]:
    """Every task metric of every method with its interval, and the multitask score."""
    columns = [(task, metric) for task, names in uncertainty.tasks.items() for metric in names]
    values = metrics.drop_duplicates(["method", "task", "metric"]).set_index(["method", "task", "metric"])["value"]
    header = ["method", *(f"{task} {label(metric)}" for task, metric in columns), "multitask score"]

    def cell(method: str, task: str, metric: str) -> str:
        row = uncertainty.figure(method, task, metric)
        return _with_interval(row, 2) if row is not None else _fmt(values.get((method, task, metric)), 2)

    rows = [[method, *(cell(method, *c) for c in columns), _with_interval(uncertainty.figure(method, ALL_TASKS,
                                                                                               MULTITASK), 3)]
            for method in config["methods"]]
    return markdown_table(header, rows)


def format_section(uncertainty: Uncertainty, brackets: str) -> list[str]:
    """Each method's format adherence on every task with a check, with its interval; the checks in words."""
    tasks = list(uncertainty.formats)
    unchecked = [task for task in uncertainty.tasks if task not in uncertainty.formats]
    lines = [(f"- Without a check: {', '.join(unchecked)} (a task scored by perplexity generates nothing to check; "
              "a custom task is checked only with a `format`).")] if unchecked else []
    if not tasks:
        return ["No task has a format check.", "", *lines]
    rows = [[method, *(_with_interval(uncertainty.figure(method, t, FORMAT_ADHERENCE), 1) for t in tasks)]
            for method in uncertainty.methods]
    return [*markdown_table(["method", *tasks], rows), "",
            "Share of each task's generated outputs that are in the task's format (0–100), whether right or wrong. "
            + brackets + " The checks:", "", *(f"- {task}: {rule}." for task, rule in uncertainty.formats.items()),
            *lines]


def _difference(row: pd.Series | None, digits: int = 3) -> str:
    """A paired difference, its interval and Holm-adjusted p; bold where significant."""
    if row is None:
        return "–"
    text = f"{_with_interval(row, digits, sign=True, value='difference')}, p {_fmt(row['p_holm'], 3)}"
    return f"**{text}**" if row["significant"] else text


def multitask_table(uncertainty: Uncertainty) -> list[str]:
    scores = uncertainty.multitask()
    header = ["method", "multitask score", f"{uncertainty.confidence:.0%} interval",
              *(f"minus `{r}` (p Holm)" for r in uncertainty.references)]
    rows = [[f"`{m}`", _fmt(row["value"], 3), f"[{_fmt(row['lo'], 3)}, {_fmt(row['hi'], 3)}]",
             *(_difference(uncertainty.compared(m, r)) for r in uncertainty.references)]
            for m, row in scores.iterrows()]
    rows += [[f"`{m}`", "–", "–", *("–" for _ in uncertainty.references)] for m in uncertainty.methods
             if m not in scores.index]
    return markdown_table(header, rows)


def per_task_table(uncertainty: Uncertainty, reference: str) -> list[str]:
    """Each method's normalized score minus the reference's, per task with signal."""
    header = ["method", *uncertainty.signal]
    rows = [[f"`{m}`", *(_difference(uncertainty.compared(m, reference, t, NORMALIZED), 2) for t in uncertainty.signal)]
            for m in uncertainty.methods if m != reference]
    return markdown_table(header, rows)


def _names(methods: Sequence[str]) -> str:
    return ", ".join(f"`{m}`" for m in methods) or "none"


def verdict(uncertainty: Uncertainty, kinds: Mapping[str, Kind]) -> list[str]:
    """The answer in words: which merges are indistinguishable from each reference (alpha, after Holm), the
    best merge and its gap, where the first reference matters per task, and what the test sizes can detect."""
    result, alpha = uncertainty.result, uncertainty.alpha
    if not uncertainty.signal:
        return [("No task carries signal (on none does the oracle beat base beyond the interval of their difference; "
                 "each task's reason is under Multitask score), so there is no multitask score and nothing to decide.")]
    if not result.multitask:
        return [(f"No method was evaluated on every task with signal ({', '.join(uncertainty.signal)}): nothing to "
                 "decide.")]
    merges = [m for m in uncertainty.multitask().index if kinds[m] == Kind.MERGE]
    sizes = sorted({result.items[t] for t in uncertainty.signal})
    span = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    first = (f"- Multitask score {uncertainty.tasks_used()} ({span} test items per task, {uncertainty.resamples} "
             f"paired resamples); alpha {alpha:g}, Holm-corrected over the methods compared with each reference.")
    lines = [first]
    if not merges:
        return lines + ["- No merge was evaluated on every task with signal."]
    for reference in uncertainty.references:
        rows = {m: uncertainty.compared(m, reference) for m in merges}
        rows = {m: row for m, row in rows.items() if row is not None}
        if not rows:
            lines.append(f"- `{reference}` has no multitask score: no comparison with it.")
            continue
        same = [m for m, row in rows.items() if not row["significant"]]
        worse = [f"`{m}` ({_with_interval(row, 3, True, 'difference')})" for m, row in rows.items()
                 if row["significant"] and row["difference"] < 0]
        better = [f"`{m}` ({_with_interval(row, 3, True, 'difference')})" for m, row in rows.items()
                  if row["significant"] and row["difference"] > 0]
        lines.append(f"- **Merges vs `{reference}`**: indistinguishable: {_names(same)}; worse: "
                     f"{', '.join(worse) or 'none'}; better: {', '.join(better) or 'none'}.")
    best = merges[0]
    lines.append(f"- **Best merge**: `{best}`, {_with_interval(uncertainty.figure(best, ALL_TASKS, MULTITASK), 3)}"
                 + "".join(f"; minus `{r}`: {_difference(uncertainty.compared(best, r))}"
                           for r in uncertainty.references if uncertainty.compared(best, r) is not None) + ".")
    lines += _per_task_verdict(uncertainty, merges)
    lines += _detectable_verdict(uncertainty, merges)
    return lines


def _per_task_verdict(uncertainty: Uncertainty, merges: Sequence[str]) -> list[str]:
    if not uncertainty.references:
        return []
    reference, parts = uncertainty.references[0], []
    for task in uncertainty.signal:
        rows = {m: uncertainty.compared(m, reference, task, NORMALIZED) for m in merges}
        rows = {m: r for m, r in rows.items() if r is not None}
        if not rows:
            continue
        below = [m for m, r in rows.items() if r["significant"] and r["difference"] < 0]
        above = [m for m, r in rows.items() if r["significant"] and r["difference"] > 0]
        if below or above:
            worst = min(rows, key=lambda m: rows[m]["difference"])
            parts.append(f"{task}: {len(below)} of {len(rows)} merges below, {len(above)} above (largest gap "
                         f"`{worst}` {_fmt(rows[worst]['difference'], 2, True)})")
        else:
            detectable = np.nanmedian([r["detectable"] for r in rows.values()])
            parts.append(f"{task}: no merge differs (detectable: about {_fmt(detectable, 2)})")
    return [f"- **Per task, merges vs `{reference}`** (normalized score): {'; '.join(parts)}."] if parts else []


def _detectable_verdict(uncertainty: Uncertainty, merges: Sequence[str]) -> list[str]:
    sizes = []
    for reference in uncertainty.references:
        detectable = [row["detectable"] for m in merges if (row := uncertainty.compared(m, reference)) is not None]
        if detectable:
            sizes.append(f"{_fmt(np.nanmedian(detectable), 3)} to `{reference}`")
    if not sizes:
        return []
    text = (f"- **What these test sizes can decide**: a multitask difference smaller than about {', '.join(sizes)} "
            f"(median over the merges of (z_{{1-alpha/2}} + z_{POWER:g}) x the bootstrap standard error of the "
            f"difference: {POWER:.0%} power, before Holm) is likely to be missed, so \"indistinguishable\" means "
            "that no difference of about that size was shown, not that the methods are equal.")
    return [text]


def _held(rows: pd.DataFrame) -> str:
    """Up to how many tasks one method stays indistinguishable from the reference (its rows of sweep.parquet): the
    largest size at and below which no subset differs significantly; then the largest difference at the next size."""
    sizes = sorted(rows["n_tasks"].unique())
    for i, n in enumerate(sizes):
        differing = rows[(rows["n_tasks"] == n) & rows["significant"].fillna(False)]
        if len(differing):
            row = differing.loc[differing["difference"].abs().idxmax()]
            held = f"up to {sizes[i - 1]} tasks" if i else "at no size swept"
            return (f"{held}; at {n}, {row['subset']} is {'worse' if row['difference'] < 0 else 'better'}: "
                    f"{_fmt(row['difference'], 3, True)} [{_fmt(row['difference_lo'], 3, True)}, "
                    f"{_fmt(row['difference_hi'], 3, True)}], p {_fmt(row['p_holm'], 3)}")
    return f"at every size swept (up to {sizes[-1]} tasks)"


def sweep_verdict(sweep: pd.DataFrame, reference: str | None, alpha: float) -> list[str]:
    """The verdict's sweep lines: per recomposed method, up to how many tasks it stays indistinguishable from the
    reference on the same subsets."""
    if reference is None:
        return [("- **Task-count sweep**: the sweep recomposes no reference (report.compare_to, by default `moa`): "
                 "nothing to compare with.")]
    compared = sweep[sweep["difference"].notna() & (sweep["method"] != BASE)]
    if not len(compared):
        return [f"- **Task-count sweep**: no subset has multitask scores of `{reference}` and another method."]
    sizes = ", ".join(str(n) for n in sorted(sweep["n_tasks"].unique()))
    head = (f"- **Task-count sweep, each method vs `{reference}` on the same subsets** (sizes {sizes}): a method stays "
            f"indistinguishable up to the largest size at and below which no subset differs significantly (alpha "
            f"{alpha:g}, Holm over the methods of each subset):")
    return [head] + [f"  - `{method}`: {_held(rows)}" for method, rows in compared.groupby("method", sort=False)]


def sweep_table(sweep: pd.DataFrame) -> list[str]:
    """Methods x sizes: the mean multitask score over the subsets of that size, and their range."""
    sizes = sorted(sweep["n_tasks"].unique())
    cells = sweep.groupby(["method", "n_tasks"], sort=False)["multitask_score"].agg(["mean", "min", "max", "size"])

    def cell(method: str, n: int) -> str:
        if (method, n) not in cells.index:
            return "–"
        row = cells.loc[method, n]
        spread = f" ({_fmt(row['min'], 3)}–{_fmt(row['max'], 3)})" if row["size"] > 1 else ""
        return f"{_fmt(row['mean'], 3)}{spread}"

    methods = list(dict.fromkeys(sweep["method"]))
    return markdown_table(["method", *(f"{n} tasks" for n in sizes)],
                          [[f"`{m}`", *(cell(m, n) for n in sizes)] for m in methods])


def sweep_section(config: Config, sweep: pd.DataFrame) -> list[str]:
    note = ("Each cell: the mean multitask score over the subsets of that many tasks (their range across the subsets "
            "in parentheses); base and the oracle are the main experiment's evaluations, and the subset of every task is "
            f"the main experiment itself. Each subset's interval and difference to `{sweep_reference(config)}` are in "
            f"{ExperimentPaths.of(config).report_sweep.name}.")
    return ["", "## Task-count sweep", "", *sweep_table(sweep), "", note]


COST_METRICS = {"new_tokens_per_s": ("generated tokens/s", 1), "decode_tokens_per_s": ("decoding tokens/s", 1),
                "prompt_tokens_per_s": ("prefill tokens/s", 0),
                "shared_prefix_pct": ("prompt tokens from a shared prefix (%)", 1),
                "latency_s": ("latency per sequence (s)", 2),
                ROUTER_ACCURACY: ("router accuracy (%)", 2)}


def cost_table(config: Config, metrics: pd.DataFrame) -> list[str]:
    """What each method costs at decoding and how well MoA routes: the throughputs are the whole mixed-task
    stream's (the same for every task), latency and routing accuracy the means over the generated tasks."""
    means = metrics[metrics["metric"].isin(list(COST_METRICS))].groupby(["method", "metric"])["value"].mean()
    rows = [[method, *(_fmt(means.get((method, m)), digits) for m, (_, digits) in COST_METRICS.items())]
            for method in config["methods"]]
    return markdown_table(["method", *(name for name, _ in COST_METRICS.values())], rows)


def router_summary(evaluation: pd.DataFrame, router_config: Mapping[str, object]) -> list[str]:
    params = evaluation.loc[evaluation["metric"] == "parameters", "value"]
    described = ", ".join(f"{k} {router_config[k]}" for k in ("type", "pooling", "mode", "eta") if k in router_config)
    lines = [f"Router parameters: {int(params.iloc[0]):,}" + (f" ({described})" if described else "")
             if len(params) else "Router parameters: –", ""]
    accuracy = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["task"] == "all")]
    whole = accuracy[accuracy["strategy"] != "layer"].set_index(["strategy", "routing"])["value"]
    layers = accuracy[accuracy["strategy"] == "layer"].groupby("routing")["value"].mean()
    rows = [[f"`{s}`", *(_fmt(100 * whole.get((s, r), np.nan), 2) for r in ("teacher_forced", "routed"))]
            for s in pd.unique(whole.index.get_level_values(0))]
    rows.append(["each layer's router (mean)", *(_fmt(100 * layers.get(r, np.nan), 2)
                                                 for r in ("teacher_forced", "routed"))])
    return lines + markdown_table(["strategy", "teacher-forced accuracy (%)", "routed accuracy (%)"], rows)


def routing_table(routing: pd.DataFrame, evaluation: pd.DataFrame | None, tasks: Sequence[str]) -> list[str]:
    """Routing accuracy per task and over all prompts: each routed composition's on the evaluated test prompts,
    then the trained router's on the held-out (validation) prompts with each whole-sequence strategy (routed)."""
    correct = routing.assign(correct=routing["count"].where(routing["task"] == routing["chosen"], 0))
    counts = correct.groupby(["method", "task"], sort=False)[["correct", "count"]].sum()
    rows = []
    for method, table in counts.groupby(level="method", sort=False):
        table = table.droplevel("method")
        share = 100 * table["correct"] / table["count"]
        rows.append([f"`{method}`, test", *(_fmt(share.get(t), 2) for t in tasks),
                     _fmt(100 * table["correct"].sum() / table["count"].sum(), 2)])
    if evaluation is not None:
        routed = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["routing"] == "routed")]
        accuracy = routed.set_index(["strategy", "task"])["value"]
        rows += [[f"validation, `{s}`", *(_fmt(100 * accuracy.get((s, t), np.nan), 2) for t in [*tasks, "all"])]
                 for s in pd.unique(routed["strategy"]) if s != "layer"]
    return markdown_table(["routing accuracy (%)", *tasks, "all prompts"], rows)


def router_section(config: Config, evaluation: pd.DataFrame | None, router_config: Mapping[str, object],
                   routing: pd.DataFrame) -> list[str]:
    """The trained router on held-out prompts, then every routed composition on the evaluated test prompts."""
    paths = ExperimentPaths.of(config)
    lines = router_summary(evaluation, router_config) if evaluation is not None \
        else [f"No router evaluation ({paths.router_eval.relative_to(paths.root)}): run `moa train-router` first."]
    if routing.empty:
        return [*lines, "", "No composition's evaluation was routed one expert per sequence by a router."]
    unrecorded = [t for t in config["tasks"] if t not in set(routing["task"])]
    note = [(f"No test routing is recorded for {', '.join(unrecorded)}: a task scored by perplexity generates nothing "
             "(its predictions have no `expert`), and a routed evaluation may be missing; `all prompts` of a test row "
             "covers the tasks it has.")] if unrecorded else []
    intro = ("On the evaluated test prompts: the expert each routed composition chose (its predictions' `expert`; "
             f"the counts are in {paths.report_routing.name} and the {Plot.ROUTER_CONFUSION} plot), next to the "
             "router's routed accuracy on the held-out validation prompts.")
    return [*lines, "", intro, "", *routing_table(routing, evaluation, list(config["tasks"])), "", *note]


# --- the step ----------------------------------------------------------------------------------------


def read_implicit(config: Config) -> pd.DataFrame:
    """Every exact merge's implicit routing (moa.implicit.summarize of its evaluations' component responses)."""
    paths, frames = ExperimentPaths.of(config), []
    for method in config["methods"]:
        for task in config["tasks"]:
            path = paths.implicit_routing(method, task)
            if path.is_file():
                frames.append(summarize(pd.read_parquet(path), method, task, list(config["tasks"])))
    columns = ["method", "task", "layer", "module", "segment", "share_true", "accuracy", "top_task", "n"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def implicit_table(implicit: pd.DataFrame, metrics: pd.DataFrame) -> list[str]:
    """Per exact merge and segment: how often the true task's component has the largest share over all its
    modules, per task and overall; MoA's routing accuracy on the same test prompts beside it."""
    overall = implicit[(implicit["layer"] == EVERY_LAYER) & (implicit["module"] == ALL)]
    tasks = list(pd.unique(overall["task"]))
    rows = []
    for (method, segment), cells in overall.groupby(["method", "segment"], sort=False):
        by_task = cells.set_index("task")
        mean = float((by_task["accuracy"] * by_task["n"]).sum() / by_task["n"].sum())
        rows.append([f"`{method}`", segment, *(_fmt(100 * by_task["accuracy"].get(t, np.nan), 1) for t in tasks),
                     _fmt(100 * mean, 1)])
    routed = metrics[metrics["metric"] == ROUTER_ACCURACY].groupby("method")
    for method, cells in routed:
        by_task = cells.set_index("task")["value"]
        rows.append([f"`{method}` (router)", "prompt", *(_fmt(by_task.get(t, np.nan), 1) for t in tasks),
                     _fmt(float((by_task * cells.set_index("task")["n"]).sum() / cells["n"].sum()), 1)])
    return markdown_table(["method", "tokens", *tasks, "all"], rows)


def figures(config: Config, uncertainty: Uncertainty, evaluation: pd.DataFrame | None,
            confusion: pd.DataFrame | None, routing: pd.DataFrame, cosine: tuple[list[str], np.ndarray] | None,
            implicit: pd.DataFrame, sweep: pd.DataFrame | None) -> dict[Plot, Figure | str]:
    """Each plot's figure, or why it was skipped (the sweep's only with a sweep)."""
    tasks = list(config["tasks"])
    representative = {task: names[0] for task, names in uncertainty.tasks.items()}
    normalized, scores, method_kinds = uncertainty.normalized(), uncertainty.multitask(), kinds(config)
    adherence = uncertainty.adherence()
    routed = confusion is not None and bool((confusion["routing"] == "routed").any())  # held-out prompts, routed
    logs = train_logs(config)
    paths = ExperimentPaths.of(config)
    reference = uncertainty.references[0] if uncertainty.references else None
    differences = uncertainty.comparisons[uncertainty.comparisons["reference"] == reference].assign(
        panel=lambda t: np.where(t["task"] == ALL_TASKS, "multitask score", t["task"]))
    differences = differences.sort_values("task", key=lambda t: t != ALL_TASKS, kind="stable")  # the headline first
    plots: dict[Plot, Figure | str] = {
        Plot.SCORES_HEATMAP: plot_scores(normalized, representative, uncertainty.result.excluded)
        if normalized.notna().to_numpy().any() else "no method has an oracle-normalized score",
        Plot.MULTITASK_SCORE: plot_multitask(scores, method_kinds, uncertainty.confidence, uncertainty.tasks_used())
        if len(scores) else f"no method has a multitask score ({uncertainty.tasks_used()})",
        Plot.DIFFERENCES: plot_differences(differences, list(scores.index) + uncertainty.methods, method_kinds,
                                           reference, uncertainty.confidence, uncertainty.alpha)
        if len(differences) else "no method to compare with a reference (report.compare_to)",
        Plot.FORMAT_ADHERENCE: plot_format_adherence(adherence) if adherence.notna().to_numpy().any()
        else "no evaluation of a task with a format check",
        Plot.ROUTER_CONFUSION: plot_confusion(confusion if routed else None, routing, tasks) if routed or len(routing)
        else f"no routed {paths.router_confusion.relative_to(paths.root)} and no routed evaluation",
        Plot.ROUTER_LAYER_ACCURACY: plot_layer_accuracy(evaluation, len(tasks)) if evaluation is not None
        else f"no {paths.router_eval.relative_to(paths.root)}",
        Plot.IMPLICIT_ROUTING: plot_implicit(implicit, tasks) if len(implicit)
        else "no exact merge (concat, task_arithmetic) was evaluated",
        Plot.ADAPTER_COSINE: plot_cosine(*cosine) if cosine else "fewer than two trained task adapters",
        Plot.TRAIN_LOSS: plot_train_loss(logs) if logs else f"no {TRAIN_LOG}",
    }
    if sweep is not None:
        plots[Plot.SWEEP] = (plot_sweep(sweep, method_kinds, uncertainty.confidence) if len(sweep)
                             else "no subset of the sweep has a multitask score yet")
    return plots


def summary(config: Config, metrics: pd.DataFrame, uncertainty: Uncertainty, evaluation: pd.DataFrame | None,
            router_config: Mapping[str, object], routing: pd.DataFrame, plots: Mapping[Plot, Figure | str],
            notes: list[str], implicit: pd.DataFrame, sweep: pd.DataFrame | None) -> str:
    paths, result = ExperimentPaths.of(config), uncertainty.result
    brackets = (f"Brackets: {uncertainty.confidence:.0%} paired bootstrap percentile intervals over the test items "
                f"({uncertainty.resamples} resamples, seed {config['seed']}); every figure is recomputed inside each "
                "resample, the same items for every method.")
    lines = [f"# Report: {config['experiment']}", "", "## Verdict", "", *verdict(uncertainty, kinds(config)),
             *([] if sweep is None else sweep_verdict(sweep, sweep_reference(config), uncertainty.alpha)), "",
             "## Multitask score", "", f"Multitask score {uncertainty.tasks_used()}.", ""]
    if result.multitask:
        lines += [*multitask_table(uncertainty), "", brackets + " Differences: method minus reference, in bold where "
                  f"significant at alpha {uncertainty.alpha:g} after Holm's correction.", ""]
    lines += [f"- Left out of the multitask score, {task}: {why}; its raw metrics are in the table below."
              for task, why in result.excluded.items()]
    if uncertainty.references and uncertainty.signal:
        reference = uncertainty.references[0]
        lines += ["", f"## Per task: normalized score minus `{reference}`", "", *per_task_table(uncertainty, reference)]
    lines += sweep_section(config, sweep) if sweep is not None and len(sweep) else []
    lines += ["", "## Scores", "", *score_table(config, metrics, uncertainty), "", SCORE_NOTE + " " + brackets, "",
              "## Format adherence", "", *format_section(uncertainty, brackets), "",
              "## Cost", "", *cost_table(config, metrics), "",
              ("Each composition serves every task's test prompts as one stream (continuous batching, "
               "`evaluation.batch_size` sequences in flight): tokens/s are the stream's (generated tokens over its "
               "wall time, over its decoding steps alone; prompt tokens over its prefills), latency and router "
               "accuracy the means over the tasks with generated answers."),
              "", "## Router", ""]
    lines += router_section(config, evaluation, router_config, routing)
    if len(implicit):
        lines += ["", "## Does a merged model route itself?", "", IMPLICIT_NOTE, "", *implicit_table(implicit, metrics)]
    lines += ["", "## Plots", "", *(f"![{name}]({paths.plot(name).name})" for name, p in plots.items()
                                    if isinstance(p, Figure))]
    notes = notes + [f"`{method}` has no multitask score: no evaluation on {', '.join(tasks)}"
                     for method, tasks in result.missing.items()]
    notes += [resolution] if (resolution := uncertainty.resolution()) else []
    notes += [f"{paths.plot(name).name} skipped (it says why): {plot}" for name, plot in plots.items()
              if isinstance(plot, str)]
    return "\n".join(lines + (["", "## Notes", "", *(f"- {note}" for note in notes)] if notes else [])) + "\n"


def with_normalized(metrics: pd.DataFrame, uncertainty: Uncertainty) -> pd.DataFrame:
    """`metrics` plus a `normalized` column: the ratio to the oracle on each task's representative metric."""
    normalized = uncertainty.intervals[uncertainty.intervals["metric"] == NORMALIZED]
    representative = {task: names[0] for task, names in uncertainty.tasks.items()}
    normalized = normalized.assign(metric=normalized["task"].map(representative))[["method", "task", "metric", "value"]]
    return metrics.merge(normalized.rename(columns={"value": "normalized"}), on=["method", "task", "metric"],
                         how="left")


def tracked_metrics(uncertainty: Uncertainty) -> dict[str, float]:
    """The report run's MLflow metrics: every figure with its bounds ("{task}.{metric}.{method}", ".lo", ".hi";
    "multitask_score.{method}"), every comparison's difference, bounds and p-values ("vs_{reference}.{figure}.
    {method}", ".lo", ".hi", ".p", ".p_holm")."""
    tracked: dict[str, float] = {}
    for row in uncertainty.intervals.itertuples():
        key = f"{MULTITASK}.{row.method}" if row.metric == MULTITASK else f"{row.task}.{row.metric}.{row.method}"
        tracked |= {key: row.value, f"{key}.lo": row.lo, f"{key}.hi": row.hi}
    for row in uncertainty.comparisons.itertuples():
        figure = MULTITASK if row.metric == MULTITASK else f"{row.task}.{row.metric}"
        key = f"vs_{row.reference}.{figure}.{row.method}"
        tracked |= {key: row.difference, f"{key}.lo": row.lo, f"{key}.hi": row.hi, f"{key}.p": row.p,
                    f"{key}.p_holm": row.p_holm}
    return tracked


def comparison_table(uncertainty: Uncertainty, method_kinds: Mapping[str, Kind]) -> pd.DataFrame:
    """One row per method, best first, for MLflow's table view (mlflow.log_table): kind, multitask score and
    interval, the difference to each reference with its Holm-adjusted p, and each task's representative metric."""
    scores = uncertainty.multitask()
    scores = scores.reindex([*scores.index, *(m for m in uncertainty.methods if m not in scores.index)])
    table = pd.DataFrame({"method": scores.index, "kind": [str(method_kinds[m]) for m in scores.index],
                          "multitask_score": scores["value"].to_numpy(), "lo": scores["lo"].to_numpy(),
                          "hi": scores["hi"].to_numpy()})
    for reference in uncertainty.references:
        rows = [uncertainty.compared(m, reference) for m in scores.index]
        table[f"minus_{reference}"] = [np.nan if r is None else r["difference"] for r in rows]
        table[f"p_holm_vs_{reference}"] = [np.nan if r is None else r["p_holm"] for r in rows]
    for task, names in uncertainty.tasks.items():
        rows = [uncertainty.figure(m, task, names[0]) for m in scores.index]
        table[f"{task}.{names[0]}"] = [np.nan if r is None else r["value"] for r in rows]
    return table.round(4)  # for reading; the Parquet files keep every digit


def build_report(config: Config) -> StepResult:
    """Write results/{experiment}/report/ (metrics, intervals, comparisons, routing, summary.md, PNGs) atomically."""
    paths = ExperimentPaths.of(config)
    metrics, notes = read_metrics(config)
    evaluations = read_evaluations(config)
    uncertainty = Uncertainty(config, evaluations)
    sweep, sweep_notes = sweep_scores(config, evaluations) if "sweep" in config else (None, [])
    evaluation, confusion = _parquet(paths.router_eval), _parquet(paths.router_confusion)
    router_file = paths.moa / ROUTER_CONFIG
    router_config = read_json(router_file, "rerun `moa train-router`") if router_file.is_file() else {}
    cosine = task_adapter_cosine(config)
    if cosine and len(cosine[0]) < len(config["tasks"]):
        notes.append(f"{paths.plot(Plot.ADAPTER_COSINE).name} covers only the trained adapters: {', '.join(cosine[0])}")
    routing, implicit = evaluated_routing(config, metrics), read_implicit(config)
    plots = figures(config, uncertainty, evaluation, confusion, routing, cosine, implicit, sweep)
    with atomic_dir(paths.report) as tmp:
        with_normalized(metrics, uncertainty).to_parquet(tmp / paths.report_metrics.name, index=False)
        uncertainty.intervals.to_parquet(tmp / paths.report_intervals.name, index=False)
        uncertainty.comparisons.to_parquet(tmp / paths.report_comparisons.name, index=False)
        routing.to_parquet(tmp / paths.report_routing.name, index=False)
        implicit.to_parquet(tmp / paths.report_implicit_routing.name, index=False)
        if sweep is not None:
            sweep.to_parquet(tmp / paths.report_sweep.name, index=False)
        for name, plot in plots.items():  # every PNG is written (the workflow declares them all)
            figure = plot if isinstance(plot, Figure) else placeholder(name, plot)
            if figure.get_layout_engine() is None:  # a figure with a suptitle lays itself out (constrained)
                figure.tight_layout()
            figure.savefig(tmp / paths.plot(name).name, dpi=DPI)
        text = summary(config, metrics, uncertainty, evaluation, router_config, routing, plots, notes + sweep_notes,
                       implicit, sweep)
        (tmp / paths.summary.name).write_text(text)
    return StepResult(paths.report, metrics=tracked_metrics(uncertainty),
                      artifacts=paths.report_files(sweep is not None),
                      tables={COMPARISON_TABLE: comparison_table(uncertainty, kinds(config))})
