"""An experiment's config as every command and the workflow load it: valid against the schema (moa.config) and
against what the schema cannot say, which needs moa's registries (its methods, tasks, batching and sweep). Every
error is one line naming the key."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moa.compose.merge import tunable
from moa.compose.registry import GATED_METHODS, LEARNED, METHODS, settings
from moa.config import Config, method_params, read_config, schema, validate_schema
from moa.data.batching import Batching
from moa.data.prepare import split_sizes
from moa.data.tasks import get_task
from moa.errors import MoaError
from moa.gates import GateKind, GateSpec
from moa.roles import ORACLE
from moa.sweep import recomposable, swept_methods


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config file with the `--set` overrides applied, validated (see validate)."""
    return _check(read_config(path, overrides), str(path))


def validate(config: Config, source: str = "config") -> Config:
    """Validate in place (filling defaults) and return the config; a violation is one MoaError line."""
    return _check(validate_schema(config, source), source)


def _check(config: Config, source: str) -> Config:
    """What the schema cannot say, of a config the schema accepts."""
    for name in config.get("methods", {}):
        _check_method(config, name, source)
    _check_lengths(config, source)
    _check_formats(config, source)
    _check_sweep(config, source)
    _check_harness(config, source)
    unknown = [m for m in config["report"]["compare_to"] or () if m not in config["methods"]]
    if unknown:
        raise MoaError(f"{source}: report.compare_to: {', '.join(unknown)} is not a configured method; "
                       f"use names under `methods` ({', '.join(config['methods'])})")
    return config


def _check_method(config: Config, name: str, source: str) -> None:
    """What the schema cannot say: the name is a method (or sets one), and only its own keys are set."""
    params = method_params(config, name)
    method, where = params["method"], f"{source}: methods.{name}"
    if method not in METHODS:
        raise MoaError(f"{where}: {method!r} is not a method; add `method:` with one of {', '.join(METHODS)}")
    extra = sorted(params.keys() - {"method"} - METHODS[method].params.keys())
    if extra:
        raise MoaError(f"{where}: {', '.join(extra)} does not apply to method {method!r}; remove it")
    untunable = sorted((params.get("tune") or {}).keys() - set(tunable(method))) if params.get("tune") else []
    if untunable:
        raise MoaError(f"{where}.tune.{untunable[0]}: {method} has no such parameter to tune; tune "
                       f"{', '.join(tunable(method))}")
    if params.get("tune_rows") and params.get("tune") is None:
        raise MoaError(f"{where}.tune_rows: applies only to a tuned merge; add `tune: {{}}` or remove it")
    listed = config["methods"] != schema()["properties"]["methods"]["default"]  # the default runs it anyway
    if method in LEARNED and len(config["tasks"]) < 2 and listed:
        raise MoaError(f"{where}: {method} learns how to combine task LoRAs, and there is one task; add tasks or "
                       "remove it")
    if method in GATED_METHODS and (listed or len(config["tasks"]) > 1):
        _check_gate(config, params, where)
    _check_rows(config, where, "shots", params.get("shots", METHODS[method].params.get("shots")), "validation")
    _check_rows(config, where, "prompts", params.get("prompts"), "test")
    _check_rows(config, where, "tune_rows", params.get("tune_rows"), "validation")
    weights, tasks = params.get("weights"), list(config["tasks"])
    if isinstance(weights, list) and len(weights) != len(tasks):
        raise MoaError(f"{where}.weights: {len(weights)} weights for {len(tasks)} tasks; give one per task")
    if isinstance(weights, dict) and weights.keys() != set(tasks):
        raise MoaError(f"{where}.weights: keys must be exactly the tasks ({', '.join(tasks)})")


def _check_gate(config: Config, params: dict[str, Any], where: str) -> None:
    """A gate's settings in range for the config's tasks (the model's shapes do not matter here)."""
    gate = {key: value for key, value in settings(params).items() if key in GateSpec.__dataclass_fields__}
    try:
        GateSpec(GateKind(params["method"]), 1, 1, 1, tuple(config["tasks"]), **gate).check()
    except MoaError as error:
        raise MoaError(f"{where}: {error}") from None


def _check_rows(config: Config, where: str, key: str, wanted: int | None, split: str) -> None:
    """The rows per task a learned or tuned merge reads (`key`) fit every task's configured `split` (prepare-data may
    drop a few too long to train on)."""
    if not wanted:
        return
    rows = {task: split_sizes(config, task)[split] for task in config["tasks"]}
    task = min(rows, key=rows.get)
    if wanted > rows[task]:
        raise MoaError(f"{where}.{key}: {wanted} is more than task {task}'s {rows[task]} {split} rows; use at most "
                       f"{rows[task]} or raise data.sizes.{split}")


def _check_lengths(config: Config, source: str) -> None:
    """A packed training row must hold the longest example prepare-data can keep: its prompt, its target
    and the EOS that ends it."""
    data, training = config["data"], config["training"]
    longest = data["max_prompt_tokens"] + data["max_target_tokens"] + 1
    if training["batching"] == Batching.PACK and training["seq_len"] < longest:
        raise MoaError(f"{source}: training.seq_len={training['seq_len']} cannot hold an example of "
                       f"data.max_prompt_tokens + data.max_target_tokens + 1 (EOS) = {longest} tokens; raise "
                       f"training.seq_len to {longest} or lower data.max_prompt_tokens / data.max_target_tokens")


def _check_formats(config: Config, source: str) -> None:
    """What the schema cannot say about a task's `format`: it is a valid regex, of a task that generates."""
    for name, spec in config["tasks"].items():
        if spec and "format" in spec:
            try:
                get_task(config, name)
            except MoaError as err:
                raise MoaError(f"{source}: {err}") from None


def _check_harness(config: Config, source: str) -> None:
    """evaluation.lm_eval needs the harness installed and maps harness tasks to the config's tasks. (Whether the
    harness knows each task is checked where the harness is loaded, moa.lm_harness.check_tasks: indexing its tasks
    takes seconds.)"""
    settings, where = config["evaluation"]["lm_eval"], f"{source}: evaluation.lm_eval"
    if settings is None:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise MoaError(f"{where}: lm-evaluation-harness is not installed; pip install 'moa[lm-eval]' (or remove "
                       "evaluation.lm_eval)")
    unknown = {harness: task for harness, task in (settings["task_map"] or {}).items() if task not in config["tasks"]}
    if unknown:
        harness, task = next(iter(unknown.items()))
        raise MoaError(f"{where}.task_map.{harness}: {task!r} is not a task of the config; map it to one of "
                       f"{', '.join(config['tasks'])}")


def _check_sweep(config: Config, source: str) -> None:
    """Each sweep size is a number of the tasks; the sweep has methods to recompose and the oracle to normalize by."""
    if "sweep" not in config:
        return
    n_tasks, where = len(config["tasks"]), f"{source}: sweep"
    larger = next((n for n in config["sweep"]["n_tasks"] if n > n_tasks), None)
    if larger:
        raise MoaError(f"{where}.n_tasks: {larger} is more than the {n_tasks} tasks; use sizes from 1 to {n_tasks}")
    if ORACLE not in config["methods"]:
        raise MoaError(f"{where}: the sweep's multitask scores are normalized by the oracle; add `{ORACLE}: null` to "
                       "methods")
    can = recomposable(config)
    cannot = [m for m in config["sweep"]["methods"] or () if m not in can]
    if cannot:
        raise MoaError(f"{where}.methods: {cannot[0]} is not a configured method that a sweep recomposes; use some of "
                       f"{', '.join(can) or '(none configured)'}")
    if not swept_methods(config):
        raise MoaError(f"{where}: no configured method is recomposed on a subset (merges, moa, routers over the task "
                       "LoRAs); add one to methods")
