"""The report's lm-evaluation-harness section from hand-written harness outputs (results.json and per-sample logs
as the lm-eval step writes them): each figure recomputed from the samples by its aggregation, paired bootstrap
intervals over the documents (against scipy's paired bootstrap), differences to the references with Holm, and what
it cannot show in notes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from moa.config import Config
from moa.errors import MoaError
from moa.experiment import validate
from moa.layout import ExperimentPaths
from moa.report import build_report, report_plots, report_tables
from moa.report.harness import harness_methods, read_harness

DOCS = 60
RESAMPLES = 1999
RNG = np.random.default_rng(0)
CORRECT = {  # method -> which documents of the multiple-choice task it gets right
    "oracle": RNG.random(DOCS) < 0.9,
    "moa": RNG.random(DOCS) < 0.85,
    "ties": RNG.random(DOCS) < 0.5,
    "base": np.zeros(DOCS, dtype=bool),
}
LOGLIKELIHOODS = {m: -RNG.uniform(10, 20, DOCS) * (1 + i / 4) for i, m in enumerate(CORRECT)}  # per document
WORDS = RNG.integers(5, 15, DOCS)


def make_config(tmp_path: Path, task_map: dict | None = None, **lm_eval: object) -> Config:
    settings = {"tasks": ["mc", "wiki"], "task_map": {"mc": "qa", "wiki": "sentiment"} if task_map is None
                else task_map} | lm_eval
    return validate({"experiment": "t", "results_dir": str(tmp_path),
                     "tasks": {t: {"source": {"type": "synthetic"}} for t in ("qa", "sentiment")},
                     "methods": {"base": None, "oracle": None, "moa": None, "ties": None},
                     "evaluation": {"lm_eval": settings}, "report": {"bootstrap": {"resamples": RESAMPLES}}})


def write_harness(config: Config, method: str, docs: int = DOCS) -> None:
    """What the lm-eval step writes: acc (mean), word_perplexity (weighted perplexity of [loglikelihood, words]) and
    a corpus-level metric whose per-sample items are strings (no sum over documents)."""
    paths = ExperimentPaths.of(config)
    acc = CORRECT[method][:docs].astype(float)
    ll, words = LOGLIKELIHOODS[method][:docs], WORDS[:docs]
    results = {
        "results": {"mc": {"alias": "mc", "acc,none": acc.mean(), "acc_stderr,none": 0.01},
                    "wiki": {"alias": "wiki", "word_perplexity,none": math.exp(-ll.sum() / words.sum()),
                             "bleu,none": 12.5}},
        "higher_is_better": {"mc": {"acc": True}, "wiki": {"word_perplexity": False, "bleu": True}},
        "n-samples": {"mc": {"original": DOCS, "effective": docs}, "wiki": {"original": DOCS, "effective": docs}}}
    samples = {"mc": [{"doc_id": i, "filter": "none", "acc": float(a)} for i, a in enumerate(acc)],
               "wiki": [{"doc_id": i, "filter": "none", "word_perplexity": [float(x), int(w)], "bleu": ["ref", "hyp"]}
                        for i, (x, w) in enumerate(zip(ll, words))]}
    paths.harness_results(method).parent.mkdir(parents=True, exist_ok=True)
    paths.harness_results(method).write_text(json.dumps(results))
    for task, rows in samples.items():
        path = paths.harness_samples(method, task)
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in reversed(rows)))  # order is not the documents'


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = make_config(tmp_path)
    for method in CORRECT:
        write_harness(config, method)
    return config


def figure(table: pd.DataFrame, method: str, task: str, metric: str) -> pd.Series:
    return table.set_index(["method", "task", "metric"]).loc[(method, task, metric)]


def test_every_figure_is_the_harness_value_with_a_paired_interval(config: Config) -> None:
    harness = read_harness(config)
    for method, correct in CORRECT.items():
        acc = figure(harness.figures, method, "mc", "acc")
        assert acc["value"] == pytest.approx(correct.mean()) and acc["n"] == DOCS and acc["higher_is_better"]
        assert acc["lo"] <= acc["value"] <= acc["hi"] or acc["lo"] == acc["hi"] == 0
        perplexity = figure(harness.figures, method, "wiki", "word_perplexity")
        assert perplexity["lo"] < perplexity["value"] < perplexity["hi"] and not perplexity["higher_is_better"]
    bleu = figure(harness.figures, "moa", "wiki", "bleu")
    assert bleu["value"] == 12.5 and np.isnan(bleu["lo"])  # corpus-level: the harness's value, no interval
    assert any("wiki bleu" in note and "no interval" in note for note in harness.notes)


def test_differences_match_scipys_paired_bootstrap(config: Config) -> None:
    """moa minus the oracle on acc: the percentile interval of the paired bootstrap is scipy's (other draws: within
    Monte-Carlo error), and Holm over the three methods compared with the oracle."""
    table = read_harness(config).comparisons.set_index(["method", "reference", "task", "metric"])
    row = table.loc[("moa", "oracle", "mc", "acc")]
    difference = CORRECT["moa"].astype(float) - CORRECT["oracle"].astype(float)
    assert row["difference"] == pytest.approx(difference.mean())
    reference = scipy_stats.bootstrap((difference,), np.mean, n_resamples=20000, method="percentile",
                                      random_state=1).confidence_interval
    assert row["lo"] == pytest.approx(reference.low, abs=0.02) and row["hi"] == pytest.approx(reference.high, abs=0.02)
    base = table.loc[("base", "oracle", "mc", "acc")]
    assert base["p"] == pytest.approx(2 / (RESAMPLES + 1)) and base["significant"]  # every resample one side
    family = table.xs(("oracle", "mc", "acc"), level=("reference", "task", "metric"))
    assert len(family) == 3 and (family["p_holm"] >= family["p"]).all()
    assert ("ties", "moa", "wiki", "word_perplexity") in table.index  # against moa too


def test_the_report_has_the_section_its_files_and_mlflow_figures(config: Config) -> None:
    assert {"lm_eval", "lm_eval_comparisons"} <= set(report_tables(config)) and "lm_eval" in report_plots(config)
    result = build_report(config)
    paths = ExperimentPaths.of(config)
    summary = paths.summary.read_text()
    assert "## lm-evaluation-harness tasks" in summary and "Minus `oracle`" in summary
    assert pd.read_parquet(paths.report_table("lm_eval")).shape[0] == 3 * len(CORRECT)
    assert paths.plot("lm_eval").is_file()
    assert result.metrics["lm_eval.mc.acc.moa"] == pytest.approx(CORRECT["moa"].mean())
    assert {"lm_eval.mc.acc.moa.lo", "vs_oracle.lm_eval.mc.acc.base.p_holm", "vs_moa.lm_eval.wiki.word_perplexity.ties",
            "lm_eval.wiki.bleu.moa"} <= result.metrics.keys()
    unconfigured = validate({k: v for k, v in config.items() if k != "evaluation"})
    assert "lm_eval" not in report_tables(unconfigured) and "lm_eval" not in report_plots(unconfigured)


def test_the_oracle_needs_every_harness_task_mapped(tmp_path: Path) -> None:
    config = make_config(tmp_path, task_map={"mc": "qa"})
    assert harness_methods(config) == ["base", "moa", "ties"]
    for method in harness_methods(config):
        write_harness(config, method)
    harness = read_harness(config)
    assert "oracle" not in set(harness.figures["method"])
    assert any(note.startswith("`oracle` ran no harness task") and "wiki" in note for note in harness.notes)
    assert harness_methods(make_config(tmp_path)) == ["base", "oracle", "moa", "ties"]


def test_unpaired_or_missing_results_are_noted_not_fatal(config: Config) -> None:
    write_harness(config, "ties", docs=DOCS - 5)  # another limit
    (ExperimentPaths.of(config).harness_results("base")).unlink()
    harness = read_harness(config)
    assert any("`ties` ran other documents of harness task mc" in note for note in harness.notes)
    assert any("`base` has no harness results" in note for note in harness.notes)
    ties = figure(harness.figures, "ties", "mc", "acc")
    assert np.isnan(ties["lo"])  # its harness value stays, unpaired
    assert "ties" not in set(harness.comparisons["method"])


@pytest.mark.parametrize(("settings", "message"), [
    ({"task_map": {"mc": "math"}}, "evaluation.lm_eval.task_map.mc: 'math' is not a task of the config"),
    ({"limit": 0}, "evaluation.lm_eval.limit"),
    ({"tasks": []}, "evaluation.lm_eval.tasks"),
])
def test_bad_harness_settings_are_one_line(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(MoaError, match=message.replace("(", r"\(")) as error:
        make_config(tmp_path, **settings)
    assert "\n" not in str(error.value)


def test_a_missing_harness_is_one_line_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    with pytest.raises(MoaError, match=r"lm-evaluation-harness is not installed; pip install 'moa\[lm-eval\]'"):
        make_config(tmp_path)


def test_the_step_without_harness_tasks_is_one_line(tmp_path: Path) -> None:
    from moa.steps import run_step

    config = validate({"experiment": "t", "results_dir": str(tmp_path), "methods": {"base": None},
                       "tasks": {"qa": {"source": {"type": "synthetic"}}}})
    with pytest.raises(MoaError, match=r"evaluation.lm_eval is not set, so there are no harness tasks to run"):
        run_step("lm_eval", config, method="base")
