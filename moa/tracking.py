"""MLflow tracking that never costs a result: files under results/ are the record, and any tracking
failure (no server, a locked database) is one warning while the step completes.

Default store: sqlite:///{results_dir}/mlflow.db; the environment's MLFLOW_TRACKING_URI wins, then the
config's tracking.uri. Browse with: mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""

from __future__ import annotations

import logging
import os
import subprocess
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


def _warn(what: str, err: Exception) -> None:
    log.warning("moa: MLflow tracking skipped for %s (%s: %s); the results on disk are complete",
                what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")


def log_step(config: Config, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
             curves: pd.DataFrame | None = None, artifacts: Sequence[Path] = (),
             metrics: Mapping[str, float] | None = None) -> None:
    """One run `name` ("{step}:{wildcards}") with its tags, params, per-step metric curves, final
    metrics and artifacts; a child of the workflow's parent run when PARENT_RUN_ENV is set."""
    if not config["tracking"]["enabled"]:
        return
    try:
        _log(config, name, tags, params, curves, artifacts, metrics or {})
    except Exception as err:  # noqa: BLE001 -- tracking must never fail the step, whatever the backend raised
        _warn(name, err)


def _experiment_id(client: Any, config: Config) -> str:
    experiment = client.get_experiment_by_name(config["experiment"])
    if experiment:
        return experiment.experiment_id
    artifacts_root = (Path(config["results_dir"]).resolve() / "mlartifacts").as_uri()  # beside the results
    return client.create_experiment(config["experiment"], artifact_location=artifacts_root)


def git_commit() -> str | None:
    """The commit of the moa checkout (None outside a git work tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _run_tags(config: Config, name: str, tags: Mapping[str, str]) -> dict[str, str]:
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    run_tags = {MLFLOW_RUN_NAME: name, "moa.config_hash": config_hash(config),
                "snakemake.rule": name.split(":")[0]} | dict(tags)
    if commit := git_commit():
        run_tags[MLFLOW_GIT_COMMIT] = commit
    if os.environ.get(PARENT_RUN_ENV):
        run_tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_RUN_ENV]
    return run_tags


def _log(config: Config, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
         curves: pd.DataFrame | None, artifacts: Sequence[Path], final: Mapping[str, float]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri(config))
    run = client.create_run(_experiment_id(client, config), tags=_run_tags(config, name, tags), run_name=name)
    now = int(time.time() * 1000)
    metrics = [] if curves is None else [
        Metric(key, float(value), now, int(row["step"]))
        for row in curves.to_dict("records") for key, value in row.items()
        if key != "step" and pd.notna(value)]
    metrics += [Metric(key, float(value), now, 0) for key, value in final.items() if pd.notna(value)]
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow's limits per batch: 100 params, 1000 metrics
        client.log_batch(run.info.run_id, params=flat[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)


def start_workflow_run(config: Config) -> str | None:
    """The parent run of one workflow invocation (Snakemake's onstart); its id, or None if tracking failed."""
    if not config["tracking"]["enabled"]:
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri(config))
        name = f"workflow:{time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = _run_tags(config, name, {"moa.step": "workflow"})
        tags.pop("snakemake.rule")
        run = client.create_run(_experiment_id(client, config), tags=tags, run_name=name)
        return str(run.info.run_id)
    except Exception as err:  # noqa: BLE001 -- see log_step
        _warn("the workflow run", err)
        return None


def end_workflow_run(config: Config, run_id: str | None, status: str) -> None:
    """Close the parent run with "FINISHED" or "FAILED" (Snakemake's onsuccess / onerror)."""
    if run_id is None:
        return
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri(config)).set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 -- see log_step
        _warn("the workflow run", err)
