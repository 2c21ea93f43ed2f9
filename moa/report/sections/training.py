"""Training: how alike the task adapters are, and every training's loss curve (plots only)."""

from __future__ import annotations

from matplotlib.figure import Figure

from moa.layout import TRAIN_LOG
from moa.plots import plot_cosine, plot_train_loss
from moa.report.evidence import Evidence

COSINE = "adapter_cosine"  # the section's plot (moa.report.sections)


def cosine_plot(evidence: Evidence) -> Figure | str:
    return plot_cosine(*evidence.cosine) if evidence.cosine else "fewer than two trained task adapters"


def cosine_notes(evidence: Evidence) -> list[str]:
    if evidence.cosine and len(evidence.cosine[0]) < len(evidence.tasks):
        trained = ", ".join(evidence.cosine[0])
        return [f"{evidence.paths.plot(COSINE).name} covers only the trained adapters: {trained}"]
    return []


def train_loss_plot(evidence: Evidence) -> Figure | str:
    return plot_train_loss(evidence.train_logs) if evidence.train_logs else f"no {TRAIN_LOG}"
