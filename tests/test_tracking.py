"""Training runs land in a real SQLite MLflow store, logged by the step or, in a workflow, from the spool;
an unreachable tracking server costs no result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moa.data.prepare import prepare_task
from moa.experiment import load_config
from moa.model.tokenizer import byte_tokenizer
from moa.steps import STEPS, run_step
from moa.tracking import SPOOL_ENV, Spool, browse_hint, flatten, tracking_uri

ROOT = Path(__file__).resolve().parents[1]
FAST = ["training.steps=6", "training.batch_size=4", "training.warmup_steps=2",
        "training.eval_every=3", "training.checkpoint_every=3"]


@pytest.fixture
def smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text()) | {"results_dir": str(tmp_path / "results")}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    prepare_task(load_config(path), "sentiment", byte_tokenizer())
    return path


def unreachable_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Track to a server that is not there (nothing listens on the discard port), failing fast."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.mark.parametrize("spooled", [False, True], ids=["by-the-step", "from-the-spool"])
def test_train_lora_logs_a_run_with_curves_params_and_artifacts(smoke: Path, spooled: bool, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    config = load_config(smoke, FAST)
    spool = Spool(tmp_path / "spool")
    if spooled:
        spool.directory.mkdir()
        monkeypatch.setenv(SPOOL_ENV, str(spool.directory))
    run_step("train_lora", config, task="sentiment")
    db = Path(config["results_dir"]).resolve() / "mlflow.db"
    if spooled:
        assert not db.exists() and len(list(spool.directory.glob("*.json"))) == 1
        assert spool.drain() == 1 and not any(spool.directory.iterdir())
    assert tracking_uri(config) == f"sqlite:///{db}"
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.artifact_location.endswith("results/mlartifacts")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "train_lora:sentiment" and run.info.status == "FINISHED"
    assert run.info.start_time < run.info.end_time
    assert run.data.tags["moa.step"] == "train_lora" and run.data.tags["moa.task"] == "sentiment"
    assert run.data.params["lora.rank"] == "8" and run.data.params["training.steps"] == "6"
    # the params are what the step reads, the sections whose hash decides its reruns
    assert run.data.params == flatten(STEPS["train_lora"].reads(config, task="sentiment"))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"train_log.parquet", "adapter_config.json"}


def test_a_spooling_step_never_imports_mlflow(smoke: Path, tmp_path: Path) -> None:
    from mlflow.utils import mlflow_tags

    from moa import tracking

    assert (tracking.MLFLOW_RUN_NAME, tracking.MLFLOW_PARENT_RUN_ID, tracking.MLFLOW_GIT_COMMIT) == (
        mlflow_tags.MLFLOW_RUN_NAME, mlflow_tags.MLFLOW_PARENT_RUN_ID, mlflow_tags.MLFLOW_GIT_COMMIT)
    step = ("import sys; from moa.experiment import load_config; from moa.tracking import log_step; "
            f"log_step(load_config({str(smoke)!r}), 'report', {{'moa.step': 'report'}}, {{'tasks': ['qa']}}); "
            "assert 'mlflow' not in sys.modules, 'mlflow was imported'")
    subprocess.run([sys.executable, "-c", step], check=True, env=os.environ | {SPOOL_ENV: str(tmp_path)})
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_an_unreachable_store_keeps_the_spooled_runs_with_one_warning(smoke: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from moa.tracking import log_step

    unreachable_store(monkeypatch)
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path))
    for name in ("train_lora:qa", "report"):
        log_step(load_config(smoke), name, {}, {})
    spool = Spool(tmp_path, interval=0.1)
    spool.start()
    spool.stop()  # at least two passes: the thread's, then the final one
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert caplog.text.count("MLflow runs wait in") == 1


def test_unreachable_tracking_server_is_a_warning(smoke: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    unreachable_store(monkeypatch)
    out = run_step("train_lora", load_config(smoke, FAST), task="sentiment").path
    assert (out / "adapter_model.safetensors").is_file() and (out / "train_log.parquet").is_file()
    assert "MLflow tracking skipped for train_lora:sentiment" in caplog.text


def test_workflow_parent_run_with_child_steps(smoke: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

    from moa.tracking import PARENT_RUN_ENV, end_workflow_run, start_workflow_run

    config = load_config(smoke, FAST)
    parent = start_workflow_run(config)
    assert parent is not None
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    run_step("train_lora", config, task="sentiment")
    run_step("report", config)
    end_workflow_run(config, parent, "FINISHED")
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name("smoke")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs[client.get_run(parent).info.run_name].info.status == "FINISHED"
    for name in ("train_lora:sentiment", "report"):
        tags = runs[name].data.tags
        assert tags[MLFLOW_PARENT_RUN_ID] == parent and tags["snakemake.rule"] == name.split(":")[0]
        assert len(tags["moa.config_hash"]) == 12 and len(tags.get(MLFLOW_GIT_COMMIT, "x" * 40)) == 40
    assert "summary.md" in {a.path for a in client.list_artifacts(runs["report"].info.run_id)}


def test_tracking_disabled_or_failing_workflow_run_is_none(smoke: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moa.tracking import end_workflow_run, start_workflow_run

    assert start_workflow_run(load_config(smoke, ["tracking.enabled=false"])) is None
    unreachable_store(monkeypatch)
    config = load_config(smoke)
    assert start_workflow_run(config) is None
    end_workflow_run(config, None, "FAILED")  # nothing to close, no error


def test_a_run_that_fails_half_way_is_not_left_half_logged(smoke: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from moa.tracking import log_step

    config = load_config(smoke)
    artifact = tmp_path / "summary.md"
    artifact.write_text("# Report\n")
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))
    log_step(config, "report", {"moa.step": "report"}, {"tasks": ["qa"]}, artifacts=[artifact])
    artifact.unlink()  # log_artifact fails after the run was created
    spool = Spool(tmp_path / "spool")
    assert spool.drain() == 0
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name("smoke").experiment_id
    assert client.search_runs([experiment]) == []
    artifact.write_text("# Report\n")
    assert spool.drain() == 1
    assert [r.info.run_name for r in client.search_runs([experiment])] == ["report"]


def test_a_file_that_is_not_a_run_record_is_moved_aside(smoke: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from moa.tracking import log_step

    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "0-garbage.json").write_text("{not json")
    (spool / "1-other.json").write_text('{"name": "x"}')
    monkeypatch.setenv(SPOOL_ENV, str(spool))
    log_step(load_config(smoke), "report", {"moa.step": "report"}, {})
    assert Spool(spool).drain() == 1
    assert sorted(p.name for p in spool.iterdir()) == ["0-garbage.json.invalid", "1-other.json.invalid"]
    assert "0-garbage.json is not a moa run record" in caplog.text


@pytest.mark.parametrize("spooled", [False, True], ids=["by-the-step", "from-the-spool"])
def test_report_run_carries_intervals_p_values_and_its_table(tmp_path: Path, spooled: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The report run a user opens in MLflow: the multitask scores with their bounds and p-values as metrics,
    the comparison as a logged table (mlflow.log_table), the two Parquet files as artifacts; the experiment is
    tagged as model training, so MLflow 3's UI opens it on the runs table, not on the GenAI traces view."""
    from mlflow import MlflowClient

    from tests.test_report import make_config, write_metrics

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = make_config(tmp_path)
    write_metrics(config)
    client = MlflowClient(tracking_uri(config))
    client.create_experiment(config["experiment"])  # as an older moa made it: no kind tag
    spool = Spool(tmp_path / "spool")
    if spooled:
        spool.directory.mkdir()
        monkeypatch.setenv(SPOOL_ENV, str(spool.directory))
    run_step("report", config)
    if spooled:
        assert spool.drain() == 1
    experiment = client.get_experiment_by_name(config["experiment"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    assert metrics["multitask_score.moa.lo"] <= metrics["multitask_score.moa"] <= metrics["multitask_score.moa.hi"]
    assert 0 < metrics["vs_moa.multitask_score.base.p_holm"] <= 1 and "vs_oracle.qa.normalized.svd.p" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"intervals.parquet", "comparisons.parquet", "summary.md", "comparison.json"} <= artifacts
    assert {"path": "comparison.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    table = pd.read_json(client.download_artifacts(run.info.run_id, "comparison.json", str(tmp_path)), orient="split")
    assert table["method"].tolist() == ["moa", "oracle", "base", "svd"]
    assert table.loc[0, "multitask_score"] == pytest.approx(metrics["multitask_score.moa"])
    # what the workflow prints at its end: links that open the model-training view and this table
    hint = browse_hint(client, tracking_uri(config), experiment.experiment_id)
    runs = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
    assert f"MLflow: {runs}?workflowType=machine_learning after `mlflow ui --backend-store-uri sqlite:///" in hint
    assert f"{runs}/{run.info.run_id}/artifacts/comparison.json?workflowType=machine_learning" in hint
