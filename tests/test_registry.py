"""The composition registry against the schema and the tests' DAG: every registered method is in the schema's
default `methods` (what config/smoke.yaml, and so the workflow tests, run), each key a `methods` entry may set is
described with exactly the methods that take it and their default, and every merge of moa.compose.merge's table
has its entry. A new method or parameter cannot go untested unnoticed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moa.compose.merge import MERGES, MergeSpec, Update
from moa.compose.registry import GATED_METHODS, LEARNED, METHODS, Kind, settings
from moa.config import method_params, schema
from moa.experiment import load_config, validate

SMOKE = Path(__file__).resolve().parents[1] / "config" / "smoke.yaml"
DEFAULT = schema()["properties"]["methods"]["default"]
KEYS = {key: node for key, node in schema()["$defs"]["method"]["properties"].items() if key != "method"}


def shown(value: Any) -> str:
    """A default as the schema's descriptions write it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_the_default_methods_are_every_registered_method_in_its_order() -> None:
    methods = [(entry or {}).get("method", name) for name, entry in DEFAULT.items()]
    assert list(dict.fromkeys(methods)) == list(METHODS)


def test_the_smoke_dag_composes_every_registered_method() -> None:
    smoke = load_config(SMOKE)
    assert {method_params(smoke, name)["method"] for name in smoke["methods"]} == set(METHODS)


def test_every_key_is_described_with_the_methods_that_take_it_and_their_defaults() -> None:
    assert KEYS.keys() == {key for method in METHODS.values() for key in method.params}
    for key, node in KEYS.items():
        takers = [name for name, method in METHODS.items() if key in method.params]
        assert node["description"].startswith(", ".join(takers) + ": "), key
        for default in {shown(METHODS[name].params[key]) for name in takers}:
            assert f"default {default}" in node["description"], key


@pytest.mark.parametrize("method", list(METHODS))
def test_the_defaults_are_valid_settings(tmp_path: Path, method: str) -> None:
    """Each default the schema could be given explicitly passes it, and fills the entry's settings."""
    given = {key: value for key, value in METHODS[method].params.items() if value is not None}
    config = validate({"experiment": "r", "results_dir": str(tmp_path), "tasks": {"qa": None, "math": None},
                       "methods": {"entry": {"method": method, **given}}})
    assert settings(method_params(config, "entry")) == {"method": method, **METHODS[method].params}


def test_the_merge_entries_come_from_the_merge_table() -> None:
    merges = {name: method for name, method in METHODS.items() if method.kind == Kind.MERGE and name not in LEARNED}
    assert list(merges) == list(MERGES) and all(method.recomposed for method in merges.values())
    assert LEARNED - GATED_METHODS == {"cat", "lorahub", "adamerging"}
    assert all(METHODS[name].kind == Kind.MERGE for name in LEARNED - GATED_METHODS)
    assert GATED_METHODS == {"xlora", "loraflow"} and all(METHODS[name].kind == Kind.ROUTE for name in GATED_METHODS)
    assert {name for name, method in METHODS.items() if method.implicit_routing} == {
        name for name, merge in MERGES.items() if merge.update == Update.EXACT} == {"concat", "task_arithmetic"}
    assert {name: method.params.get("density") for name, method in merges.items() if "density" in method.params} \
        == dict.fromkeys(["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs"], MergeSpec.density)
    assert not any(METHODS[name].recomposed for name in ("base", "oracle", "mixed"))
