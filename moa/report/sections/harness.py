"""lm-evaluation-harness tasks: every composition's harness metrics with intervals, and the differences to moa and
the oracle (moa.report.harness)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from moa.config import Config
from moa.plots import plot_harness
from moa.report.evidence import Evidence
from moa.report.markdown import difference, fmt, markdown_table, with_interval

HARNESS, COMPARISONS = "lm_eval", "lm_eval_comparisons"  # the section's tables (and its plot, lm_eval.png)


def configured(config: Config) -> bool:
    """Whether the config runs harness tasks (of a config as written too: the workflow declares the report's files
    before validation fills in defaults)."""
    return (config.get("evaluation") or {}).get("lm_eval") is not None


def harness(evidence: Evidence) -> list[str]:
    """A table of each figure per composition, then each composition's difference to every reference."""
    figures, uncertainty = evidence.harness.figures, evidence.uncertainty
    if figures.empty:
        return []
    columns = list(dict.fromkeys(zip(figures["task"], figures["metric"])))
    header = ["method", *(f"{task} {metric}{'' if higher else ' ↓'}" for (task, metric), higher in
                          figures.groupby(["task", "metric"], sort=False)["higher_is_better"].first().items())]
    table = figures.set_index(["method", "task", "metric"])
    methods = list(dict.fromkeys(figures["method"]))
    rows = [[f"`{m}`", *(_figure(table, m, t, k) for t, k in columns)] for m in methods]
    intro = (f"Each composition on the harness tasks of evaluation.lm_eval, served by moa's harness model "
             f"(report/{HARNESS}.parquet; the harness's own results and per-sample logs under lm_eval/{{method}}/). "
             f"Brackets: {uncertainty.confidence:.0%} paired bootstrap percentile intervals over each task's "
             f"documents ({uncertainty.resamples} resamples), the same documents for every composition; ↓: lower is "
             "better.")
    lines = ["## lm-evaluation-harness tasks", "", intro, "", *markdown_table(header, rows), ""]
    compared = evidence.harness.comparisons.set_index(["method", "reference", "task", "metric"])
    for reference in uncertainty.references:
        if reference not in methods or not (compared.index.get_level_values("reference") == reference).any():
            continue
        rows = [[f"`{m}`", *(difference(_row(compared, (m, reference, t, k))) for t, k in columns)]
                for m in methods if m != reference]
        title = (f"Minus `{reference}` (p after Holm over the compositions; bold where significant at alpha "
                 f"{uncertainty.alpha:g}):")
        lines += [title, "", *markdown_table(["method", *header[1:]], rows), ""]
    return lines


def _row(table: pd.DataFrame, key: tuple) -> pd.Series | None:
    return table.loc[key] if key in table.index else None


def _figure(table: pd.DataFrame, method: str, task: str, metric: str) -> str:
    row = _row(table, (method, task, metric))
    if row is None:
        return "–"
    return with_interval(row, 3) if pd.notna(row["lo"]) else fmt(row["value"], 3)


def harness_plot(evidence: Evidence) -> Figure | str:
    figures = evidence.harness.figures
    if figures.empty:
        return "no composition has harness results yet (the lm-eval step)"
    return plot_harness(figures, evidence.kinds, evidence.uncertainty.confidence)


def harness_metrics(evidence: Evidence) -> dict[str, float]:
    """MLflow's: "lm_eval.{task}.{metric}.{method}" with ".lo", ".hi", and "vs_{reference}.lm_eval.{task}.{metric}.
    {method}" with its bounds, ".p" and ".p_holm" (as the report's other figures)."""
    tracked: dict[str, float] = {}
    for row in evidence.harness.figures.itertuples():
        key = f"lm_eval.{row.task}.{row.metric}.{row.method}"
        tracked |= {key: row.value} | ({f"{key}.lo": row.lo, f"{key}.hi": row.hi} if pd.notna(row.lo) else {})
    for row in evidence.harness.comparisons.itertuples():
        key = f"vs_{row.reference}.lm_eval.{row.task}.{row.metric}.{row.method}"
        tracked |= {key: row.difference, f"{key}.lo": row.lo, f"{key}.hi": row.hi, f"{key}.p": row.p,
                    f"{key}.p_holm": row.p_holm}
    return tracked
