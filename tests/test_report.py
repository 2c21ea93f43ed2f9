"""The report: multitask scores (perplexity inverted) and their paired bootstrap from per-example statistics, the
verdict, the factored adapter cosine, and a full report built from a hand-written results tree, with and without
its optional inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moa.config import Config
from moa.data.tasks import get_task
from moa.errors import MoaError
from moa.experiment import validate
from moa.layout import MIXED, ExperimentPaths
from moa.lora import AdapterConfig, write_adapter
from moa.metrics import (
    FORMAT_ADHERENCE,
    METRICS,
    ROUTER_ACCURACY,
    aggregate,
    format_statistics,
    router_accuracy,
    statistics_columns,
)
from moa.report import build_report, report_files, report_plots, report_tables
from moa.report.cosine import adapter_cosine
from moa.routing import Upstream
from moa.stats import ALL_TASKS, MULTITASK
from moa.sweep import proper_subsets, restrict
from moa.train.router import router_report

TASKS = ["qa", "sentiment", "dialogue"]
N = 50  # test items per task
SCORES = {  # method -> task -> metric -> value; svd was never evaluated on dialogue
    "oracle": {"qa": {"f1": 80.0, "exact_match": 70.0, FORMAT_ADHERENCE: 96.0},
               "sentiment": {"accuracy": 90.0, FORMAT_ADHERENCE: 100.0}, "dialogue": {"perplexity": 5.0}},
    "base": {"qa": {"f1": 20.0, "exact_match": 10.0, FORMAT_ADHERENCE: 40.0},
             "sentiment": {"accuracy": 46.0, FORMAT_ADHERENCE: 62.0}, "dialogue": {"perplexity": 20.0}},
    "moa": {"qa": {"f1": 84.0, "exact_match": 72.0, FORMAT_ADHERENCE: 98.0},
            "sentiment": {"accuracy": 90.0, FORMAT_ADHERENCE: 100.0}, "dialogue": {"perplexity": 4.0}},
    "svd": {"qa": {"f1": 60.0, "exact_match": 50.0, FORMAT_ADHERENCE: 90.0},
            "sentiment": {"accuracy": 72.0, FORMAT_ADHERENCE: 84.0}},
}
# moa's expert per test prompt (task -> chosen expert -> count): sentiment partly sent to dialogue, as in issue 17
MOA_ROUTING = {"qa": {"qa": 48, "sentiment": 2}, "sentiment": {"sentiment": 35, "dialogue": 15}}
MULTITASK_BASE = (20 / 80 + 46 / 90 + 5 / 20) / 3  # perplexity: oracle / method
MULTITASK_MOA = (84 / 80 + 1.0 + 5 / 4) / 3


def example_stats(task: str, values: dict[str, float], n: int = N) -> dict[str, np.ndarray]:
    """Per-example statistics with the given means: the first k items right (100), the rest wrong (0); a
    perplexity of p from n_tokens 10 and nll 10 ln p per item."""
    if task == "dialogue":
        return {"nll": np.full(n, 10 * np.log(values["perplexity"])), "n_tokens": np.full(n, 10)}
    return {METRICS[m].statistics[0]: np.where(np.arange(n) < round(v * n / 100), 100.0, 0.0)
            for m, v in values.items()}


def experts(chosen: dict[str, int]) -> list[str]:
    return [expert for expert, count in chosen.items() for _ in range(count)]


def write_evaluation(config: Config, method: str, task: str, stats: dict[str, np.ndarray],
                     ids: list[str] | None = None, extra: dict[str, float] | None = None,
                     expert: list[str | None] | None = None, routed: bool = False) -> None:
    """eval/{method}/{task}/: predictions.parquet with the statistics (and the `expert` of each prompt, if given),
    metrics.parquet computed from them, with router_accuracy where a router chose the experts (`routed`), as
    evaluate writes them. A task with a format check gets every output in format unless `stats` say otherwise."""
    n = len(next(iter(stats.values())))
    if get_task(config, task).format:
        stats = format_statistics([True] * n) | stats
    paths = ExperimentPaths.of(config)
    paths.evaluation(method, task).mkdir(parents=True)
    metrics = [m for m, record in METRICS.items() if record.statistics and set(record.statistics) <= stats.keys()]
    values = {m: float(aggregate(m, stats, np.ones((1, n)))[0]) for m in metrics} | (extra or {})
    if routed:
        values[ROUTER_ACCURACY] = router_accuracy(expert, [task] * n)
    pd.DataFrame([{"method": method, "task": task, "metric": m, "value": v, "n": n} for m, v in values.items()]
                 ).to_parquet(paths.metrics(method, task), index=False)
    pd.DataFrame({"id": ids or [f"{task}-{i}" for i in range(n)], "prompt": "p", "prediction": "x",
                  "references": [["r"]] * n} | ({"expert": expert} if expert else {}) | statistics_columns(stats)
                 ).to_parquet(paths.predictions(method, task))


def make_config(tmp_path: Path, **report: object) -> Config:
    return validate({"experiment": "t", "results_dir": str(tmp_path),
                     "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS},
                     "methods": {"base": None, "oracle": None, "moa": None, "svd": {"method": "svd"}},
                     "report": {"bootstrap": {"resamples": 400}} | report})


def write_metrics(config: Config, scores: dict = SCORES) -> None:
    """Every evaluation of `scores`; moa routed its generated tasks' prompts as MOA_ROUTING says, the oracle
    served each prompt with its task's expert, svd with none."""
    for method, tasks in scores.items():
        for task, values in tasks.items():
            routed = method == "moa" and task in MOA_ROUTING
            expert = experts(MOA_ROUTING[task]) if routed else [task] * N if method == "oracle" else None
            write_evaluation(config, method, task, example_stats(task, values),
                             extra={"unparseable": 1.0} if (method, task) == ("moa", "qa") else None,
                             expert=expert if task != "dialogue" else None, routed=routed)


def write_router(config: Config, n_layers: int = 6, n: int = 60) -> None:
    """Router logits that get better with depth, scored by the real router_report."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.arange(n) % len(TASKS)
    reports = []
    for upstream, signal in ((Upstream.TEACHER_FORCED, 1.0), (Upstream.ROUTED, 0.7)):
        noise = torch.randn(n_layers, n, len(TASKS), generator=generator)
        depth = torch.linspace(0.2, 3.0, n_layers)[:, None, None] * signal
        reports.append(router_report(noise + depth * torch.nn.functional.one_hot(truth), truth, TASKS, upstream))
    parameters = pd.DataFrame([{"metric": "parameters", "value": 1234.0, "n": n_layers}])
    paths = ExperimentPaths.of(config)
    paths.moa.mkdir(parents=True)
    pd.concat([*(r[0] for r in reports), parameters], ignore_index=True).to_parquet(paths.router_eval)
    pd.concat([r[1] for r in reports], ignore_index=True).to_parquet(paths.router_confusion)
    paths.routers[1].write_text(json.dumps({"type": "linear", "pooling": "mean", "mode": "routers", "eta": 1.0,
                                            "parameters": 1234}))
    # routers mode logs the routing loss of each full-batch step, no validation loss
    train_log(seed=9).drop(columns="val_loss").to_parquet(paths.router_files[-1])


def lora_state(rank: int, seed: int, modules: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2,
               dim: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for module in modules:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=generator)
            state[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=generator)
    return state


def train_log(seed: int, steps: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    step = np.arange(1, steps + 1)
    loss = 3.0 * np.exp(-step / (5 + seed)) + 0.05 + 0.05 * rng.random(steps)
    val = np.where(step % 10 == 0, loss + 0.1, np.nan)
    return pd.DataFrame({"step": step, "epoch": 0, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens": 512,
                         "tokens_per_s": 100.0, "pad_fraction": 0.0, "val_loss": val})


def write_adapters(config: Config) -> None:
    paths = ExperimentPaths.of(config)
    shared = lora_state(2, seed=1)  # sentiment is qa plus a little: one pair of adapters is not orthogonal
    states = {"qa": (2, shared), "sentiment": (2, {k: v + 0.3 * torch.randn_like(v) for k, v in shared.items()}),
              "dialogue": (4, lora_state(4, seed=3))}
    for task, (rank, state) in states.items():
        write_adapter(paths.adapter(task), AdapterConfig(r=rank, lora_alpha=2 * rank,
                                                         target_modules=["q_proj", "v_proj"]), state)
        train_log(seed=2 * len(task)).to_parquet(paths.train_log(task))
    paths.adapter(MIXED).mkdir()
    train_log(seed=7).to_parquet(paths.train_log(MIXED))


@pytest.fixture
def full(tmp_path: Path) -> Config:
    config = make_config(tmp_path)
    write_metrics(config)
    write_router(config)
    write_adapters(config)
    return config


def test_adapter_cosine_matches_dense() -> None:
    # different ranks and scalings; the second adapter lacks v_proj (zero there in the concatenated vector)
    states = [lora_state(2, seed=1), lora_state(4, seed=2, modules=("q_proj",))]
    # the third is the first plus one more rank-1 direction: far from orthogonal to it
    extra = lora_state(1, seed=3)
    states.append({k: torch.cat([v, 0.5 * extra[k]], dim=0 if "lora_A" in k else 1) for k, v in states[0].items()})
    scalings = [2.0, 0.5, 1.5]
    keys = sorted({k.removesuffix(".lora_A.weight") for s in states for k in s if k.endswith("lora_A.weight")})

    def dense(state: dict[str, torch.Tensor], s: float) -> torch.Tensor:
        return torch.cat([(s * state[f"{k}.lora_B.weight"].double() @ state[f"{k}.lora_A.weight"].double()).flatten()
                          if f"{k}.lora_A.weight" in state else torch.zeros(16 * 16, dtype=torch.float64)
                          for k in keys])

    flat = torch.stack([dense(state, s) for state, s in zip(states, scalings)])
    expected = (flat @ flat.T) / torch.outer(flat.norm(dim=1), flat.norm(dim=1))
    cosine = adapter_cosine(states, scalings)
    np.testing.assert_allclose(cosine, expected.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.diag(cosine), 1.0, rtol=1e-12)
    assert cosine[0, 2] > 0.5  # not vacuous: one pair is far from orthogonal


def test_build_report(full: Config) -> None:
    out = build_report(full).path
    assert out == ExperimentPaths.of(full).report
    text = (out / "summary.md").read_text()
    intervals = pd.read_parquet(out / "intervals.parquet").set_index(["method", "task", "metric"])

    def cell(method: str, task: str, metric: str, digits: int = 2) -> str:
        value, lo, hi = intervals.loc[method, task, metric][["value", "lo", "hi"]]
        return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    header = "| method | qa F1 | qa EM | sentiment accuracy | dialogue perplexity | multitask score |"
    assert header in text
    assert intervals.loc["base", ALL_TASKS, MULTITASK]["value"] == pytest.approx(MULTITASK_BASE)
    assert intervals.loc["moa", ALL_TASKS, MULTITASK]["value"] == pytest.approx(MULTITASK_MOA)
    assert intervals.loc["oracle", ALL_TASKS, MULTITASK][["value", "lo", "hi"]].tolist() == [1.0, 1.0, 1.0]
    base = [cell("base", "qa", "f1"), cell("base", "qa", "exact_match"), cell("base", "sentiment", "accuracy"),
            "20.00 [20.00, 20.00]", cell("base", ALL_TASKS, MULTITASK, 3)]
    assert f"| base | {' | '.join(base)} |" in text
    assert base[0].startswith("20.00 [") and base[-1].startswith(f"{MULTITASK_BASE:.3f} [")
    assert "| svd | 60.00 [" in text and text.split("| svd |")[-1].split("\n")[0].endswith("| – | – |")
    assert "`svd` has no evaluation on dialogue" in text
    assert "`svd` has no multitask score: no evaluation on dialogue" in text
    assert "Multitask score over qa, sentiment, dialogue." in text
    verdict = text.split("## Verdict")[1].split("## Multitask score")[0]
    assert "No merge was evaluated on every task with signal." in verdict  # svd lacks dialogue
    formats = text.split("## Format adherence")[1].split("## Cost")[0]
    assert "| method | qa | sentiment |" in formats  # dialogue generates nothing to check
    assert intervals.loc["svd", "qa", FORMAT_ADHERENCE]["value"] == 90.0
    svd = [cell("svd", task, FORMAT_ADHERENCE, 1) for task in ("qa", "sentiment")]
    assert f"| svd | {' | '.join(svd)} |" in formats and svd[0].startswith("90.0 [")
    assert "- qa: a span of the passage (after SQuAD normalization)." in formats
    assert "- Without a check: dialogue (a task scored by perplexity" in formats
    assert "Router parameters: 1,234 (type linear, pooling mean, mode routers, eta 1.0)" in text
    assert "| `last` |" in text and "| `vote` |" in text and "each layer's router (mean)" in text
    # the only plot without data: no exact merge was evaluated (test_implicit_routing_section has one)
    assert [line for line in text.splitlines() if "skipped" in line] == [
        "- implicit_routing.png skipped (it says why): no exact merge (concat, task_arithmetic) was evaluated"]
    for name in (p for p in report_plots(full) if p != "implicit_routing"):
        assert f"![{name}]({name}.png)" in text
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    table = pd.read_parquet(out / "metrics.parquet")
    assert list(table.columns) == ["method", "task", "metric", "value", "n", "normalized"]
    extra = 1 + len(MOA_ROUTING)  # unparseable, moa's router accuracy per routed task: not bootstrapped
    assert len(table) == sum(len(v) for tasks in SCORES.values() for v in tasks.values()) + extra
    normalized = table.set_index(["method", "task", "metric"])["normalized"]
    assert normalized["base", "dialogue", "perplexity"] == pytest.approx(0.25)
    assert normalized["oracle", "qa", "f1"] == 1.0
    assert np.isnan(normalized["base", "qa", "exact_match"]) and np.isnan(normalized["moa", "qa", "unparseable"])
    # the bootstrap's values on the test set are the evaluations' own metrics
    merged = table.merge(intervals.reset_index(), on=["method", "task", "metric"], suffixes=("", "_bootstrap"))
    assert len(merged) == len(table) - extra
    np.testing.assert_allclose(merged["value_bootstrap"], merged["value"], rtol=1e-12)
    assert {p.name for p in out.iterdir()} == {"metrics.parquet", "intervals.parquet", "comparisons.parquet",
                                               "routing.parquet", "implicit_routing.parquet", "summary.md",
                                               *(f"{n}.png" for n in report_plots(full))}
    comparisons = pd.read_parquet(out / "comparisons.parquet")
    assert set(comparisons["reference"]) == {"moa", "oracle"}
    assert list(comparisons.columns) == ["method", "reference", "task", "metric", "difference", "lo", "hi", "p",
                                         "p_holm", "significant", "detectable"]


def test_report_logs_intervals_p_values_and_a_table(full: Config) -> None:
    result = build_report(full)
    assert result.metrics["multitask_score.moa"] == pytest.approx(MULTITASK_MOA)
    assert result.metrics["multitask_score.moa.lo"] <= MULTITASK_MOA <= result.metrics["multitask_score.moa.hi"]
    assert {"qa.f1.svd", "qa.f1.svd.lo", "qa.normalized.svd.hi", "vs_moa.multitask_score.base.p_holm",
            "vs_oracle.qa.normalized.svd.p"} <= result.metrics.keys()
    assert {p.name for p in result.artifacts} >= {"intervals.parquet", "comparisons.parquet", "summary.md"}
    table = result.tables["comparison.json"]
    assert table["method"].tolist() == ["moa", "oracle", "base", "svd"]  # best first, no score last
    assert table.loc[0, "minus_oracle"] == pytest.approx(MULTITASK_MOA - 1)
    assert np.isnan(table.loc[3, "multitask_score"]) and table.loc[3, "qa.f1"] == 60.0


def test_verdict(tmp_path: Path) -> None:
    """A merge one item away from MoA on each task is indistinguishable from it; one far below is worse; the
    per-task line says where the router matters; the detectable difference is stated."""
    config = validate({"experiment": "v", "results_dir": str(tmp_path), "seed": 1,
                       "tasks": {t: {"source": {"type": "synthetic"}} for t in ("qa", "sentiment")},
                       "methods": {"base": None, "oracle": None, "moa": None, "near": {"method": "ties"},
                                   "far": {"method": "svd"}}})
    rates = {"base": (20, 40), "oracle": (80, 90), "moa": (80, 88), "near": (78, 86), "far": (30, 86)}
    for method, (qa, sentiment) in rates.items():
        write_evaluation(config, method, "qa", example_stats("qa", {"f1": qa, "exact_match": qa}))
        write_evaluation(config, method, "sentiment", example_stats("sentiment", {"accuracy": sentiment}))
    text = (build_report(config).path / "summary.md").read_text()
    verdict = text.split("## Verdict")[1].split("## Multitask score")[0]
    assert "- **Merges vs `moa`**: indistinguishable: `near`; worse: `far` (−0." in verdict
    assert "- **Merges vs `oracle`**: indistinguishable: `near`; worse: `far`" in verdict
    assert "- **Best merge**: `near`, 0.9" in verdict
    assert "qa: 1 of 2 merges below, 0 above (largest gap `far` −0.6" in verdict
    assert "sentiment: no merge differs (detectable: about 0." in verdict
    assert re.search(r"What these test sizes can decide\*\*: a multitask difference smaller than about 0\.\d+ to `moa`, "
                     r"0\.\d+ to `oracle`", verdict)
    assert "| method | qa | sentiment |" in text.split("## Per task: normalized score minus `moa`")[1]


def test_task_without_signal_is_left_out(tmp_path: Path) -> None:
    """The oracle solves no math problem, like every other method: math is named and left out, the multitask
    score covers the rest, and math's raw metric is still shown."""
    config = validate({"experiment": "m", "results_dir": str(tmp_path),
                       "tasks": {t: {"source": {"type": "synthetic"}} for t in ("qa", "math")},
                       "methods": {"base": None, "oracle": None, "moa": None}})
    for method, qa in (("base", 20), ("oracle", 80), ("moa", 70)):
        write_evaluation(config, method, "qa", example_stats("qa", {"f1": qa, "exact_match": qa}))
        write_evaluation(config, method, "math", example_stats("math", {"exact_match": 0}))
    out = build_report(config).path
    text = (out / "summary.md").read_text()
    assert "Multitask score over qa; left out: math." in text
    assert "Left out of the multitask score, math: the oracle (0) is not above base (0) beyond the 95% interval" in text
    assert f"| moa | {70:.2f} [" in text and "| 0.00 [0.00, 0.00] | 0.875 [" in text
    intervals = pd.read_parquet(out / "intervals.parquet")
    assert intervals.query("method == 'moa' and metric == 'multitask_score'")["value"].item() == pytest.approx(0.875)
    assert "math" not in set(intervals.query("metric == 'normalized'")["task"])


def test_unpaired_test_rows_stop_the_report(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_evaluation(config, "base", "qa", example_stats("qa", SCORES["base"]["qa"]))
    write_evaluation(config, "svd", "qa", example_stats("qa", SCORES["svd"]["qa"]), ids=[f"other-{i}" for i in range(N)])
    with pytest.raises(MoaError, match=r"`svd` was evaluated on other test rows of qa than `base` \(100 ids differ\)"):
        build_report(config)


def test_old_predictions_without_statistics_are_named(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_evaluation(config, "base", "qa", example_stats("qa", {"f1": 20, "exact_match": 10}))
    path = ExperimentPaths.of(config).predictions("base", "qa")
    pd.read_parquet(path).drop(columns=["f1"]).to_parquet(path)
    with pytest.raises(MoaError, match=rf"{path}: no per-example statistics f1 .*rerun `moa evaluate`"):
        build_report(config)


def test_same_seed_same_report(full: Config, tmp_path: Path) -> None:
    out = build_report(full).path
    first = (out / "summary.md").read_text(), pd.read_parquet(out / "intervals.parquet")
    again = build_report(full).path
    assert (again / "summary.md").read_text() == first[0]
    pd.testing.assert_frame_equal(pd.read_parquet(again / "intervals.parquet"), first[1])


def test_compare_to_must_name_methods(tmp_path: Path) -> None:
    with pytest.raises(MoaError, match=r"report.compare_to: moe is not a configured method"):
        make_config(tmp_path, compare_to=["moe"])
    config = make_config(tmp_path, compare_to=["svd"])
    write_metrics(config)
    comparisons = pd.read_parquet(build_report(config).path / "comparisons.parquet")
    assert set(comparisons["reference"]) == {"svd"}


def test_routing_on_the_evaluated_test_prompts(tmp_path: Path) -> None:
    """Every composition whose router chose one expert per prompt, and only those, has its test routing in
    routing.parquet, the summary and the confusion plot: not the oracle (its expert is the task), not per-layer
    routing (no one expert), not a merge."""
    methods = {"oracle": None, "moa": None, "moa_vote": {"method": "moa", "strategy": "vote"},
               "moa_per_layer": {"method": "moa", "strategy": "per_layer"}, "svd": None}
    config = validate({"experiment": "r", "results_dir": str(tmp_path), "methods": methods,
                       "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS}})
    vote = {"qa": {"qa": 50}, "sentiment": {"sentiment": 40, "qa": 6, "dialogue": 4}}
    for task in ("qa", "sentiment"):
        stats = example_stats(task, {"accuracy": 50.0} if task == "sentiment" else {"f1": 50.0, "exact_match": 50.0})
        write_evaluation(config, "oracle", task, stats, expert=[task] * N)
        write_evaluation(config, "moa", task, stats, expert=experts(MOA_ROUTING[task]), routed=True)
        write_evaluation(config, "moa_vote", task, stats, expert=experts(vote[task]), routed=True)
        write_evaluation(config, "moa_per_layer", task, stats, expert=[None] * N)
        write_evaluation(config, "svd", task, stats)
    write_evaluation(config, "moa", "dialogue", example_stats("dialogue", {"perplexity": 4.0}))
    out = build_report(config).path
    routing = pd.read_parquet(out / "routing.parquet")
    assert list(routing.columns) == ["method", "task", "chosen", "count"]
    assert set(routing["method"]) == {"moa", "moa_vote"} and set(routing["task"]) == {"qa", "sentiment"}
    counts = routing.set_index(["method", "task", "chosen"])["count"]
    assert counts["moa", "sentiment", "dialogue"] == 15 and counts["moa_vote", "sentiment", "qa"] == 6
    assert counts["moa", "qa", "dialogue"] == 0  # every expert has a row
    assert (routing.groupby(["method", "task"])["count"].sum() == N).all() and len(routing) == 2 * 2 * len(TASKS)
    text = (out / "summary.md").read_text()
    router = text.split("## Router")[1].split("## Plots")[0]
    assert "No router evaluation" in router  # no moa/ here: the test figures stand alone
    assert "| routing accuracy (%) | qa | sentiment | dialogue | all prompts |" in router
    assert "| `moa`, test | 96.00 | 70.00 | – | 83.00 |" in router
    assert "| `moa_vote`, test | 100.00 | 80.00 | – | 90.00 |" in router
    assert "`oracle`" not in router and "moa_per_layer" not in router and "| validation" not in router
    assert "No test routing is recorded for dialogue" in router
    metrics = pd.read_parquet(out / "metrics.parquet").set_index(["method", "task", "metric"])["value"]
    assert metrics["moa", "sentiment", ROUTER_ACCURACY] == 70.0  # evaluate's own figure agrees
    assert "![router_confusion](router_confusion.png)" in text
    write_router(config)  # with the validation figures: both rows of the table, both rows of the plot
    router = (build_report(config).path / "summary.md").read_text().split("## Router")[1].split("## Plots")[0]
    assert "| `moa`, test | 96.00 | 70.00 | – | 83.00 |" in router
    assert re.search(r"\| validation, `last` \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| 86\.67 \|", router)
    assert "| validation, `vote` |" in router


def test_build_report_with_missing_inputs(tmp_path: Path) -> None:
    """No router, no adapters, no train logs, one evaluation: notes, not a crash."""
    config = make_config(tmp_path)
    write_evaluation(config, "base", "qa", example_stats("qa", SCORES["base"]["qa"]))
    text = (build_report(config).path / "summary.md").read_text()
    assert "| base | 20.00 [" in text and "| – | – | – |" in text.split("| base |")[1].split("\n")[0]
    assert "No router evaluation" in text
    assert "No composition's evaluation was routed one expert per sequence by a router." in text
    assert pd.read_parquet(ExperimentPaths.of(config).report_table("routing")).empty
    assert "| base | reference | – | – | – | – | – | – |" in text.split("## Cost")[1]  # no composition, no decoding
    assert "| base | 40.0 [" in text.split("## Format adherence")[1] and "![format_adherence]" in text
    for name in set(report_plots(config)) - {"format_adherence"}:
        assert f"{name}.png skipped" in text and f"![{name}]" not in text
        assert ExperimentPaths.of(config).plot(name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`oracle` has no evaluation on qa, sentiment, dialogue" in text
    assert "No task carries signal (on none does the oracle beat base" in text
    assert "Multitask score cannot be computed: no task carries signal." in text


def test_build_report_on_empty_results(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    out = build_report(config).path
    assert pd.read_parquet(out / "metrics.parquet").empty
    assert pd.read_parquet(out / "intervals.parquet").empty and pd.read_parquet(out / "comparisons.parquet").empty
    assert "| moa | – | – | – | – | – |" in (out / "summary.md").read_text()


def test_implicit_routing_section(full: Config, tmp_path: Path) -> None:
    """An exact merge's component responses become report/implicit_routing.parquet, a table beside MoA's
    router accuracy and a heatmap: concat favours each sequence's own task more in its later layer."""
    config = validate({**full, "methods": {**full["methods"], "concat": None}})
    paths, rng = ExperimentPaths.of(config), np.random.default_rng(0)
    for truth, task in enumerate(TASKS):
        rows = []
        for k in range(10):
            for layer in range(4):
                for module in ("q_proj", "v_proj"):
                    for segment in ("prompt", "generated"):
                        response = rng.random(len(TASKS))
                        response[truth] += layer  # the own component grows with depth
                        rows.append({"id": f"{task}-{k}", "layer": layer, "module": module, "segment": segment,
                                     "response": response})
        paths.implicit_routing("concat", task).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(paths.implicit_routing("concat", task))
    for task, accuracy in (("qa", 100.0), ("sentiment", 90.0)):  # MoA's routing on the test prompts
        metrics = pd.read_parquet(paths.metrics("moa", task)).query("metric != @ROUTER_ACCURACY")
        extra = pd.DataFrame([{"method": "moa", "task": task, "metric": ROUTER_ACCURACY, "value": accuracy, "n": 50}])
        pd.concat([metrics, extra], ignore_index=True).to_parquet(paths.metrics("moa", task), index=False)
    text = build_report(config).path.joinpath("summary.md").read_text()
    assert "## Does a merged model route itself?" in text and "| `concat` | prompt |" in text
    assert "| `moa` (router) | prompt | 100.0 | 90.0 | – | 95.0 |" in text
    assert "| `moa` (router) | prompt |" in text  # MoA's accuracy on the same test prompts beside it
    implicit = pd.read_parquet(paths.report_table("implicit_routing"))
    assert set(implicit.method) == {"concat"} and set(implicit.task) == set(TASKS)
    overall = implicit[(implicit.layer == -1) & (implicit.module == "all")]
    assert len(overall) == len(TASKS) * 2 and (overall.top_task == overall.task).all() and (overall.n == 10).all()
    layers = implicit[(implicit.module == "all") & (implicit.layer >= 0) & (implicit.segment == "prompt")]
    for task in TASKS:
        share = layers[layers.task == task].sort_values("layer").share_true.to_numpy()
        assert (np.diff(share) > 0).all()
    assert paths.plot("implicit_routing").stat().st_size > 10_000 and "implicit_routing.png skipped" not in text


# the sweep: concat stays with moa on every subset; svd is near moa on two tasks, far below it on all three
SWEPT = {"moa": {"qa": {"f1": 80.0, "exact_match": 70.0}, "sentiment": {"accuracy": 88.0},
                 "dialogue": {"perplexity": 5.0}},
         "concat": {"qa": {"f1": 78.0, "exact_match": 68.0}, "sentiment": {"accuracy": 86.0},
                    "dialogue": {"perplexity": 5.0}}}
SVD_ON_TWO = {"qa": {"f1": 78.0, "exact_match": 68.0}, "sentiment": {"accuracy": 88.0}, "dialogue": {"perplexity": 5.0}}
SVD_ON_THREE = {"qa": {"f1": 40.0, "exact_match": 30.0}, "sentiment": {"accuracy": 60.0},
                "dialogue": {"perplexity": 9.0}}


@pytest.fixture
def swept(tmp_path: Path) -> Config:
    """Main evaluations of every method, and each two-task subset's evaluations of the methods it recomposes."""
    config = validate({"experiment": "s", "results_dir": str(tmp_path),
                       "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS},
                       "methods": {"base": None, "oracle": None, "moa": None, "concat": None, "svd": None},
                       "sweep": {"n_tasks": [2, 3]}})  # resamples null: sized for the comparisons
    main = {m: SCORES[m] for m in ("base", "oracle")} | SWEPT | {"svd": SVD_ON_THREE}
    write_metrics(config, main)
    for subset in proper_subsets(config):
        scoped = restrict(config, subset)
        for method, scores in (SWEPT | {"svd": SVD_ON_TWO}).items():
            for task in subset.tasks:
                write_evaluation(scoped, method, task, example_stats(task, scores[task]))
    return config


def test_sweep_report(swept: Config) -> None:
    """sweep.parquet has every subset's multitask scores, normalized by the main oracle, with intervals and paired
    differences to moa; the subset of every task is the main experiment's; the verdict says up to how many tasks each
    method stays indistinguishable from moa; the plot is drawn."""
    out = build_report(swept).path
    paths = ExperimentPaths.of(swept)
    table = pd.read_parquet(paths.report_table("sweep"))
    assert list(table.columns) == ["method", "n_tasks", "subset", "tasks", "multitask_score", "lo", "hi", "reference",
                                   "difference", "difference_lo", "difference_hi", "p", "p_holm", "significant"]
    assert table[["subset", "tasks"]].drop_duplicates().values.tolist() == [
        ["n2-s1", "qa,sentiment"], ["n2-s2", "qa,dialogue"], ["n2-s3", "sentiment,dialogue"],
        ["n3-s1", "qa,sentiment,dialogue"]]
    assert set(table["method"]) == {"base", "moa", "concat", "svd"} and set(table["reference"]) == {"moa"}
    rows = table.set_index(["subset", "method"])
    ratio = {"qa": 78 / 80, "sentiment": 88 / 90}  # svd on n2-s1, normalized by the main oracle
    assert rows.loc[("n2-s1", "svd"), "multitask_score"] == pytest.approx(np.mean(list(ratio.values())))
    assert rows.loc[("n2-s2", "base"), "multitask_score"] == pytest.approx((20 / 80 + 5 / 20) / 2)
    assert (table["lo"] <= table["multitask_score"]).all() and (table["multitask_score"] <= table["hi"]).all()
    # the subset of every task is the main experiment, scored as the main report scores it
    intervals = pd.read_parquet(paths.report_table("intervals")).set_index(["method", "task", "metric"])
    main = intervals.loc[("svd", ALL_TASKS, MULTITASK)]
    assert rows.loc[("n3-s1", "svd"), ["multitask_score", "lo", "hi"]].tolist() == main[["value", "lo", "hi"]].tolist()
    assert rows.loc[("n3-s1", "svd"), "significant"] and not rows.loc[("n2-s1", "svd"), "significant"]
    assert not table.loc[table["method"] == "concat", "significant"].any()
    assert table.loc[table["method"] == "moa", "difference"].isna().all()

    text = (out / "summary.md").read_text()
    verdict = text.split("## Verdict")[1].split("## Multitask score")[0]
    assert "- **Task-count sweep, each method vs `moa` on the same subsets** (sizes 2, 3)" in verdict
    assert "  - `concat`: at every size swept (up to 3 tasks)" in verdict
    worse = r"  - `svd`: up to 2 tasks; at 3, n3-s1 is worse: −0\.\d{3} \[−0\.\d{3}, −0\.\d{3}\], p 0\.0"
    assert re.search(worse, verdict)
    section = text.split("## Task-count sweep")[1].split("## Scores")[0]
    assert "| method | 2 tasks | 3 tasks |" in section
    concat = [rows.loc[(s, "concat"), "multitask_score"] for s in ("n2-s1", "n2-s2", "n2-s3")]
    assert f"| `concat` | {np.mean(concat):.3f} ({min(concat):.3f}–{max(concat):.3f}) |" in section
    assert "![sweep](sweep.png)" in text and "sweep.png skipped" not in text
    assert {p.name for p in out.iterdir()} >= {"sweep.parquet", "sweep.png"}
    assert len(paths.plot("sweep").read_bytes()) > 20_000


def test_sweep_report_with_missing_subsets(swept: Config) -> None:
    """A subset not evaluated yet is a note; no sweep configured, no sweep files."""
    shutil.rmtree(ExperimentPaths.of(restrict(swept, proper_subsets(swept)[0])).evaluations("svd"))
    text = (build_report(swept).path / "summary.md").read_text()
    assert "`svd` has no multitask score on sweep subset n2-s1: no evaluation on qa, sentiment" in text
    unswept = {k: v for k, v in swept.items() if k != "sweep"}
    out = build_report(unswept).path
    assert not (out / "sweep.parquet").exists() and not (out / "sweep.png").exists()
    assert "Task-count sweep" not in (out / "summary.md").read_text()


def test_report_files_come_from_the_sections(swept: Config) -> None:
    """What the workflow declares and MLflow logs is what the sections write: the sweep's files only with a sweep,
    and every plot has its caption for `snakemake --report`."""
    unswept = {k: v for k, v in swept.items() if k != "sweep"}
    assert set(report_tables(swept)) - set(report_tables(unswept)) == {"sweep"}
    assert set(report_plots(swept)) - set(report_plots(unswept)) == {"sweep"}
    captions = Path(__file__).parents[1] / "workflow" / "report"
    assert all((captions / f"{plot}.rst").is_file() for plot in report_plots(swept))
    out = build_report(swept).path
    assert {p.name for p in out.iterdir()} == {p.name for p in report_files(swept)}
