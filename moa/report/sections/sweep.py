"""The task-count sweep: each method's multitask score by the number of tasks composed."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from moa.config import Config
from moa.plots import plot_sweep
from moa.report.evidence import Evidence
from moa.report.markdown import fmt, markdown_table

SWEEP = "sweep"  # the section's table and plot (moa.report.sections)


def configured(config: Config) -> bool:
    return "sweep" in config


def sweep_table(sweep: pd.DataFrame) -> list[str]:
    """Methods x sizes: the mean multitask score over the subsets of that size, and their range."""
    sizes = sorted(sweep["n_tasks"].unique())
    cells = sweep.groupby(["method", "n_tasks"], sort=False)["multitask_score"].agg(["mean", "min", "max", "size"])

    def cell(method: str, n: int) -> str:
        if (method, n) not in cells.index:
            return "–"
        row = cells.loc[method, n]
        spread = f" ({fmt(row['min'], 3)}–{fmt(row['max'], 3)})" if row["size"] > 1 else ""
        return f"{fmt(row['mean'], 3)}{spread}"

    methods = list(dict.fromkeys(sweep["method"]))
    return markdown_table(["method", *(f"{n} tasks" for n in sizes)],
                          [[f"`{m}`", *(cell(m, n) for n in sizes)] for m in methods])


def sweep(evidence: Evidence) -> list[str]:
    assert evidence.sweep is not None, "the sweep section is configured only with a sweep"
    table = evidence.sweep.table
    if not len(table):
        return []
    note = ("Each cell: the mean multitask score over the subsets of that many tasks (their range across the subsets "
            "in parentheses); base and the oracle are the main experiment's evaluations, and the subset of every task is "
            f"the main experiment itself. Each subset's interval and difference to `{evidence.sweep.reference}` are in "
            f"{evidence.paths.report_table(SWEEP).name}.")
    return ["## Task-count sweep", "", *sweep_table(table), "", note]


def sweep_plot(evidence: Evidence) -> Figure | str:
    assert evidence.sweep is not None, "the sweep section is configured only with a sweep"
    if not len(evidence.sweep.table):
        return "no subset of the sweep has a multitask score yet"
    return plot_sweep(evidence.sweep.table, evidence.kinds, evidence.uncertainty.confidence)
