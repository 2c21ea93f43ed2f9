"""The task-count sweep's subsets (seeded, prefix-stable, in the config's order), its config checks, the methods it
recomposes (decided by the registry), a subset's config and paths, and a subset's composition: the same as composing
its tasks' LoRAs alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moa.compose.registry import METHODS, Kind, Method, Need
from moa.config import Config
from moa.errors import MoaError
from moa.experiment import validate
from moa.layout import ExperimentPaths
from moa.lora import AdapterConfig, load_adapter, write_adapter
from moa.steps import run_step
from moa.sweep import Subset, on_subset, proper_subsets, restrict, subsets, swept_methods, write_tasks
from moa.tracking import SPOOL_ENV
from tests.test_report import lora_state

SIX = ["summarization", "translation", "qa", "sentiment", "dialogue", "math"]


def make_config(tmp_path: Path, tasks: list[str] = SIX, methods: dict | None = None, **sweep: object) -> Config:
    return validate({"experiment": "w", "results_dir": str(tmp_path), "tracking": {"enabled": False},
                     "tasks": {t: {"source": {"type": "synthetic"}} for t in tasks},
                     **({"methods": methods} if methods else {}), "sweep": {"n_tasks": [2, 4, 6]} | sweep})


def names(config: Config) -> dict[str, tuple[str, ...]]:
    return {s.name: s.tasks for s in subsets(config)}


def test_subsets_are_seeded_named_and_in_the_config_order(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    drawn = names(config)
    assert drawn == names(make_config(tmp_path))  # the same config, the same subsets
    assert list(drawn) == ["n2-s1", "n2-s2", "n2-s3", "n4-s1", "n4-s2", "n4-s3", "n6-s1"]
    # pinned: a change of the draw would silently orphan every sweep/{subset}/ already computed
    assert drawn["n2-s1"] == ("summarization", "dialogue") and drawn["n4-s3"] == ("qa", "sentiment", "dialogue", "math")
    assert drawn["n6-s1"] == tuple(SIX)  # the subset of every task: the main experiment
    assert all(list(tasks) == sorted(tasks, key=SIX.index) for tasks in drawn.values())
    assert len({drawn[f"n4-s{k}"] for k in (1, 2, 3)}) == 3  # distinct
    assert [s.name for s in proper_subsets(config)] == list(drawn)[:-1]
    assert names(make_config(tmp_path, seed=1)) != drawn


def test_adding_a_size_or_raising_subsets_keeps_every_subset_drawn_before(tmp_path: Path) -> None:
    drawn = names(make_config(tmp_path))
    more = names(make_config(tmp_path, n_tasks=[3, 2, 4, 6], subsets=5))
    assert {name: more[name] for name in drawn} == drawn
    assert {"n3-s1", "n2-s5", "n4-s5"} <= more.keys() and "n6-s2" not in more  # one subset of all six tasks


def test_fewer_subsets_where_fewer_exist(tmp_path: Path) -> None:
    drawn = names(make_config(tmp_path, ["qa", "sentiment", "math"], n_tasks=[1, 2, 3], subsets=10))
    assert list(drawn) == ["n1-s1", "n1-s2", "n1-s3", "n2-s1", "n2-s2", "n2-s3", "n3-s1"]
    assert {drawn[f"n2-s{k}"] for k in (1, 2, 3)} == {("qa", "sentiment"), ("qa", "math"), ("sentiment", "math")}


def test_a_token_gate_is_not_swept_on_a_subset_of_one_task(tmp_path: Path) -> None:
    """Over one expert a gate has nothing to choose: the n=1 subsets recompose every other method, not the gates."""
    methods = {"base": None, "oracle": None, "moa": None, "xlora": None, "loraflow": None}
    config = make_config(tmp_path, ["qa", "sentiment", "math"], methods, n_tasks=[1, 2])
    one, two = (next(s for s in subsets(config) if s.n_tasks == n) for n in (1, 2))
    assert swept_methods(config) == swept_methods(config, two) == ["moa", "xlora", "loraflow"]
    assert swept_methods(config, one) == ["moa"] and list(restrict(config, one)["methods"]) == ["moa"]
    assert list(restrict(config, two)["methods"]) == ["moa", "xlora", "loraflow"]


@pytest.mark.parametrize(("sweep", "message"), [
    ({"n_tasks": [2, 7]}, "sweep.n_tasks: 7 is more than the 6 tasks; use sizes from 1 to 6"),
    ({"n_tasks": [0, 2]}, "sweep.n_tasks.0: 0 is less than the minimum of 1"),
    ({"n_tasks": []}, "sweep.n_tasks: [] should be non-empty"),
    ({"n_tasks": [2, 2]}, "sweep.n_tasks: [2, 2] has non-unique elements"),
    ({"sizes": [2]}, "sweep: Additional properties are not allowed ('sizes' was unexpected)"),
    ({"n_tasks": [2], "subsets": 0}, "sweep.subsets: 0 is less than the minimum of 1"),
    ([2, 4], "sweep: [2, 4] is not of type 'object'"),
], ids=["larger-than-the-tasks", "zero", "empty", "repeated", "malformed", "no-subsets", "not-a-section"])
def test_a_bad_sweep_is_one_line_naming_the_key(sweep: object, message: str) -> None:
    config = {"experiment": "w", "tasks": {t: None for t in SIX}, "sweep": sweep}
    with pytest.raises(MoaError) as err:
        validate(config)
    assert str(err.value) == f"config: {message}"


@pytest.mark.parametrize(("methods", "message"), [
    ({"base": None, "moa": None, "svd": None},
     "the sweep's multitask scores are normalized by the oracle; add `oracle: null` to methods"),
    ({"base": None, "oracle": None, "mixed": None}, "no configured method is recomposed on a subset"),
], ids=["no-oracle", "nothing-to-recompose"])
def test_a_sweep_needs_the_oracle_and_a_method_to_recompose(methods: dict, message: str) -> None:
    with pytest.raises(MoaError, match=f"^config: sweep: {message}"):
        validate({"experiment": "w", "tasks": {t: None for t in SIX}, "methods": methods, "sweep": {"n_tasks": [2]}})


def test_the_registry_decides_what_a_sweep_recomposes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges and routers over the task LoRAs, with their own names; not base, the oracle or the mixed LoRA. A router
    that joins the registry recomposed joins the sweep."""
    methods = {"base": None, "oracle": None, "mixed": None, "moa": None,
               "moa_vote": {"method": "moa", "strategy": "vote"}, "svd_r4": {"method": "svd", "k": 4}, "ties": None}
    assert swept_methods(make_config(tmp_path, methods=methods)) == ["moa", "moa_vote", "svd_r4", "ties"]
    oracle = METHODS["oracle"]
    router = Method(Kind.ROUTE, oracle.build, oracle.load, frozenset({Need.TASK_ADAPTERS}), recomposed=True)
    monkeypatch.setitem(METHODS, "nearest", router)
    assert swept_methods(make_config(tmp_path, methods=methods | {"nearest": None}))[-1] == "nearest"


def test_sweep_methods_chooses_what_is_recomposed(tmp_path: Path) -> None:
    methods = {"base": None, "oracle": None, "moa": None, "concat": None, "ties": None}
    config = validate({"experiment": "w", "tasks": {t: None for t in SIX}, "methods": methods,
                       "sweep": {"n_tasks": [2], "methods": ["ties", "moa"]}})
    assert swept_methods(config) == ["moa", "ties"]  # in the config's order
    assert list(restrict(config, proper_subsets(config)[0])["methods"]) == ["moa", "ties"]
    with pytest.raises(MoaError, match=r"^config: sweep.methods: oracle is not a configured method that a sweep "
                                       r"recomposes; use some of moa, concat, ties$"):
        validate(config | {"sweep": {"n_tasks": [2], "methods": ["oracle"]}})


def test_a_subset_is_an_experiment_of_its_tasks(tmp_path: Path) -> None:
    """Its tasks, its methods (per-task weights cut to its tasks), and its paths: routers, compositions, evaluations
    and checkpoints under sweep/{subset}/, the model, data and task adapters the experiment's."""
    tasks = ["qa", "sentiment", "math"]
    methods = {"base": None, "oracle": None, "moa": None, "linear": {"weights": [1.0, 2.0, 3.0]},
               "avg": {"weights": {"qa": 1.0, "sentiment": 2.0, "math": 3.0}}}
    config = make_config(tmp_path, tasks, methods, n_tasks=[2, 3])
    subset = next(s for s in subsets(config) if s.tasks == ("qa", "math"))
    scoped = restrict(config, subset)
    assert list(scoped["tasks"]) == ["qa", "math"] and list(config["tasks"]) == tasks  # the config is unchanged
    assert scoped["methods"] == {"moa": None, "linear": {"weights": [1.0, 3.0]},
                                 "avg": {"weights": {"qa": 1.0, "math": 3.0}}}
    paths, root = ExperimentPaths.of(scoped), ExperimentPaths.of(config).root
    scope = root / "sweep" / subset.name
    assert paths.composition("linear") == scope / "compositions" / "linear" and paths.moa == scope / "moa"
    assert paths.metrics("moa", "qa") == scope / "eval" / "moa" / "qa" / "metrics.parquet"
    assert paths.checkpoint("_router") == scope / "checkpoints" / "_router"
    assert paths.subset_tasks == scope / "tasks.json"
    assert paths.model == root / "model" and paths.adapter("qa") == root / "adapters" / "qa"
    assert paths.split("qa", "test") == root / "data" / "qa" / "test.parquet"
    assert paths.report == root / "report"
    assert paths.log("sweep_compose", subset.name, "moa") == root / "logs" / "sweep_compose" / subset.name / "moa.log"
    assert on_subset(config, subset.name) == scoped and on_subset(config, None) is config
    every = restrict(config, subsets(config)[-1])  # the subset of every task: the main experiment's paths
    assert ExperimentPaths.of(every) == ExperimentPaths.of(config)
    assert list(every["methods"]) == ["moa", "linear", "avg"]
    write_tasks(paths.subset_tasks, subset)
    assert json.loads(paths.subset_tasks.read_text()) == {"subset": subset.name, "n_tasks": 2, "tasks": ["qa", "math"]}


@pytest.mark.parametrize(("name", "sweep", "message"), [
    ("n5-s1", {"n_tasks": [2, 3]},
     "--subset n5-s1: not a subset of the config's sweep; its subsets are n2-s1, n2-s2, n2-s3"),
    ("n3-s1", {"n_tasks": [2, 3]},
     "--subset n3-s1: it holds every task, so it is the main experiment; run the step without --subset"),
    ("n2-s1", {}, "--subset n2-s1: not a subset of the config's sweep; the config has no `sweep` with a proper subset"),
], ids=["unknown", "every-task", "no-sweep"])
def test_a_bad_subset_is_one_line(tmp_path: Path, name: str, sweep: dict, message: str) -> None:
    config = make_config(tmp_path, ["qa", "sentiment", "math"], **(sweep or {"n_tasks": [2]}))
    if not sweep:
        del config["sweep"]
    with pytest.raises(MoaError) as err:
        on_subset(config, name)
    assert str(err.value) == message


def write_task_adapters(config: Config, tasks: list[str]) -> None:
    for seed, task in enumerate(tasks):
        write_adapter(ExperimentPaths.of(config).adapter(task),
                      AdapterConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), lora_state(2, seed=seed))


@pytest.mark.parametrize("method", ["svd", "linear", "ties", "ties_exact"])
def test_a_subset_composes_as_its_tasks_alone(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`moa compose --subset` on the experiment's LoRAs writes the same adapter (an untruncated element-wise merge:
    the same report, no adapter) as composing an experiment of the subset's tasks alone, under sweep/{subset}/, and
    logs the run sweep_compose:{subset},{method} tagged moa.subset."""
    tasks = ["qa", "sentiment", "math"]
    methods = {"base": None, "oracle": None, "svd": None, "ties": {"density": 0.4, "k": 2},
               "ties_exact": {"method": "ties", "density": 0.4},
               "linear": {"weights": {"qa": 0.5, "sentiment": 1.0, "math": 2.0}}}
    config = make_config(tmp_path / "all", tasks, methods, n_tasks=[2]) | {"tracking": {"enabled": True, "uri": None}}
    write_task_adapters(config, tasks)
    subset: Subset = proper_subsets(config)[1]
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))
    out = run_step("compose", config, method=method, subset=subset.name).path
    assert out == ExperimentPaths.of(config).root / "sweep" / subset.name / "compositions" / method

    alone = validate({"experiment": "w", "results_dir": str(tmp_path / "alone"), "tracking": {"enabled": False},
                      "tasks": {t: config["tasks"][t] for t in subset.tasks},
                      "methods": restrict(config, subset)["methods"]})
    for task in subset.tasks:  # the same LoRAs
        ExperimentPaths.of(alone).adapter(task).parent.mkdir(parents=True, exist_ok=True)
        ExperimentPaths.of(alone).adapter(task).symlink_to(ExperimentPaths.of(config).adapter(task))
    direct = run_step("compose", alone, method=method).path
    if method != "ties_exact":
        (ours, state), (theirs, reference) = load_adapter(out), load_adapter(direct)
        assert ours == theirs and state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)
    else:
        assert not (out / "adapter_model.safetensors").exists() and json.loads(
            (out / "composition.json").read_text())["dense"]
    assert json.loads((out / "merge_report.json").read_text()) == json.loads((direct / "merge_report.json").read_text())
    assert json.loads((out / "composition.json").read_text())["tasks"] == list(subset.tasks)

    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "spool").glob("*.json")]
    assert record["name"] == f"sweep_compose:{subset.name},{method}"
    assert record["tags"]["moa.subset"] == subset.name and record["tags"]["snakemake.rule"] == "sweep_compose"
    assert record["params"]["tasks"] == str(list(subset.tasks))  # what the step read: the subset's config
