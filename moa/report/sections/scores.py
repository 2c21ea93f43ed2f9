"""The scores: the multitask score, its per-task differences, every task metric, format adherence and cost."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moa.metrics import COST_METRICS, FORMAT_ADHERENCE, METRICS
from moa.plots import plot_differences, plot_format_adherence, plot_multitask, plot_scores
from moa.report.evidence import Evidence
from moa.report.markdown import difference, fmt, markdown_table, with_interval
from moa.stats import ALL_TASKS, MULTITASK, NORMALIZED

SCORE_NOTE = ("Task metrics on a 0–100 scale (perplexity: lower is better). Multitask score: the mean over the tasks "
              "with signal of the method's representative metric (the first of each task) divided by the oracle's "
              "(inverted for perplexity); oracle = 1.000, base is the floor.")
COST_NOTE = ("Each composition serves every task's test prompts as one stream (continuous batching, "
             "`evaluation.batch_size` sequences in flight): tokens/s are the stream's (generated tokens over its "
             "wall time, over its decoding steps alone; prompt tokens over its prefills), latency and router "
             "accuracy the means over the tasks with generated answers. Tier, data and build: what each composition "
             "was built from beyond the task LoRAs (labelled: task-labelled prompts for the routers, prompt and target "
             "rows for tuning and learning; unlabelled: prompts without labels, adamerging's the test prompts themselves, "
             "transductively) and the seconds of composing it plus "
             "what it was learned by (train-router, learn-merge); mixed trains its own LoRA on every training row. "
             "Extra parameters: what a composition adds at decoding beyond the base model and the task LoRAs (MoA's "
             "routers, the N x H centroids of the centroid's layer, a token gate's; 0 for a folded merge and for "
             "arrow, whose prototypes come from the LoRAs); passes: the model's forward passes per generated token "
             "(xlora's scaling pass makes 2).")


# --- the multitask score -------------------------------------------------------------------------------


def multitask(evidence: Evidence) -> list[str]:
    """Each method's multitask score with its interval and its differences to the references; the tasks left out."""
    uncertainty = evidence.uncertainty
    result = uncertainty.result
    lines = ["## Multitask score", "", f"Multitask score {uncertainty.tasks_used()}.", ""]
    if result.multitask:
        lines += [*multitask_table(evidence), "", uncertainty.brackets + " Differences: method minus reference, in "
                  f"bold where significant at alpha {uncertainty.alpha:g} after Holm's correction.", ""]
    return lines + [f"- Left out of the multitask score, {task}: {why}; its raw metrics are in the table below."
                    for task, why in result.excluded.items()]


def multitask_table(evidence: Evidence) -> list[str]:
    uncertainty = evidence.uncertainty
    scores = uncertainty.multitask()
    header = ["method", "multitask score", f"{uncertainty.confidence:.0%} interval",
              *(f"minus `{r}` (p Holm)" for r in uncertainty.references)]
    rows = [[f"`{m}`", fmt(row["value"], 3), f"[{fmt(row['lo'], 3)}, {fmt(row['hi'], 3)}]",
             *(difference(uncertainty.compared(m, r)) for r in uncertainty.references)]
            for m, row in scores.iterrows()]
    rows += [[f"`{m}`", "–", "–", *("–" for _ in uncertainty.references)] for m in uncertainty.methods
             if m not in scores.index]
    return markdown_table(header, rows)


def multitask_notes(evidence: Evidence) -> list[str]:
    """The methods without a score, and why no difference can be significant, if so."""
    uncertainty = evidence.uncertainty
    notes = [f"`{method}` has no multitask score: no evaluation on {', '.join(tasks)}"
             for method, tasks in uncertainty.result.missing.items()]
    return notes + [resolution] if (resolution := uncertainty.resolution()) else notes


def scores_heatmap(evidence: Evidence) -> Figure | str:
    uncertainty = evidence.uncertainty
    normalized = uncertainty.normalized()
    if not normalized.notna().to_numpy().any():
        return "no method has an oracle-normalized score"
    return plot_scores(normalized, uncertainty.representative, uncertainty.result.excluded)


def multitask_plot(evidence: Evidence) -> Figure | str:
    uncertainty = evidence.uncertainty
    scores = uncertainty.multitask()
    if not len(scores):
        return f"no method has a multitask score ({uncertainty.tasks_used()})"
    return plot_multitask(scores, evidence.kinds, uncertainty.confidence, uncertainty.tasks_used())


# --- per task ------------------------------------------------------------------------------------------


def per_task(evidence: Evidence) -> list[str]:
    """Each method's normalized score minus the first reference's, per task with signal."""
    uncertainty = evidence.uncertainty
    if not (uncertainty.references and uncertainty.signal):
        return []
    reference = uncertainty.references[0]
    rows = [[f"`{m}`", *(difference(uncertainty.compared(m, reference, t, NORMALIZED), 2) for t in uncertainty.signal)]
            for m in uncertainty.methods if m != reference]
    return [f"## Per task: normalized score minus `{reference}`", "",
            *markdown_table(["method", *uncertainty.signal], rows)]


def differences_plot(evidence: Evidence) -> Figure | str:
    """Every method's difference to the first reference: the multitask score's first, then each task's."""
    uncertainty = evidence.uncertainty
    reference = uncertainty.references[0] if uncertainty.references else None
    differences = uncertainty.comparisons[uncertainty.comparisons["reference"] == reference].assign(
        panel=lambda t: np.where(t["task"] == ALL_TASKS, "multitask score", t["task"]))
    differences = differences.sort_values("task", key=lambda t: t != ALL_TASKS, kind="stable")  # the headline first
    if not len(differences):
        return "no method to compare with a reference (report.compare_to)"
    return plot_differences(differences, list(uncertainty.multitask().index) + uncertainty.methods, evidence.kinds,
                            reference, uncertainty.confidence, uncertainty.alpha)


# --- every task metric ---------------------------------------------------------------------------------


def scores(evidence: Evidence) -> list[str]:
    """Every task metric of every method with its interval, and the multitask score."""
    uncertainty = evidence.uncertainty
    columns = [(task, metric) for task, names in uncertainty.tasks.items() for metric in names]
    metrics = evidence.metrics
    values = metrics.drop_duplicates(["method", "task", "metric"]).set_index(["method", "task", "metric"])["value"]
    header = ["method", *(f"{task} {METRICS[metric].label}" for task, metric in columns), "multitask score"]

    def cell(method: str, task: str, metric: str) -> str:
        row = uncertainty.figure(method, task, metric)
        return with_interval(row, 2) if row is not None else fmt(values.get((method, task, metric)), 2)

    rows = [[method, *(cell(method, *c) for c in columns),
             with_interval(uncertainty.figure(method, ALL_TASKS, MULTITASK), 3)] for method in evidence.config["methods"]]
    return ["## Scores", "", *markdown_table(header, rows), "", SCORE_NOTE + " " + uncertainty.brackets]


def with_normalized(evidence: Evidence) -> pd.DataFrame:
    """report/metrics.parquet: every evaluation's metrics plus a `normalized` column, the ratio to the oracle on
    each task's representative metric."""
    uncertainty = evidence.uncertainty
    normalized = uncertainty.intervals[uncertainty.intervals["metric"] == NORMALIZED]
    normalized = normalized.assign(metric=normalized["task"].map(uncertainty.representative))
    return evidence.metrics.merge(normalized[["method", "task", "metric", "value"]].rename(
        columns={"value": "normalized"}), on=["method", "task", "metric"], how="left")


# --- format adherence ----------------------------------------------------------------------------------


def format_adherence(evidence: Evidence) -> list[str]:
    """Each method's format adherence on every task with a check, with its interval; the checks in words."""
    uncertainty = evidence.uncertainty
    tasks = list(uncertainty.formats)
    unchecked = [task for task in uncertainty.tasks if task not in uncertainty.formats]
    lines = [(f"- Without a check: {', '.join(unchecked)} (a task scored by perplexity generates nothing to check; "
              "a custom task is checked only with a `format`).")] if unchecked else []
    if not tasks:
        return ["## Format adherence", "", "No task has a format check.", "", *lines]
    rows = [[method, *(with_interval(uncertainty.figure(method, t, FORMAT_ADHERENCE), 1) for t in tasks)]
            for method in uncertainty.methods]
    return ["## Format adherence", "", *markdown_table(["method", *tasks], rows), "",
            "Share of each task's generated outputs that are in the task's format (0–100), whether right or wrong. "
            + uncertainty.brackets + " The checks:", "",
            *(f"- {task}: {rule}." for task, rule in uncertainty.formats.items()), *lines]


def format_plot(evidence: Evidence) -> Figure | str:
    adherence = evidence.uncertainty.adherence()
    if not adherence.notna().to_numpy().any():
        return "no evaluation of a task with a format check"
    return plot_format_adherence(adherence)


# --- cost ----------------------------------------------------------------------------------------------


def cost(evidence: Evidence) -> list[str]:
    """What each method costs at decoding and how well MoA routes: the throughputs are the whole mixed-task
    stream's (the same for every task), latency and routing accuracy the means over the generated tasks."""
    metrics = evidence.metrics
    means = metrics[metrics["metric"].isin([m.name for m in COST_METRICS])].groupby(["method", "metric"])["value"].mean()
    budgets = evidence.budgets.set_index("method")
    rows = [[method, budgets.loc[method, "tier"],
             *(fmt(budgets.loc[method, key], 0) for key in ("labelled", "unlabelled", "seconds")),
             _count(budgets.loc[method, "parameters"]), fmt(budgets.loc[method, "passes"], 0),
             *(fmt(means.get((method, m.name)), m.digits) for m in COST_METRICS)]
            for method in evidence.config["methods"]]
    header = ["method", "tier", "labelled", "unlabelled", "build (s)", "extra parameters", "passes / token",
              *(m.label for m in COST_METRICS)]
    return ["## Cost", "", *markdown_table(header, rows), "", COST_NOTE]


def _count(value: float) -> str:
    """A count with thousands separators; "–" where there is none."""
    return "–" if not np.isfinite(value) else f"{int(value):,}"
