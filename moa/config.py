"""Experiment configs: YAML, `--set dotted.key=value` overrides typed by the schema, validation with
defaults filled in. Every error is one line naming the key."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from moa.data.batching import Batching
from moa.data.tasks import get_task
from moa.errors import MoaError

SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"
Config = dict[str, Any]


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(cls: type[jsonschema.protocols.Validator]) -> type[jsonschema.protocols.Validator]:
    """A validator that fills in `default`s while validating (the jsonschema FAQ recipe)."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def validate(config: Config, source: str = "config") -> Config:
    """Validate in place (filling defaults) and return the config; a violation is one MoaError line."""
    errors = list(_Validator(schema()).iter_errors(config))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise MoaError(f"{source}: {key}: {error.message}")
    for name in config.get("methods", {}):
        _check_method(config, name, source)
    _check_lengths(config, source)
    _check_formats(config, source)
    _check_sweep(config, source)
    unknown = [m for m in config["report"]["compare_to"] or () if m not in config["methods"]]
    if unknown:
        raise MoaError(f"{source}: report.compare_to: {', '.join(unknown)} is not a configured method; "
                       f"use names under `methods` ({', '.join(config['methods'])})")
    return config


def method_params(config: Config, name: str) -> dict[str, Any]:
    """A composition's parameters with `method` filled in (the entry's name unless set)."""
    if name not in config["methods"]:
        raise MoaError(f"methods.{name}: no such composition in the config; known: {', '.join(config['methods'])}")
    return {"method": name} | (config["methods"][name] or {})


def _check_method(config: Config, name: str, source: str) -> None:
    """What the schema cannot say: the name is a method (or sets one), and only its own keys are set."""
    from moa.compose.registry import METHODS  # the registry imports this module

    params = method_params(config, name)
    method, where = params["method"], f"{source}: methods.{name}"
    if method not in METHODS:
        raise MoaError(f"{where}: {method!r} is not a method; add `method:` with one of {', '.join(METHODS)}")
    extra = sorted(params.keys() - {"method"} - METHODS[method].params)
    if extra:
        raise MoaError(f"{where}: {', '.join(extra)} does not apply to method {method!r}; remove it")
    weights, tasks = params.get("weights"), list(config["tasks"])
    if isinstance(weights, list) and len(weights) != len(tasks):
        raise MoaError(f"{where}.weights: {len(weights)} weights for {len(tasks)} tasks; give one per task")
    if isinstance(weights, dict) and weights.keys() != set(tasks):
        raise MoaError(f"{where}.weights: keys must be exactly the tasks ({', '.join(tasks)})")


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


def _check_sweep(config: Config, source: str) -> None:
    """Each sweep size is a number of the tasks; the sweep has methods to recompose and the oracle to normalize by."""
    from moa.stats import ORACLE
    from moa.sweep import recomposable, swept_methods  # the sweep imports this module

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


def schema_node(path: Sequence[str]) -> dict[str, Any]:
    """The schema of the value at a dotted path (following $ref and additionalProperties)."""
    root = schema()
    node = root
    for part in path:
        while "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
        node = props.get(part) or (extra if isinstance(extra, dict) else {})
    while "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _typed(path: Sequence[str], raw: str) -> Any:
    """A --set value: a plain string where the schema wants only a string, else parsed as YAML."""
    kind = schema_node(path).get("type")
    if kind == "string":
        return raw
    return yaml.safe_load(raw)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MoaError(f"--set {item!r}: expected dotted.key=value")
        path = key.split(".")
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MoaError(f"--set {item!r}: {part!r} is not a section")
        node[path[-1]] = _typed(path, raw)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise MoaError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f":{where.line + 1}" if where else ""
        raise MoaError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(config, dict):
        raise MoaError(f"{path}: a config must be a mapping of keys to values")
    return validate(apply_overrides(config, overrides), str(path))


def config_hash(section: Any) -> str:
    """A short stable hash of a config section (what a step depends on), for provenance."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:12]
