"""Every folder and file of results/{experiment}/, in one place: the Python steps, the Snakemake rules
(workflow/rules/common.smk) and the tests all build their paths here.

    model/                      the base model as an HF directory (+ moa_source.json: what it came from)
    data/{task}/                {train,validation,test}.parquet, stats.json
    adapters/{task}/            PEFT adapter + train_log.parquet; adapters/_mixed/: the mixed-data LoRA
    checkpoints/{name}/         a training's last checkpoint (gone once its outputs are written)
    moa/                        routers, router_config.json, router_eval.parquet, confusion.parquet,
                                train_log.parquet, experts/{task}/
    compositions/{method}/      composition.json (+ a PEFT adapter and merge_report.json for merges)
    eval/{method}/{task}/       predictions.parquet, metrics.parquet, info.json
    sweep/{subset}/             a task subset of the sweep (moa.sweep): tasks.json, and its own moa/,
                                compositions/, eval/ and checkpoints/ (model/, data/, adapters/ are shared)
    report/                     summary.md, and each report section's {table}.parquet and {plot}.png
                                (moa.report.sections names them)
    logs/, benchmarks/          every job's log and Snakemake benchmark
    mlflow-spool/               run records waiting for the workflow to log them
    .config/                    the validated config each workflow hands its jobs
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moa.errors import MoaError

# File names fixed by formats that tools outside moa read: PEFT adapters and moa's router bundle.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROUTER_WEIGHTS = "routers.safetensors"
ROUTER_CONFIG = "router_config.json"

MIXED = "_mixed"  # adapters/_mixed/: the paper's "Single-LoRA (mixed)" baseline, one LoRA on every task
SPLITS = ("train", "validation", "test")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TRAIN_LOG = "train_log.parquet"
MANIFEST = "composition.json"  # in compositions/{method}/
MERGE_REPORT = "merge_report.json"  # in compositions/{merge}/
LEARNED_COEFFICIENTS = "coefficients.safetensors"  # in learned/{name}/: a merge's [modules, tasks] or [tasks], or a
# gate's weights
LEARNED_INFO = "learned.json"  # in learned/{merge}/: the merge they combine by, the data used, the time taken
GATE_USAGE = "gate_usage.parquet"  # in learned/{gate}/: the mean gate weight per true task, layer and expert
TUNE = "tune.parquet"  # in compositions/{tuned merge}/: every candidate of its grid on validation
CENTROIDS = "centroids.safetensors"  # in compositions/centroid/: [layers, tasks, hidden]
CENTROID_EVAL = "centroid_eval.parquet"  # in compositions/centroid/: each layer's validation accuracy
HARNESS_RESULTS = "results.json"  # in lm_eval/{method}/: the harness's results, configs and versions
HARNESS_SAMPLES = "samples"  # in lm_eval/{method}/: {task}.jsonl, the harness's per-sample logs
# The key under which a sweep subset's config (moa.sweep.restrict) names its subset; no config file can set it (the
# schema has no such key).
SUBSET = "subset"


def trained_task_adapters(config: Mapping[str, Any]) -> list[Path]:
    """The task LoRAs, experts 0..N-1 in the config's task order, each checked to be trained (before any slow
    model load): what a composition over them and the MoA router training start from."""
    dirs = ExperimentPaths.of(config).task_adapters(config["tasks"])
    for path in dirs:
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise MoaError(f"{path}: no trained adapter for task {path.name!r}; "
                           f"run `moa train-lora --config ... --task {path.name}` first")
    return dirs


@dataclass(frozen=True)
class ExperimentPaths:
    """The paths of one experiment's results. Any name may be a Snakemake wildcard such as "{task}".

    With a `subset`, routers, compositions, evaluations and checkpoints are that sweep subset's, under
    sweep/{subset}/; the base model, the data and the task adapters stay the experiment's."""

    root: Path
    subset: str | None = None

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> ExperimentPaths:
        return cls(Path(config["results_dir"]) / config["experiment"], config.get(SUBSET))

    def of_subset(self, subset: str) -> ExperimentPaths:
        return replace(self, subset=subset)

    @property
    def scope(self) -> Path:
        """Where the routers, compositions, evaluations and checkpoints live: the root, or the subset's folder."""
        return self.root if self.subset is None else self.root / "sweep" / self.subset

    @property
    def subset_tasks(self) -> Path:
        """sweep/{subset}/tasks.json: the subset's tasks."""
        assert self.subset is not None, "only a sweep subset has a tasks.json"
        return self.scope / "tasks.json"

    # --- the base model and the data ---------------------------------------------------------------

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def model_files(self) -> list[Path]:
        return [self.model / name for name in MODEL_FILES]

    @property
    def model_source(self) -> Path:
        """Which config.model (and seed) model/ was prepared from."""
        return self.model / "moa_source.json"

    def data(self, task: str) -> Path:
        return self.root / "data" / task

    def split(self, task: str, split: str) -> Path:
        return self.data(task) / f"{split}.parquet"

    def data_stats(self, task: str) -> Path:
        return self.data(task) / "stats.json"

    # --- training ---------------------------------------------------------------------------------

    def adapter(self, name: str) -> Path:
        """adapters/{name}/: a task's LoRA, or MIXED."""
        return self.root / "adapters" / name

    def task_adapters(self, tasks: Iterable[str]) -> list[Path]:
        """adapters/{task}/ of each task, in order: the experts 0..N-1 of a composition over the task LoRAs."""
        return [self.adapter(task) for task in tasks]

    def adapter_files(self, name: str, train_log: bool = True) -> list[Path]:
        files = [self.adapter(name) / ADAPTER_WEIGHTS, self.adapter(name) / ADAPTER_CONFIG]
        return files + ([self.train_log(name)] if train_log else [])

    def train_log(self, name: str) -> Path:
        return self.adapter(name) / TRAIN_LOG

    def checkpoint(self, name: str) -> Path:
        return self.scope / "checkpoints" / name

    @property
    def moa(self) -> Path:
        """moa/: what train-router writes."""
        return self.scope / "moa"

    @property
    def routers(self) -> list[Path]:
        """The router bundle that compose reads (weights and spec)."""
        return [self.moa / ROUTER_WEIGHTS, self.moa / ROUTER_CONFIG]

    @property
    def router_eval(self) -> Path:
        return self.moa / "router_eval.parquet"

    @property
    def router_confusion(self) -> Path:
        return self.moa / "confusion.parquet"

    @property
    def router_files(self) -> list[Path]:
        return [*self.routers, self.router_eval, self.router_confusion, self.moa / TRAIN_LOG]

    def expert(self, task: str) -> Path:
        """moa/experts/{task}/: the expert MoA serves for a task (the task LoRA, or its joint fine-tune)."""
        return self.moa / "experts" / task

    def learned(self, method: str) -> Path:
        """learned/{method}/: what `moa learn-merge` found for a learned merge (its coefficients)."""
        return self.scope / "learned" / method

    def learned_files(self, method: str) -> list[Path]:
        """The coefficients, what they were learned from (learned.json) and the learning's log."""
        folder = self.learned(method)
        return [folder / LEARNED_COEFFICIENTS, folder / LEARNED_INFO, folder / TRAIN_LOG]

    # --- compositions and evaluations ----------------------------------------------------------------

    def composition(self, method: str) -> Path:
        return self.scope / "compositions" / method

    def manifest(self, method: str) -> Path:
        return self.composition(method) / MANIFEST

    def merge_report(self, method: str) -> Path:
        return self.composition(method) / MERGE_REPORT

    def tune(self, method: str) -> Path:
        return self.composition(method) / TUNE

    def evaluations(self, method: str) -> Path:
        """eval/{method}/: one composition's evaluation, a folder per task."""
        return self.scope / "eval" / method

    def evaluation(self, method: str, task: str) -> Path:
        return self.evaluations(method) / task

    def predictions(self, method: str, task: str) -> Path:
        return self.evaluation(method, task) / "predictions.parquet"

    def metrics(self, method: str, task: str) -> Path:
        return self.evaluation(method, task) / "metrics.parquet"

    def eval_info(self, method: str, task: str) -> Path:
        return self.evaluation(method, task) / "info.json"

    def harness(self, method: str) -> Path:
        """lm_eval/{method}/: the lm-evaluation-harness tasks of evaluation.lm_eval on one composition (results.json,
        samples/{task}.jsonl)."""
        return self.scope / "lm_eval" / method

    def harness_results(self, method: str) -> Path:
        return self.harness(method) / HARNESS_RESULTS

    def harness_samples(self, method: str, task: str) -> Path:
        return self.harness(method) / HARNESS_SAMPLES / f"{task}.jsonl"

    def implicit_routing(self, method: str, task: str) -> Path:
        """An exact merge's per-sequence component responses (see moa.implicit)."""
        return self.evaluation(method, task) / "implicit_routing.parquet"

    # --- the report ------------------------------------------------------------------------------

    @property
    def report(self) -> Path:
        return self.root / "report"

    def report_table(self, name: str) -> Path:
        return self.report / f"{name}.parquet"

    @property
    def summary(self) -> Path:
        return self.report / "summary.md"

    def plot(self, name: str) -> Path:
        return self.report / f"{name}.png"

    # --- bookkeeping ---------------------------------------------------------------------------------

    def log(self, rule: str, *wildcards: str) -> Path:
        """logs/{rule}.log, or logs/{rule}/{w1}/.../{wn}.log for a rule with wildcards."""
        return self._per_job(self.root / "logs", rule, wildcards, ".log")

    def benchmark(self, rule: str, *wildcards: str) -> Path:
        return self._per_job(self.root / "benchmarks", rule, wildcards, ".tsv")

    @staticmethod
    def _per_job(folder: Path, rule: str, wildcards: tuple[str, ...], suffix: str) -> Path:
        if not wildcards:
            return folder / f"{rule}{suffix}"
        return folder.joinpath(rule, *wildcards[:-1], f"{wildcards[-1]}{suffix}")

    @property
    def spool(self) -> Path:
        return self.root / "mlflow-spool"

    @property
    def config_dir(self) -> Path:
        return self.root / ".config"
