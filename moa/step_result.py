"""What a pipeline step returns: the files it wrote and what of them its MLflow run logs (moa.tracking)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class StepResult:
    """What a pipeline step wrote (`path`) and what of it its MLflow run logs."""

    path: Path
    metrics: Mapping[str, float] = field(default_factory=dict)
    artifacts: Sequence[Path] = ()
    curves: pd.DataFrame | None = None  # per-step metrics (a `step` column), e.g. a training log
    summary: str | None = None  # a line for the CLI to print after "wrote {path}"
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)  # artifact file -> MLflow's table view
