"""What a section of the report is: the parts of summary.md and the files under report/ it renders from the
evidence (moa.report.evidence)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from moa.config import Config
from moa.report.evidence import Evidence

Lines = Callable[[Evidence], list[str]]
Table = Callable[[Evidence], pd.DataFrame]
Plot = Callable[[Evidence], Figure | str]  # a figure, or why it is skipped (a placeholder PNG says so)
Metrics = Callable[[Evidence], dict[str, float]]


def nothing(evidence: Evidence) -> list[str]:
    return []


def no_metrics(evidence: Evidence) -> dict[str, float]:
    return {}


def always(config: Config) -> bool:
    return True


@dataclass(frozen=True)
class Section:
    """One part of the report. Its files are written for every config it is `configured` for (the workflow declares
    them before any input exists), whatever the evidence; its text may be empty."""

    name: str
    text: Lines = nothing  # its part of summary.md, heading first; [] where there is nothing to say
    verdict: Lines = nothing  # its lines of the verdict, the summary's first part
    notes: Lines = nothing  # what it could not show, for the summary's notes
    tables: Mapping[str, Table] = field(default_factory=dict)  # report/{name}.parquet
    plots: Mapping[str, Plot] = field(default_factory=dict)  # report/{name}.png
    metrics: Metrics = no_metrics  # its figures for the report's MLflow run, beside the bootstrap's (tracked_metrics)
    configured: Callable[[Config], bool] = always  # whether a config's report has it

