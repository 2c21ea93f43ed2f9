"""Everything a report is made from, read and computed once: every section renders from this."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moa.compose.registry import Kind, method_of
from moa.config import Config, method_params
from moa.layout import ExperimentPaths
from moa.report.harness import Harness, read_harness
from moa.report.inputs import (
    evaluated_routing,
    parquet,
    read_budgets,
    read_evaluations,
    read_gates,
    read_implicit,
    read_metrics,
    read_tuning,
    router_config,
    task_adapter_cosine,
    train_logs,
)
from moa.report.sweep import Sweep, sweep_scores
from moa.report.uncertainty import Uncertainty


@dataclass(frozen=True)
class Evidence:
    config: Config
    paths: ExperimentPaths
    metrics: pd.DataFrame  # every eval/{method}/{task}/metrics.parquet in one table
    missing: list[str]  # notes on the evaluations that are not there
    uncertainty: Uncertainty  # the paired bootstrap of the evaluations' per-example statistics
    kinds: dict[str, Kind]  # each method's
    router_eval: pd.DataFrame | None  # the trained router on held-out prompts
    confusion: pd.DataFrame | None
    router_config: Mapping[str, object]
    routing: pd.DataFrame  # the experts routers chose for the evaluated test prompts (evaluated_routing)
    implicit: pd.DataFrame  # the exact merges' implicit routing (read_implicit)
    tuning: pd.DataFrame  # every tuned merge's candidates on validation (read_tuning)
    budgets: pd.DataFrame  # each composition's tier, data, build seconds and decoding cost (read_budgets)
    gates: pd.DataFrame  # the token-gated compositions' mean gate weights per task, layer and expert (read_gates)
    cosine: tuple[list[str], np.ndarray] | None  # the trained task adapters and their cosine matrix
    train_logs: dict[str, pd.DataFrame]
    sweep: Sweep | None  # with a sweep configured
    harness: Harness | None  # with evaluation.lm_eval configured

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"])


def gather(config: Config) -> Evidence:
    """Read every input of the report and compute its bootstrap (and the sweep's, with a sweep)."""
    paths = ExperimentPaths.of(config)
    metrics, missing = read_metrics(config)
    evaluations = read_evaluations(config)
    return Evidence(
        config, paths, metrics, missing, Uncertainty(config, evaluations),
        kinds={m: method_of(method_params(config, m)).kind for m in config["methods"]},
        router_eval=parquet(paths.router_eval), confusion=parquet(paths.router_confusion),
        router_config=router_config(config), routing=evaluated_routing(config, metrics),
        implicit=read_implicit(config), tuning=read_tuning(config), budgets=read_budgets(config),
        gates=read_gates(config), cosine=task_adapter_cosine(config), train_logs=train_logs(config),
        sweep=sweep_scores(config, evaluations) if "sweep" in config else None,
        harness=read_harness(config) if config["evaluation"]["lm_eval"] else None)
