"""Tuned merges: the setting each chose on the validation split, and every candidate's criterion."""

from __future__ import annotations

from matplotlib.figure import Figure

from moa.compose.registry import tune_grid
from moa.config import Config, method_params, schema
from moa.plots import plot_tuning
from moa.report.evidence import Evidence
from moa.report.markdown import fmt, markdown_table

TUNING = "tuning"  # the section's table and plot (moa.report.sections)
INTRO = ("Each tuned merge is built at the candidate of its grid with the lowest criterion on the validation split "
         "(never the test rows): every task's teacher-forced perplexity of its validation targets over the oracle's on "
         "the same rows, averaged over the tasks (1 = the oracle's). Every candidate: report/tuning.parquet, tuning.png.")


def configured(config: Config) -> bool:
    """Whether any composition is tuned (of the schema's default list where the config lists none)."""
    methods = config.get("methods") or schema()["properties"]["methods"]["default"]
    return any((entry or {}).get("tune") is not None for entry in methods.values())


def tuning(evidence: Evidence) -> list[str]:
    if evidence.tuning.empty:
        return []
    rows = []
    for name, table in evidence.tuning.groupby("composition", sort=False):
        candidates = table.groupby("candidate").first()
        chosen = candidates[candidates["chosen"]].iloc[0]
        grid = tune_grid(evidence.config, method_params(evidence.config, name))
        setting = ", ".join(f"{key} {chosen[key]:g}" for key in grid)
        rows.append([f"`{name}`", setting, fmt(chosen["criterion"], 4), fmt(candidates["criterion"].max(), 4),
                     str(len(candidates)), str(int(chosen["labelled"]))])
    header = ["composition", "chosen", "criterion", "worst candidate", "candidates", "validation rows"]
    return ["## Tuned merges", "", INTRO, "", *markdown_table(header, rows), ""]


def tuning_plot(evidence: Evidence) -> Figure | str:
    return plot_tuning(evidence.tuning) if not evidence.tuning.empty else "no tuned merge was composed"
