"""The pipeline's steps in one table: each step's function, its wildcards and the config sections it reads.

`moa <step>` is built from this table (moa.cli), the Snakemake rule of the same name runs it
(workflow/rules/), and both the rule's `config_hash` param, which decides reruns, and the step's MLflow
params come from the same `reads`, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moa.compose.composition import compose
from moa.compose.registry import LEARNED, METHODS, Need, needs_of
from moa.config import Config, config_hash, method_params
from moa.data.prepare import prepare_data
from moa.errors import MoaError
from moa.evaluate import evaluate
from moa.model.prepare import prepare_model
from moa.plan import preflight
from moa.report import build_report
from moa.step_result import StepResult
from moa.sweep import on_subset, sweep_rule
from moa.tracking import log_step
from moa.train.lora import train_lora, train_mixed
from moa.train.merge import learn_merge
from moa.train.router import train_router


@dataclass(frozen=True)
class Step:
    run: Callable[..., StepResult]  # run(config, **wildcards, **options)
    wildcards: tuple[str, ...]  # the rule's wildcards: required arguments of `moa <step>`
    reads: Callable[..., dict[str, Any]]  # reads(config, **wildcards): the config sections `run` depends on
    help: str
    options: tuple[str, ...] = ()  # optional arguments; of them, only `subset` is passed by a rule (its sweep rule's)


def _trainer(config: Config) -> dict[str, Any]:
    """What every trainer reads: the base model, the data, the LoRA shape, the trainer and the seed."""
    return {k: config[k] for k in ("model", "data", "lora", "training", "seed")}


def _composition(config: Config, method: str) -> dict[str, Any]:
    """What a composition is built from: its parameters and the adapters' shape, and for a method that reads
    the tasks' prompts through the base model (centroid), the model, the data and the dtype it runs in."""
    params = method_params(config, method)
    reads = {"method": params, "lora": config["lora"], "tasks": list(config["tasks"]), "seed": config["seed"]}
    if Need.TASK_PROMPTS in needs_of(params):
        reads |= {"model": config["model"], "data": config["data"], "dtype": config["evaluation"]["dtype"]}
    return reads


def _evaluation(config: Config) -> dict[str, Any]:
    """What `moa evaluate` reads of `evaluation`: all but the harness tasks, which only the lm-eval step runs."""
    return {key: value for key, value in config["evaluation"].items() if key != "lm_eval"}


def _harness_reads(config: Config, method: str) -> dict[str, Any]:
    """What the lm-eval step reads: the composition, how it is served, the harness tasks, the model and the seed."""
    served = {key: config["evaluation"][key] for key in ("dtype", "fold", "batch_size", "lm_eval")}
    return {"method": method_params(config, method), "evaluation": served, **_all_tasks(config),
            "model": config["model"], "seed": config["seed"]}


def _harness(config: Config, method: str) -> StepResult:
    if config["evaluation"]["lm_eval"] is None:
        raise MoaError("evaluation.lm_eval is not set, so there are no harness tasks to run; add it (e.g. "
                       "--configfile config/config.yaml config/lm_eval.yaml)")
    from moa.lm_harness import evaluate_harness  # the lm-eval extra: imported only where a harness step runs

    return evaluate_harness(config, method)


def _all_tasks(config: Config) -> dict[str, Any]:
    return {"tasks": config["tasks"], "order": list(config["tasks"])}  # the order is the expert / label index


STEPS: dict[str, Step] = {
    "prepare_model": Step(
        prepare_model, (), lambda c: {"model": c["model"], "seed": c["seed"]},
        "write the base model once as an HF directory -> model/ (a GGUF is dequantized here; later steps load "
        "model/)"),
    "prepare_data": Step(
        prepare_data, ("task",),
        lambda c, task: {"model_source": c["model"]["source"], "data": c["data"], "task": c["tasks"][task],
                         "seed": c["seed"]},
        "build data/{task}/{split}.parquet and stats.json for one task"),
    "train_lora": Step(
        train_lora, ("task",), lambda c, task: _trainer(c) | {"task": c["tasks"][task]},
        "train one task's LoRA -> adapters/{task}/ (PEFT format) + train_log.parquet; rerunning after an "
        "interruption resumes from the last checkpoint"),
    "train_mixed": Step(
        train_mixed, (), lambda c: _trainer(c) | _all_tasks(c),
        "train one LoRA on all tasks' data, balanced -> adapters/_mixed/ (the Single-LoRA (mixed) baseline); "
        "resumable like train-lora"),
    "train_router": Step(
        train_router, (), lambda c: _trainer(c) | _all_tasks(c) | {"router": c["router"]},
        "MoA stage 2: train a router before every block on the task LoRAs (teacher forcing) -> moa/ (routers, "
        "experts, router accuracy, confusion matrix); joint mode is resumable (--subset: on that sweep subset's tasks -> "
        "sweep/{subset}/moa/)", options=("subset",)),
    "learn_merge": Step(
        learn_merge, ("method",),
        lambda c, method: _trainer(c) | _all_tasks(c) | {"method": method_params(c, method),
                                                         "prompts_per_task": c["router"]["prompts_per_task"],
                                                         "dtype": c["evaluation"]["dtype"]},
        "a learned merge's coefficients or a token-level gate's weights over the frozen task LoRAs (cat, xlora, "
        "loraflow: by gradient on training rows; lorahub: gradient-free on validation rows; adamerging: by gradient "
        "on the entropy of unlabelled test prompts) -> "
        f"learned/{{method}}/ (--subset: on that sweep subset's tasks -> "
        f"sweep/{{subset}}/learned/{{method}}/). Methods: {', '.join(sorted(LEARNED))}", options=("subset",)),
    "compose": Step(
        compose, ("method",), lambda c, method: _composition(c, method),
        "build one composition from the trained adapters -> compositions/{method}/ (a PEFT adapter + "
        f"merge_report.json for merges; a manifest for base, oracle, moa and arrow; --subset: from that sweep subset's "
        f"tasks -> sweep/{{subset}}/compositions/{{method}}/). Methods: {', '.join(METHODS)}", options=("subset",)),
    "evaluate": Step(
        evaluate, ("method",),
        lambda c, method: {"method": method_params(c, method), "evaluation": _evaluation(c), **_all_tasks(c),
                           "model": c["model"], "data": c["data"], "seed": c["seed"]},
        "evaluate one composition on every task's test split, served as one mixed-task stream -> "
        "eval/{method}/{task}/predictions.parquet + metrics.parquet (--task: that task alone; --subset: a sweep "
        "subset's composition on its tasks -> sweep/{subset}/eval/)", options=("task", "subset")),
    "lm_eval": Step(
        _harness, ("method",), _harness_reads,
        "run evaluation.lm_eval's lm-evaluation-harness tasks on one composition through moa's harness model -> "
        "lm_eval/{method}/ (results.json, samples/{task}.jsonl; needs the lm-eval extra)"),
    "report": Step(
        build_report, (),
        lambda c: {"methods": {m: method_params(c, m) for m in c["methods"]}, "tasks": c["tasks"],
                   "order": [list(c["methods"]), list(c["tasks"])], "report": c["report"], "seed": c["seed"]},
        "collect every evaluation -> report/metrics.parquet; paired bootstrap intervals and comparisons against "
        "report.compare_to -> intervals.parquet, comparisons.parquet; the routing of the test prompts -> "
        "routing.parquet; summary.md with the verdict; PNG plots"),
}


def step_hash(name: str, config: Config, subset: str | None = None, **wildcards: str) -> str:
    """A short hash of what step `name` reads (on the sweep subset's config, with a subset): Snakemake reruns the
    step when it changes."""
    return config_hash(STEPS[name].reads(on_subset(config, subset), **wildcards))


def run_step(name: str, config: Config, subset: str | None = None, **arguments: str) -> StepResult:
    """Run step `name` on `config` (on its sweep subset `subset`'s config, moa.sweep.on_subset) with its wildcards
    and any options given, and log it as the MLflow run "{rule}:{wildcard values}": the rule is the step, or its
    sweep rule with the subset as the first wildcard ("sweep_compose:n4-s1,svd")."""
    step, scoped = STEPS[name], on_subset(config, subset)
    preflight(scoped, name, arguments.get("method"))  # before anything loads: does the job fit its device?
    result = step.run(scoped, **arguments)
    wildcards = {w: arguments[w] for w in step.wildcards}
    rule, labels = (name, wildcards) if subset is None else (sweep_rule(name), {"subset": subset} | wildcards)
    run = ":".join([rule, ",".join(labels.values())]) if labels else rule
    tags = {"moa.step": name} | {f"moa.{k}": v for k, v in (arguments | labels).items() if v is not None}
    log_step(scoped, run, tags, step.reads(scoped, **wildcards), curves=result.curves, artifacts=result.artifacts,
             metrics=result.metrics, tables=result.tables)
    return result
