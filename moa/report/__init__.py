"""The report step: results/{experiment}/report/ holds every evaluation in one long table (metrics.parquet), the
paired bootstrap's intervals and comparisons (intervals.parquet, comparisons.parquet, see moa.stats), the routing
of the evaluated test prompts (routing.parquet), the summary with its verdict (summary.md) and PNG plots.

The inputs are read once (moa.report.evidence); each section (moa.report.sections.SECTIONS) renders its part of the
summary and its files from them. Any input may be missing (a step not run yet, a failed job): what it would have fed
is skipped or shown as "–", and the summary's notes say so, so a partial report is still a report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moa.compose.registry import Kind
from moa.config import Config
from moa.io import atomic_dir
from moa.layout import ExperimentPaths
from moa.plots import placeholder
from moa.report.evidence import Evidence, gather
from moa.report.section import Section
from moa.report.sections import SECTIONS
from moa.report.uncertainty import Uncertainty
from moa.stats import MULTITASK
from moa.step_result import StepResult
from moa.tracking import COMPARISON_TABLE

DPI = 120


def sections(config: Config) -> list[Section]:
    """The sections of a config's report (the sweep's only with a sweep)."""
    return [section for section in SECTIONS if section.configured(config)]


def report_tables(config: Config) -> list[str]:
    """The names of the report's tables, report/{name}.parquet."""
    return [name for section in sections(config) for name in section.tables]


def report_plots(config: Config) -> list[str]:
    """The names of the report's plots, report/{name}.png (each with a caption workflow/report/{name}.rst)."""
    return [name for section in sections(config) for name in section.plots]


def report_files(config: Config) -> list[Path]:
    """Everything report/ holds: the workflow's outputs, MLflow's artifacts."""
    paths = ExperimentPaths.of(config)
    return [paths.summary, *map(paths.report_table, report_tables(config)), *map(paths.plot, report_plots(config))]


def summary(evidence: Evidence, parts: Sequence[Section], plots: Mapping[str, Figure | str]) -> str:
    """The verdict (every section's lines), each section's text, the plots drawn, then the notes: what is missing,
    what each section could not show and the plots skipped."""
    lines = [f"# Report: {evidence.config['experiment']}", "", "## Verdict", "",
             *(line for section in parts for line in section.verdict(evidence))]
    for section in parts:
        text = section.text(evidence)
        lines += ["", *text] if text else []
    lines += ["", "## Plots", "", *(f"![{name}]({evidence.paths.plot(name).name})" for name, p in plots.items()
                                    if isinstance(p, Figure))]
    notes = evidence.missing + [note for section in parts for note in section.notes(evidence)]
    notes += [f"{evidence.paths.plot(name).name} skipped (it says why): {plot}" for name, plot in plots.items()
              if isinstance(plot, str)]
    return "\n".join(lines + (["", "## Notes", "", *(f"- {note}" for note in notes)] if notes else [])) + "\n"


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
    for task, metric in uncertainty.representative.items():
        rows = [uncertainty.figure(m, task, metric) for m in scores.index]
        table[f"{task}.{metric}"] = [np.nan if r is None else r["value"] for r in rows]
    return table.round(4)  # for reading; the Parquet files keep every digit


def _save(figure: Figure, path: Path) -> None:
    if figure.get_layout_engine() is None:  # a figure with a suptitle lays itself out (constrained)
        figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def build_report(config: Config) -> StepResult:
    """Write results/{experiment}/report/ (every section's tables and plots, summary.md) atomically."""
    evidence, parts = gather(config), sections(config)
    paths = evidence.paths
    plots = {name: draw(evidence) for section in parts for name, draw in section.plots.items()}
    with atomic_dir(paths.report) as tmp:
        for section in parts:
            for name, table in section.tables.items():
                table(evidence).to_parquet(tmp / paths.report_table(name).name, index=False)
        for name, plot in plots.items():  # every PNG is written (the workflow declares them all)
            _save(plot if isinstance(plot, Figure) else placeholder(name, plot), tmp / paths.plot(name).name)
        (tmp / paths.summary.name).write_text(summary(evidence, parts, plots))
    metrics = tracked_metrics(evidence.uncertainty)
    for section in parts:
        metrics |= section.metrics(evidence)
    return StepResult(paths.report, metrics=metrics, artifacts=report_files(config),
                      tables={COMPARISON_TABLE: comparison_table(evidence.uncertainty, evidence.kinds)})
