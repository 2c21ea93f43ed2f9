"""The report's paired bootstrap (moa.stats) of every evaluation, with the lookups the sections need."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from moa.config import Config
from moa.data.tasks import get_task
from moa.metrics import FORMAT_ADHERENCE
from moa.roles import REFERENCES
from moa.stats import (
    ALL_TASKS,
    MULTITASK,
    NORMALIZED,
    Bootstrap,
    Evaluated,
    bootstrap,
    comparisons,
    intervals,
    paired_differences,
    resamples_for,
)


def resamples(config: Config, compared: int) -> int:
    """report.bootstrap.resamples, or (null) as many as `compared` methods tested against one reference need."""
    settings = config["report"]
    return settings["bootstrap"]["resamples"] or resamples_for(compared, settings["alpha"])


def references(config: Config) -> list[str]:
    """The methods every other is compared with: report.compare_to, or moa and the oracle where configured."""
    return config["report"]["compare_to"] or [m for m in REFERENCES if m in config["methods"]]


class Uncertainty:
    """The bootstrap of one report and its two tables (intervals, comparisons)."""

    def __init__(self, config: Config, evaluations: Mapping[tuple[str, str], Evaluated]) -> None:
        settings = config["report"]
        self.alpha = settings["alpha"]
        self.methods = list(config["methods"])
        specs = [get_task(config, task) for task in config["tasks"]]
        self.tasks = {task.name: task.metrics for task in specs}
        self.formats = {task.name: task.format.rule for task in specs if task.format}  # the tasks with a check
        self.seed = config["seed"]
        self.references = references(config)
        self.resamples = resamples(config, len(self.methods) - 1)
        self.result: Bootstrap = bootstrap(evaluations, self.methods, {t.name: t.evaluated_metrics for t in specs},
                                           self.resamples, self.seed, self.alpha)
        self.intervals = intervals(self.result, self.alpha)
        self.comparisons = comparisons(self.result, self.references, self.alpha)
        self._figures = self.intervals.set_index(["method", "task", "metric"])
        self._compared = self.comparisons.set_index(["method", "reference", "task", "metric"])
        self._versus: dict[str, pd.DataFrame] = {}  # multitask comparisons with methods that are no reference

    @property
    def confidence(self) -> float:
        return 1 - self.alpha

    @property
    def signal(self) -> list[str]:
        return [t for t in self.tasks if t in self.result.items and t not in self.result.excluded]

    @property
    def representative(self) -> dict[str, str]:
        """Each task's representative metric (its first): the one normalized by the oracle."""
        return {task: names[0] for task, names in self.tasks.items()}

    @property
    def brackets(self) -> str:
        """What the summary's brackets are."""
        return (f"Brackets: {self.confidence:.0%} paired bootstrap percentile intervals over the test items "
                f"({self.resamples} resamples, seed {self.seed}); every figure is recomputed inside each "
                "resample, the same items for every method.")

    def figure(self, method: str, task: str, metric: str) -> pd.Series | None:
        key = (method, task, metric)
        return self._figures.loc[key] if key in self._figures.index else None

    def compared(self, method: str, reference: str, task: str = ALL_TASKS,
                 metric: str = MULTITASK) -> pd.Series | None:
        key = (method, reference, task, metric)
        return self._compared.loc[key] if key in self._compared.index else None

    def versus(self, method: str, other: str) -> pd.Series | None:
        """`method` minus any `other` on the multitask score: a reference's comparison, else one made as the
        comparisons are, Holm over every method with a multitask score compared with `other`."""
        if other in self.references:
            return self.compared(method, other)
        if other not in self._versus:
            by_figure = {(ALL_TASKS, MULTITASK): self.result.multitask}
            table = paired_differences(by_figure, [other], self.alpha)
            self._versus[other] = table.set_index(["method", "reference", "task", "metric"])
        key = (method, other, ALL_TASKS, MULTITASK)
        return self._versus[other].loc[key] if key in self._versus[other].index else None

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
                f"report.bootstrap.resamples to at least {needed}, or leave it null to size it for the comparisons")

    def tasks_used(self) -> str:
        """Which tasks the multitask score averages, in words."""
        if not self.signal:
            return "cannot be computed: no task carries signal"
        left_out = f"; left out: {', '.join(self.result.excluded)}" if self.result.excluded else ""
        return f"over {', '.join(self.signal)}{left_out}"
