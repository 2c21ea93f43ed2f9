"""The report on learned token gates (xlora, loraflow): the gate heatmap's table from a hand-written
gate_usage.parquet, the routing section's lines beside MoA's router accuracy, the MLflow keys, the cost table's
extra parameters and passes, the verdict's tier decision (a merge, per-sequence routing or per-token gating) in its
three outcomes, and missing gate files as notes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from moa.compose.registry import GATED_METHODS, Tier, tier_of
from moa.config import Config, schema
from moa.experiment import validate
from moa.io import write_safetensors
from moa.layout import CENTROID_EVAL, CENTROIDS, GATE_USAGE, LEARNED_INFO, ROUTER_CONFIG, ExperimentPaths
from moa.report import build_report, report_plots, report_tables
from moa.report.evidence import gather
from moa.report.sections.routing import gate_table
from tests.test_report import example_stats, experts, write_evaluation

TASKS = ["qa", "sentiment"]
N = 200  # test items per task
LAYERS = 4
TOKENS = {"qa": 120, "sentiment": 80}  # validation tokens per task
OWN = {"qa": [0.5, 0.6, 0.7, 0.8], "sentiment": [0.3] * LAYERS}  # xlora's weight on the true task's expert per layer
OWN_MEAN = {"qa": 0.65, "sentiment": 0.3}
OWN_ALL = (0.65 * 120 + 0.3 * 80) / 200  # weighted by the validation tokens
GATE_INFO = {"xlora": (5000, 2), "loraflow": (700, 1)}  # parameters, passes
MOA_ROUTING = {"qa": {"qa": 190, "sentiment": 10}, "sentiment": {"sentiment": 180, "qa": 20}}
# (qa f1, sentiment accuracy) per method, per verdict outcome
BASE_ORACLE = {"base": (20, 40), "oracle": (85, 92)}
MERGE_SUFFICES = BASE_ORACLE | {"moa": (80, 88), "ties": (80, 88), "xlora": (81, 88), "loraflow": (78, 86)}
ROUTING_NEEDED = BASE_ORACLE | {"moa": (80, 88), "ties": (40, 60), "xlora": (81, 88), "loraflow": (78, 86)}
GATING_NEEDED = BASE_ORACLE | {"moa": (50, 70), "ties": (40, 60), "xlora": (85, 92), "loraflow": (78, 86)}


def make_config(tmp_path: Path, methods: tuple[str, ...] = ("ties", "xlora", "loraflow")) -> Config:
    return validate({"experiment": "g", "results_dir": str(tmp_path), "seed": 1,
                     "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS},
                     "methods": {"base": None, "oracle": None, "moa": None} | dict.fromkeys(methods)})


def write_scores(config: Config, rates: dict[str, tuple[int, int]]) -> None:
    """Every evaluation of `rates`; moa routed as MOA_ROUTING says."""
    for method, (qa, sentiment) in rates.items():
        for task, stats in (("qa", {"f1": qa, "exact_match": qa}), ("sentiment", {"accuracy": sentiment})):
            routed = method == "moa"
            write_evaluation(config, method, task, example_stats(task, stats, N),
                             expert=experts(MOA_ROUTING[task]) if routed else None, routed=routed)


def write_gate_usage(config: Config, name: str = "xlora") -> None:
    """learned/{name}/gate_usage.parquet: qa's own weight grows with depth; sentiment's gate favours qa."""
    rows = [{"task": task, "layer": layer, "expert": expert, "tokens": TOKENS[task],
             "weight": OWN[task][layer] if expert == task else 1 - OWN[task][layer]}
            for task in TASKS for layer in range(LAYERS) for expert in TASKS]
    folder = ExperimentPaths.of(config).learned(name)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / GATE_USAGE, index=False)


def write_compositions(config: Config) -> None:
    """composition.json of every method, learned.json of the gates, MoA's router_config.json and the centroids."""
    paths = ExperimentPaths.of(config)
    learned = {"labelled": 64.0, "unlabelled": 0.0, "objective": "lm", "seconds": 10.0}
    for name in config["methods"]:
        paths.composition(name).mkdir(parents=True, exist_ok=True)
        manifest = {"name": name, "method": name, "tasks": TASKS, "build_seconds": 1.0}
        if name in GATE_INFO:
            manifest["learned"] = learned
            paths.learned(name).mkdir(parents=True, exist_ok=True)
            parameters, passes = GATE_INFO[name]
            (paths.learned(name) / LEARNED_INFO).write_text(json.dumps(
                {"method": name, "tasks": TASKS, **learned, "parameters": parameters, "passes": passes}))
        if name == "centroid":
            manifest["samples"] = 8
            write_safetensors(paths.composition(name) / CENTROIDS, {"centroids": torch.zeros(LAYERS, 2, 16)})
            pd.DataFrame({"layer": range(LAYERS), "accuracy": 0.9, "n": 40}).to_parquet(
                paths.composition(name) / CENTROID_EVAL, index=False)
        paths.manifest(name).write_text(json.dumps(manifest))
    paths.moa.mkdir(parents=True, exist_ok=True)
    (paths.moa / ROUTER_CONFIG).write_text(json.dumps({"type": "linear", "parameters": 1234, "seconds": 2.0}))


def summary(config: Config) -> str:
    return (ExperimentPaths.of(config).summary).read_text()


def verdict(config: Config) -> str:
    build_report(config)
    return summary(config).split("## Verdict")[1].split("## Multitask score")[0]


def test_gated_methods_have_their_tier() -> None:
    assert tier_of({"method": "xlora"}) == tier_of({"method": "loraflow"}) == Tier.GATED == "token-gated"
    assert tier_of({"method": "moa"}) == Tier.ROUTED and tier_of({"method": "arrow"}) == Tier.ROUTED


def test_gate_table_is_the_fixtures_means(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_gate_usage(config)
    table = gate_table(gather(config).gates)
    assert list(table.columns) == ["method", "task", "layer", "own_weight", "top_expert", "top_weight", "tokens"]
    assert set(table["method"]) == {"xlora"} and len(table) == len(TASKS) * (LAYERS + 1)
    rows = table.set_index(["task", "layer"])
    for task in TASKS:
        assert rows.loc[[(task, layer) for layer in range(LAYERS)], "own_weight"].tolist() == pytest.approx(OWN[task])
        assert rows.loc[(task, -1), "own_weight"] == pytest.approx(OWN_MEAN[task])
        assert rows.loc[(task, -1), "tokens"] == TOKENS[task]
    assert rows.loc[("qa", -1), "top_expert"] == "qa" and rows.loc[("qa", 0), "top_expert"] in TASKS
    assert rows.loc[("sentiment", -1), ["top_expert", "top_weight"]].tolist() == ["qa", pytest.approx(0.7)]


def test_gates_section_metrics_and_files(tmp_path: Path) -> None:
    """The section's table beside MoA's router accuracy, gates.parquet, gates.png, the MLflow keys; loraflow,
    without gate usage, is a note."""
    config = make_config(tmp_path)
    write_scores(config, MERGE_SUFFICES)
    write_gate_usage(config)
    result = build_report(config)
    text, paths = summary(config), ExperimentPaths.of(config)
    section = text.split("## Token gates")[1].split("\n## ")[0]
    assert "| `xlora`, own weight | 65.0 | 30.0 | 51.0 |" in section
    assert "| `xlora`, most weight | `qa` | `qa` | – |" in section
    assert "| `moa` (router), test | 95.0 | 90.0 | 92.5 |" in section  # MOA_ROUTING's correct shares
    assert "`loraflow`," not in section  # no gate usage: no row
    assert "- `loraflow` has no gate usage (learned/loraflow/gate_usage.parquet): run `moa learn-merge --method " \
           "loraflow`" in text
    assert text.index("## Router") < text.index("## Token gates")
    table = pd.read_parquet(paths.report_table("gates"))
    pd.testing.assert_frame_equal(table, gate_table(gather(config).gates))
    assert result.metrics["gates.xlora.own_weight"] == pytest.approx(OWN_ALL)
    assert result.metrics["gates.xlora.qa.own_weight"] == pytest.approx(0.65)
    assert result.metrics["gates.xlora.sentiment.own_weight"] == pytest.approx(0.3)
    assert not any(key.startswith("gates.loraflow") for key in result.metrics)
    assert "![gates](gates.png)" in text and "gates.png skipped" not in text
    assert paths.plot("gates").stat().st_size > 10_000
    assert {"gates.parquet", "gates.png"} <= {p.name for p in result.artifacts}


def test_missing_gate_files_are_notes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_scores(config, MERGE_SUFFICES)
    out = build_report(config).path
    text = summary(config)
    assert "No token-gated composition's gate usage is there yet (see the notes)." in text
    assert "`xlora` has no gate usage" in text and "`loraflow` has no gate usage" in text
    assert "gates.png skipped (it says why): no gate usage of xlora, loraflow" in text
    assert pd.read_parquet(out / "gates.parquet").empty and (out / "gates.png").read_bytes()[:4] == b"\x89PNG"


def test_gates_files_only_with_a_gate(tmp_path: Path) -> None:
    """Only a config with a gated composition writes gates.*, and its plot has a caption for `snakemake --report`."""
    gated, plain = make_config(tmp_path), make_config(tmp_path, ("ties",))
    assert "gates" in report_plots(gated) and "gates" in report_tables(gated)
    assert "gates" not in report_plots(plain) and "gates" not in report_tables(plain)
    default = schema()["properties"]["methods"]["default"]  # a config as written, before validation
    assert ("gates" in report_plots({})) == any((e or {}).get("method", m) in GATED_METHODS for m, e in default.items())
    captions = Path(__file__).parents[1] / "workflow" / "report"
    assert all((captions / f"{plot}.rst").is_file() for plot in report_plots(gated))


def test_cost_table_has_extra_parameters_and_passes(tmp_path: Path) -> None:
    config = make_config(tmp_path, ("ties", "xlora", "loraflow", "centroid"))
    write_compositions(config)
    build_report(config)
    cost = summary(config).split("## Cost")[1].split("\n## ")[0]
    assert "| method | tier | labelled | unlabelled | build (s) | extra parameters | passes / token |" in cost
    assert "| xlora | token-gated | 64 | 0 | 11 | 5,000 | 2 |" in cost
    assert "| loraflow | token-gated | 64 | 0 | 11 | 700 | 1 |" in cost
    assert "| moa | routed | " in cost and "| 1,234 | 1 |" in cost.split("| moa |")[1].split("\n")[0]
    assert "| centroid | routed | 56 | 0 | 1 | 32 | 1 |" in cost  # 2 tasks x 16 hidden; 2 x 8 + 40 prompts
    assert "| ties | training-free merge | 0 | 0 | 1 | 0 | 1 |" in cost
    assert "| base | reference | 0 | 0 | 1 | 0 | 1 |" in cost


def test_verdict_a_merge_suffices(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_scores(config, MERGE_SUFFICES)
    text = verdict(config)
    line = next(line for line in text.splitlines() if "Per-sequence routing, per-token gating or a merge?" in line)
    assert "a merge suffices: the best merge, `ties`, is not significantly worse than `xlora`" in line
    assert "Best of each, cheapest first (minus the best, Holm over the methods compared with it): a merge `ties` " \
        in line and "per-token gating `xlora` " in line
    assert "(the best)" in line.split("per-token gating `xlora`")[1]
    assert "`xlora` minus `moa`: +0.0" in line
    assert "- **Merges vs `moa`**: indistinguishable: `ties`" in text  # the existing lines stay
    assert "- **Best merge of each tier**: training-free merge `ties`" in text


def test_verdict_routing_needed_gating_not(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_scores(config, ROUTING_NEEDED)
    line = next(line for line in verdict(config).splitlines() if "per-token gating or a merge?" in line)
    assert ("per-sequence routing is needed and per-token gating is not: the best merge, `ties`, is significantly "
            "worse than `xlora`; `moa` is not significantly worse than `xlora`") in line
    assert "a merge `ties` " in line and "(minus `xlora`: **−0." in line  # bold: significant


def test_verdict_gating_needed(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_scores(config, GATING_NEEDED)
    line = next(line for line in verdict(config).splitlines() if "per-token gating or a merge?" in line)
    assert ("per-token gating is needed: the best merge, `ties`, and the best per-sequence router, `moa`, are "
            "significantly worse than `xlora`") in line
    assert "`xlora` minus `moa`: **+0." in line
    uncertainty = gather(config).uncertainty
    row = uncertainty.versus("moa", "xlora")  # xlora is no reference: compared as the references are
    assert row["difference"] == pytest.approx(-uncertainty.versus("xlora", "moa")["difference"])
    assert row["significant"] and row["p_holm"] >= row["p"]


def test_no_gate_line_without_a_gate(tmp_path: Path) -> None:
    config = make_config(tmp_path, ("ties",))
    write_scores(config, {m: r for m, r in ROUTING_NEEDED.items() if m in config["methods"]})
    assert "per-token gating or a merge?" not in verdict(config)
