"""The smoke workflow on a real single-node SLURM cluster with the slurm profile: every job is an sbatch
job, every output is written, and MLflow records the runs, in the SQLite store and on an MLflow server
bound to 127.0.0.1; a job that no node can hold stops the run before anything is submitted."""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.slurm import slurm_cluster  # noqa: F401 -- the session fixture
from tests.test_workflow import REPO, SMOKE, environment

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TASKS = ["qa", "sentiment"]
METHODS = ["base", "oracle", "moa", "svd"]
# The heavy rules of this DAG (no train_mixed: the DAG trains only what METHODS need, and none is `mixed`).
HEAVY = ["train_lora", "train_router", "compose", "evaluate"]
# The test cluster has `nproc` CPUs: the profile's per-rule threads and memory are sized for real nodes.
THREADS, MEM_MB = dict.fromkeys(HEAVY, 1), dict.fromkeys(HEAVY, 1500)


def slurm_options(threads: dict[str, int] = THREADS, mem_mb: dict[str, int] = MEM_MB) -> list[str]:
    return ["--profile", str(REPO / "workflow/profiles/slurm"), "--workflow-profile", "none",
            "--slurm-init-seconds-before-status-checks", "1", "--jobs", "4",
            "--set-threads", *(f"{rule}={n}" for rule, n in threads.items()),
            "--set-resources", *(f"{rule}:mem_mb={n}" for rule, n in mem_mb.items()),
            *(f"{rule}:runtime=15" for rule in HEAVY),
            *(f"{rule}:gpu=0" for rule in HEAVY),  # the profile is sized for GPU nodes; the test cluster has none
            "--default-resources", "mem_mb=1000", "runtime=15", "slurm_partition=debug"]


def small_smoke(workdir: Path) -> Path:
    """smoke.yaml cut to two tasks, four methods and four test rows: the same DAG shape, fewer jobs."""
    config = yaml.safe_load(SMOKE.read_text())
    config["tasks"] = {t: config["tasks"][t] for t in TASKS}
    config |= {"methods": {m: None for m in METHODS}, "evaluation": {"limit": 4}}
    path = workdir / "slurm-smoke.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_on_slurm(workdir: Path, options: list[str], tracking_uri: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(small_smoke(workdir)), *options]
    env = environment(workdir) | {"MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200, env=env)


def run_on_slurm(workdir: Path, tracking_uri: str) -> subprocess.CompletedProcess[str]:
    result = snakemake_on_slurm(workdir, slurm_options(), tracking_uri)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in (workdir / "results").rglob("*.log"))
    assert result.returncode == 0, result.stderr[-6000:] + logs[-6000:]
    return result


def assert_outputs(workdir: Path) -> None:
    exp = workdir / "results" / "smoke"
    for method in METHODS:
        assert (exp / "compositions" / method / "composition.json").is_file()
        for task in TASKS:
            assert (exp / "eval" / method / task / "metrics.parquet").is_file()
    assert (exp / "report" / "summary.md").is_file() and (exp / "moa" / "routers.safetensors").is_file()
    # every rule ran as its own sbatch job (the plugin keeps each job's SLURM log under its rule), but the prepare
    # rules, the only ones that download: they ran where snakemake runs (the login node)
    submitted = {p.name for p in (workdir / ".snakemake" / "slurm_logs").iterdir()}
    assert {f"rule_{rule}" for rule in [*HEAVY, "report"]} <= submitted, submitted
    assert not {"rule_prepare_model", "rule_prepare_data"} & submitted, submitted


def assert_runs(runs: list[tuple[str, str, str | None]]) -> None:
    """runs: (name, status, parent id) of every MLflow run of the experiment."""
    (parent,) = [r for r in runs if r[0].startswith("workflow:")]
    assert parent[1] == "FINISHED"
    children = {name for name, status, parent_id in runs if parent_id == parent[2] and status == "FINISHED"}
    expected = {"train_lora:qa", "train_lora:sentiment", "train_router", "compose:svd",
                "evaluate:moa", "evaluate:oracle", "report"}
    assert expected <= children, children


def test_smoke_workflow_on_slurm_with_the_sqlite_store(tmp_path: Path) -> None:
    run_on_slurm(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_outputs(tmp_path)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        ids = dict(db.execute("SELECT run_uuid, name FROM runs").fetchall())
        parents = dict(db.execute("SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'").fetchall())
        status = dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())
    parent_id = next(uid for uid, name in ids.items() if name.startswith("workflow:"))
    assert_runs([(name, status[uid], parents.get(uid, parent_id if uid == parent_id else None))
                 for uid, name in ids.items()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with its own SQLite store, until the test ends."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def test_smoke_workflow_on_slurm_with_an_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    workdir = tmp_path / "w"
    workdir.mkdir()
    run_on_slurm(workdir, mlflow_server)
    assert_outputs(workdir)
    assert not (workdir / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent_id = next(r.info.run_id for r in runs if r.info.run_name.startswith("workflow:"))
    assert_runs([(r.info.run_name, r.info.status,
                  parent_id if r.info.run_id == parent_id else r.data.tags.get(MLFLOW_PARENT_RUN_ID))
                 for r in runs])


def node_cpus() -> int:
    """The test node's CPUs (scripts/slurm-cluster.sh configures `nproc`)."""
    return int(subprocess.run(["nproc"], check=True, capture_output=True, text=True).stdout)


@pytest.mark.parametrize(("rule", "threads", "mem_mb", "request_", "fix"), [
    ("train_lora", node_cpus() + 1, 1500, rf"{node_cpus() + 1} CPUs, 1500 MB",
     rf"--set-threads train_lora={node_cpus()}"),
    ("train_router", 1, 10_000_000, "1 CPU, 10000000 MB", r"--set-resources train_router:mem_mb=\d+"),
])
def test_a_job_no_node_can_hold_stops_the_run_before_any_submission(
        tmp_path: Path, rule: str, threads: int, mem_mb: int, request_: str, fix: str) -> None:
    """More CPUs than the node has would wait forever (PartitionConfig); more memory, be refused by sbatch."""
    options = slurm_options(THREADS | {rule: threads}, MEM_MB | {rule: mem_mb})
    result = snakemake_on_slurm(tmp_path, options, f"sqlite:///{tmp_path / 'mlflow.db'}")
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"moa: error: rule {rule} asks for {request_} per job, but the largest node of SLURM "
                        rf"partition 'debug' \(\S+\) has {node_cpus()} CPUs?, \d+ MB, so the job could never start; "
                        rf"lower the request with {fix} \(on the command line or in the profile\)", errors[0]), errors
    assert not (tmp_path / ".snakemake" / "slurm_logs").exists()  # the plugin logs every job it submits there
    queue = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%Z"], check=True, capture_output=True,
                           text=True).stdout.split()
    assert str(tmp_path) not in queue  # no job of this run, pending or finished
    assert not (tmp_path / "mlflow.db").exists()  # stopped before the workflow's MLflow run began
