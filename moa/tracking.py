"""MLflow tracking that never costs a result: files under results/ are the record, and any tracking
failure (no server, a locked database) is one warning while the step completes.

Default store: sqlite:///{results_dir}/mlflow.db; the environment's MLFLOW_TRACKING_URI wins, then the
config's tracking.uri. Browse with: mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moa.config import Config, config_hash

log = logging.getLogger("moa.tracking")
PARENT_RUN_ENV = "MOA_MLFLOW_PARENT_RUN_ID"  # set by the workflow: steps become its child runs


def tracking_uri(config: Config) -> str:
    default = f"sqlite:///{Path(config['results_dir']).resolve() / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI") or config["tracking"]["uri"] or default


def flatten(section: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ("lora.rank": "8")."""
    flat: dict[str, str] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)[:500]  # MLflow caps a param's length
    return flat


def log_step(config: Config, step: str, tags: Mapping[str, str], params: Mapping[str, Any],
             curves: pd.DataFrame | None = None, artifacts: Sequence[Path] = ()) -> None:
    """One run named `step` with its tags, params, per-step metric curves and artifacts."""
    if not config["tracking"]["enabled"]:
        return
    try:
        _log(config, step, tags, params, curves, artifacts)
    except Exception as err:  # tracking must never fail the step, whatever the backend raised
        log.warning("moa: MLflow tracking skipped for %s (%s: %s); the results on disk are complete",
                    step, type(err).__name__, str(err).splitlines()[0] if str(err) else "")


def _log(config: Config, step: str, tags: Mapping[str, str], params: Mapping[str, Any],
         curves: pd.DataFrame | None, artifacts: Sequence[Path]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config["experiment"])
    artifacts_root = (Path(config["results_dir"]).resolve() / "mlartifacts").as_uri()  # beside the results
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(config["experiment"], artifact_location=artifacts_root))
    run_tags = {MLFLOW_RUN_NAME: step, "moa.config_hash": config_hash(config)} | dict(tags)
    if os.environ.get(PARENT_RUN_ENV):
        run_tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_RUN_ENV]
    run = client.create_run(experiment_id, tags=run_tags, run_name=step)
    now = int(time.time() * 1000)
    metrics = [] if curves is None else [
        Metric(key, float(value), now, int(row["step"]))
        for row in curves.to_dict("records") for key, value in row.items()
        if key != "step" and pd.notna(value)]
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow's limits per batch: 100 params, 1000 metrics
        client.log_batch(run.info.run_id, params=flat[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
