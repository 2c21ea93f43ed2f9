"""Experiment configs: YAML, `--set dotted.key=value` overrides typed by the schema, validation against the schema
with defaults filled in. Every error is one line naming the key. What the schema cannot say needs moa's registries
and is checked above them, in moa.experiment, where commands and the workflow load configs."""

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


def validate_schema(config: Config, source: str = "config") -> Config:
    """Validate against the schema in place (filling defaults) and return the config; a violation is one MoaError
    line."""
    errors = list(_Validator(schema()).iter_errors(config))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise MoaError(f"{source}: {key}: {error.message}")
    return config


def method_params(config: Config, name: str) -> dict[str, Any]:
    """A composition's parameters with `method` filled in (the entry's name unless set)."""
    if name not in config["methods"]:
        raise MoaError(f"methods.{name}: no such composition in the config; known: {', '.join(config['methods'])}")
    return {"method": name} | (config["methods"][name] or {})


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


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The YAML file with the overrides applied, validated against the schema."""
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
    return validate_schema(apply_overrides(config, overrides), str(path))


def config_hash(section: Any) -> str:
    """A short stable hash of a config section (what a step depends on), for provenance."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:12]
