"""MLflow tracking that never costs a result: files under results/ are the record, and any tracking
failure (no server, a locked database) is one warning while the step completes.

A step run by hand logs its run itself. In a workflow, steps leave their runs as JSON records in a
spool directory and the Snakemake process logs them as they appear (Spool): one MLflow import and one
store connection per workflow, not per job.

Default store: sqlite:///{results_dir}/mlflow.db; the environment's MLFLOW_TRACKING_URI wins, then the
config's tracking.uri. Browse with: mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import pandas as pd

from moa.config import Config, config_hash
from moa.io import atomic_file

log = logging.getLogger("moa.tracking")
PARENT_RUN_ENV = "MOA_MLFLOW_PARENT_RUN_ID"  # set by the workflow: steps become its child runs
SPOOL_ENV = "MOA_MLFLOW_SPOOL"  # set by the workflow: steps leave their runs there (see Spool)
# mlflow.utils.mlflow_tags' names: importing mlflow costs a step seconds it does not need when spooling.
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview ("Traces: 0"); moa's are model
# training, whose runs table is the view that compares them.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
COMPARISON_TABLE = "comparison.json"  # the report run's table (mlflow.log_table): one row per method
STARTED_MS = int(time.time() * 1000)  # a step imports this module as it starts: its run's start time


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


def _reason(err: Exception) -> str:
    """"Type: first line of the message", for one-line warnings."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _warn(what: str, err: Exception) -> None:
    log.warning("moa: MLflow tracking skipped for %s (%s); the results on disk are complete", what, _reason(err))


def log_step(config: Config, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
             curves: pd.DataFrame | None = None, artifacts: Sequence[Path] = (),
             metrics: Mapping[str, float] | None = None, tables: Mapping[str, pd.DataFrame] | None = None) -> None:
    """One run `name` ("{step}:{wildcards}") with its tags, params, per-step metric curves, final
    metrics, artifacts and tables (mlflow.log_table); a child of the workflow's parent run when
    PARENT_RUN_ENV is set. Inside a workflow (SPOOL_ENV set) the run is written to the spool for the
    workflow to log."""
    if not config["tracking"]["enabled"]:
        return
    record = _run_record(config, name, tags, params, curves, artifacts, metrics or {}, tables or {})
    if spool := os.environ.get(SPOOL_ENV):
        path = Path(spool) / f"{record['end_time']}-{os.getpid()}-{name.replace('/', '_')}.json"
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record))
        return
    try:
        log_record(_client(record["uri"]), record)
    except Exception as err:  # noqa: BLE001 -- tracking must never fail the step, whatever the backend raised
        _warn(name, err)


class RunRecord(TypedDict):
    """Everything MLflow needs to log a step's run later, from any process, as plain JSON."""

    uri: str
    experiment: str
    artifact_location: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: list[tuple[str, float, int, int]]  # key, value, timestamp (ms), step
    artifacts: list[str]
    start_time: int
    end_time: int
    tables: NotRequired[dict[str, dict[str, list]]]  # artifact file -> DataFrame.to_dict("split") (JSON-safe)


def _run_record(config: Config, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                curves: pd.DataFrame | None, artifacts: Sequence[Path], final: Mapping[str, float],
                tables: Mapping[str, pd.DataFrame]) -> RunRecord:
    now = int(time.time() * 1000)
    metrics = [] if curves is None else [
        (key, float(value), now, int(row["step"]))
        for row in curves.to_dict("records") for key, value in row.items()
        if key != "step" and pd.notna(value)]
    metrics += [(key, float(value), now, 0) for key, value in final.items() if pd.notna(value)]
    return RunRecord(uri=tracking_uri(config), experiment=config["experiment"],
                     artifact_location=_artifact_location(config), name=name, tags=_run_tags(config, name, tags),
                     params=flatten(params), metrics=metrics, artifacts=[str(Path(a).resolve()) for a in artifacts],
                     start_time=STARTED_MS, end_time=now,
                     tables={file: json.loads(table.to_json(orient="split", index=False)) for file, table in tables.items()})


def _artifact_location(config: Config) -> str:
    return (Path(config["results_dir"]).resolve() / "mlartifacts").as_uri()  # beside the results


def _experiment_id(client: Any, name: str, artifact_location: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in experiment.tags:  # created by an older moa, or by hand
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def git_commit() -> str | None:
    """The commit of the moa checkout (None outside a git work tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _run_tags(config: Config, name: str, tags: Mapping[str, str]) -> dict[str, str]:
    run_tags = {MLFLOW_RUN_NAME: name, "moa.config_hash": config_hash(config),
                "snakemake.rule": name.split(":")[0]} | dict(tags)
    if commit := git_commit():
        run_tags[MLFLOW_GIT_COMMIT] = commit
    if os.environ.get(PARENT_RUN_ENV):
        run_tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_RUN_ENV]
    return run_tags


@functools.cache
def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def log_record(client: Any, record: RunRecord) -> None:
    """Log one run record as a finished MLflow run."""
    from mlflow.entities import Metric, Param

    experiment = _experiment_id(client, record["experiment"], record["artifact_location"])
    run_id = client.create_run(experiment, start_time=record["start_time"], tags=record["tags"],
                               run_name=record["name"]).info.run_id
    params = [Param(k, v) for k, v in record["params"].items()]
    metrics = [Metric(*m) for m in record["metrics"]]
    try:
        for i in range(0, len(params), 100):  # MLflow's limits per batch: 100 params, 1000 metrics
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for path in record["artifacts"]:
            client.log_artifact(run_id, path)
        for file, table in record.get("tables", {}).items():
            client.log_table(run_id, pd.DataFrame(table["data"], columns=table["columns"]), file)
        client.set_terminated(run_id, end_time=record["end_time"])
    except Exception:
        with contextlib.suppress(Exception):  # no half-logged run; a retry logs it whole
            client.delete_run(run_id)
        raise


class Spool:
    """The run records of a workflow's jobs, logged by one thread of the workflow's own process: MLflow
    is imported and its store opened once per workflow instead of once per job (seconds each), only
    one process writes to the store (SQLite stays safe under SLURM), and a job never waits on a
    tracking server. A record that cannot be logged stays for the next pass or the next workflow."""

    def __init__(self, directory: Path, interval: float = 2.0) -> None:
        self.directory = directory
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="moa-mlflow-spool", daemon=True)
        self._failing = False

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        """Log what is left and stop (Snakemake's onsuccess / onerror)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.drain()

    def _poll(self) -> None:
        while True:
            self.drain()
            if self._stop.wait(self.interval):
                return

    def drain(self) -> int:
        """Log every record in the spool, oldest first, deleting each once logged; the number logged."""
        logged = 0
        for path in sorted(self.directory.glob("*.json")):
            if (record := _read_record(path)) is None:
                log.warning("moa: %s is not a moa run record; moved aside to %s.invalid", path, path.name)
                path.rename(path.with_name(f"{path.name}.invalid"))
                continue
            try:
                log_record(_client(record["uri"]), record)
            except Exception as err:  # noqa: BLE001 -- see log_step
                if not self._failing:  # once per outage, not once per pass
                    log.warning("moa: MLflow runs wait in %s (%s); this workflow or the next logs them once "
                                "the tracking store answers", self.directory, _reason(err))
                self._failing = True
                return logged
            self._failing = False
            path.unlink()
            logged += 1
        return logged


def _read_record(path: Path) -> RunRecord | None:
    """A run record written by log_step, or None for anything else (so one bad file blocks no run)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and RunRecord.__required_keys__ <= record.keys() else None


def start_workflow_run(config: Config) -> str | None:
    """The parent run of one workflow invocation (Snakemake's onstart); its id, or None if tracking failed."""
    if not config["tracking"]["enabled"]:
        return None
    try:
        client = _client(tracking_uri(config))
        name = f"workflow:{time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = _run_tags(config, name, {"moa.step": "workflow"})
        tags.pop("snakemake.rule")
        experiment = _experiment_id(client, config["experiment"], _artifact_location(config))
        run = client.create_run(experiment, tags=tags, run_name=name)
        return str(run.info.run_id)
    except Exception as err:  # noqa: BLE001 -- see log_step
        _warn("the workflow run", err)
        return None


def end_workflow_run(config: Config, run_id: str | None, status: str) -> None:
    """Close the parent run with "FINISHED" or "FAILED" (Snakemake's onsuccess / onerror), and say where to
    look at the runs."""
    if run_id is None:
        return
    try:
        client = _client(tracking_uri(config))
        client.set_terminated(run_id, status)
        log.warning("moa: %s", browse_hint(client, tracking_uri(config), client.get_run(run_id).info.experiment_id))
    except Exception as err:  # noqa: BLE001 -- see log_step
        _warn("the workflow run", err)


def browse_hint(client: Any, uri: str, experiment_id: str) -> str:
    """Where the runs are in MLflow's UI: its runs table in the model-training view (MLflow 3 opens on the GenAI
    one unless the link says `workflowType=machine_learning`), and the latest report's comparison table."""
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    runs = f"{server}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    lines = [f"MLflow: {runs}"]
    if not uri.startswith(("http://", "https://")):
        lines[0] += f" after `mlflow ui --backend-store-uri {uri}`"
    reports = client.search_runs([experiment_id], "attributes.run_name = 'report'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if reports:
        lines.append(f"the report's comparison: {server}/#/experiments/{experiment_id}/runs/{reports[0].info.run_id}"
                     f"/artifacts/{COMPARISON_TABLE}?workflowType=machine_learning")
    return "\n".join(lines)
