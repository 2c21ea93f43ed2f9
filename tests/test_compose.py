"""`moa compose`, `moa evaluate` and `moa generate` on a tiny trained experiment: every method composes
and loads, MoA routes per sequence, evaluations write the documented files, bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moa.cli import main
from moa.compose.composition import compose, load_composition
from moa.compose.merge import MergeSpec, default_grid, dense_updates, merge_adapters
from moa.compose.registry import GATED_METHODS, LEARNED, METHODS, Kind, merge_spec, settings
from moa.config import method_params, schema
from moa.data.prepare import prepare_task
from moa.data.splits import read_split
from moa.data.tasks import get_task
from moa.evaluate import evaluate, run_scoring
from moa.experiment import load_config
from moa.gates import load_gates
from moa.generate import Request, Sampling, generate
from moa.layout import MIXED, ExperimentPaths
from moa.lora import (
    AdapterConfig,
    Arrow,
    activate,
    add_to_weights,
    attach_experts,
    load_adapter,
    lora_layers,
    write_adapter,
)
from moa.metrics import FORMAT_ADHERENCE, STREAM_COSTS
from moa.model.prepared import base_model
from moa.model.tokenizer import byte_tokenizer
from moa.routing import activate_experts
from moa.train.lora import train_lora, train_mixed
from moa.train.merge import AdaMergingTraining, CatTraining, block_of, learn_merge
from moa.train.router import train_router

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["dialogue", "qa", "sentiment"]
FAST = ["training.steps=3", "training.batch_size=4", "training.warmup_steps=1", "training.eval_every=20",
        "training.checkpoint_every=100", "router.steps=20", "router.lr=0.03", "evaluation.limit=4",
        "evaluation.max_new_tokens=6", "data.sizes.train=16", "data.sizes.test=4", "data.max_prompt_tokens=384"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with three trained task LoRAs, the mixed LoRA and MoA routers on the tiny model."""
    tmp = tmp_path_factory.mktemp("compose")
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config |= {"results_dir": str(tmp / "results"), "tracking": {"enabled": False}}
    config["tasks"] = {task: {"source": {"type": "synthetic"}} for task in TASKS}
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, FAST)
    for task in TASKS:
        prepare_task(loaded, task, byte_tokenizer())
        train_lora(loaded, task)
    train_mixed(loaded)
    train_router(loaded)
    for learned in sorted(LEARNED):
        learn_merge(loaded, learned)
    return path


def root(path: Path) -> Path:
    return Path(load_config(path)["results_dir"]) / "smoke"


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def reference(config: dict, adapters: list[Path], active: object = 0) -> torch.nn.Module:
    """The base model with `adapters` attached unfolded and `active` experts: what a composition must equal."""
    model, _ = base_model(config)
    attach_experts(model, adapters)
    activate(model, active)
    return model.eval()


PROMPT = "Passage: the cat sat.\n\nQuestion: who sat?\nAnswer:"


@pytest.mark.parametrize("method", list(schema()["properties"]["methods"]["default"]))
def test_every_method_composes_into_what_it_defines(experiment: Path, method: str) -> None:
    """Each composition, loaded as evaluate loads it (merges folded), computes its definition."""
    config = load_config(experiment, FAST)
    out = compose(config, method).path
    manifest = json.loads((out / "composition.json").read_text())
    params = method_params(config, method)
    assert (manifest["name"], manifest["method"], manifest["tasks"]) == (method, params["method"], TASKS)
    composed = load_composition(config, method)
    ids = torch.tensor([composed.tokenizer.encode(PROMPT)])
    paths, kind = ExperimentPaths.of(config), METHODS[params["method"]].kind
    if kind == Kind.BASE:
        expected = logits(base_model(config)[0], ids)
    elif params["method"] == "oracle":  # every task's LoRA; a qa prompt is served by qa's
        assert composed.experts == tuple(TASKS) and composed.expert_for("qa") == TASKS.index("qa")
        activate(composed.model, composed.expert_for("qa"))
        expected = logits(reference(config, [paths.adapter("qa")]), ids)
    elif kind == Kind.ADAPTER:
        expected = logits(reference(config, [paths.adapter(MIXED)]), ids)
    elif params["method"] == "arrow":  # every task's LoRA, each token routed in every layer: top 3 of 3 by default
        assert composed.experts == tuple(TASKS) and composed.router is None and composed.expert_for("qa") is None
        expected = logits(reference(config, [paths.adapter(t) for t in TASKS], Arrow(3, 1.0)), ids)
    elif params["method"] in GATED_METHODS:  # every task's LoRA, each token weighted by the gate learn-merge trained
        assert composed.experts == tuple(TASKS) and composed.router is None and composed.gates is not None
        every = reference(config, [paths.adapter(t) for t in TASKS])
        load_gates(paths.learned(method)).eval().attach(every)
        expected = logits(every, ids)
        composed.gates.detach()  # the gate matters: without it the experts give other logits
        assert (logits(composed.model, ids) - expected).abs().max() > 1e-4
        composed.gates.attach(composed.model)
    elif kind == Kind.ROUTE:  # moa: the experts are the task LoRAs, whichever the router picks
        assert composed.experts == tuple(TASKS)
        chosen = composed.router(composed.model, ids.tolist())
        every = reference(config, [paths.adapter(t) for t in TASKS])
        activate_experts(every, chosen)
        activate_experts(composed.model, chosen)
        expected = logits(every, ids)
    elif manifest.get("dense"):  # an untruncated element-wise merge: its dense update added to the weights
        assert not (out / "adapter_model.safetensors").exists() and not lora_layers(composed.model)
        model, dirs = base_model(config)[0], [paths.adapter(t) for t in TASKS]
        add_to_weights(model, dense_updates(merge_spec(config, settings(params) | manifest.get("tuned", {})),
                                            [load_adapter(d) for d in dirs], TASKS))
        expected = logits(model, ids)
    else:  # a merge: the adapter merge_adapters computes from the task LoRAs, folded into the weights
        if params["method"] not in LEARNED:  # (learned merges: test_learned_merges_*)
            dirs = [paths.adapter(t) for t in TASKS]
            spec = merge_spec(config, params | manifest.get("tuned", {}))  # a tuned merge: at its chosen setting
            _, state, _ = merge_adapters(spec, [load_adapter(d) for d in dirs], TASKS)
            written = load_adapter(out)[1]
            assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
        assert not lora_layers(composed.model)  # folded and unloaded: the base model's cost
        expected = logits(reference(config, [out]), ids)
    torch.testing.assert_close(logits(composed.model, ids), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("method", "weight"), [("concat", 1.0), ("task_arithmetic", 1 / 3)])
def test_exact_merges_equal_the_weighted_sum_of_the_task_adapters(experiment: Path, method: str,
                                                                  weight: float) -> None:
    config = load_config(experiment, FAST)
    compose(config, method)
    composed = load_composition(config, method)
    ids = torch.tensor([composed.tokenizer.encode(PROMPT)])
    every = reference(config, [ExperimentPaths.of(config).adapter(t) for t in TASKS], [weight] * len(TASKS))
    torch.testing.assert_close(logits(composed.model, ids), logits(every, ids), atol=2e-5, rtol=1e-4)
    report = json.loads(ExperimentPaths.of(config).merge_report(method).read_text())
    assert report["rank"] == 8 * len(TASKS) and report["relative_error"] < 1e-5


def test_svd_merge_report(experiment: Path) -> None:
    config = load_config(experiment, FAST)
    compose(config, "svd")
    svd = json.loads(ExperimentPaths.of(config).merge_report("svd").read_text())
    assert svd["rank"] == 8 and svd["input_ranks"] == [8, 8, 8] and 0 < svd["retained_energy"] < 1
    assert load_adapter(ExperimentPaths.of(config).composition("svd"))[0].r == 8


def test_same_method_twice_under_two_names(experiment: Path) -> None:
    config = load_config(experiment, [*FAST, "methods={svd_r4: {method: svd, k: 4}, svd_r24: {method: svd, k: 24}}"])
    low, full = (json.loads((compose(config, n).path / "merge_report.json").read_text()) for n in ("svd_r4", "svd_r24"))
    assert (low["rank"], full["rank"]) == (4, 24)
    assert full["relative_error"] < 1e-5 < low["relative_error"] and full["retained_energy"] == pytest.approx(1.0)


def test_moa_routes_each_sequence_to_the_chosen_expert(experiment: Path) -> None:
    config = load_config(experiment, FAST)
    compose(config, "moa")
    composed = load_composition(config, "moa")
    tokenizer = composed.tokenizer
    prompts = [tokenizer.encode(p) for p in ("Review: great film\nSentiment:", "Passage: x\nQuestion: y\nAnswer:")]
    chosen = composed.router(composed.model, prompts)
    assert chosen.shape == (2,)
    routed = generate(composed.model, tokenizer, [Request(p, Sampling(6)) for p in prompts], router=composed.router)
    assert [g.expert for g in routed] == chosen.tolist()


def test_moa_per_layer_chooses_an_expert_per_layer_and_sequence(experiment: Path) -> None:
    config = load_config(experiment, FAST)
    compose(config, "moa_per_layer")
    composed = load_composition(config, "moa_per_layer")
    prompts = [composed.tokenizer.encode(p) for p in ("Review: great film\nSentiment:", "Question: y\nAnswer:")]
    assert composed.router(composed.model, prompts).shape == (2, 2)  # [layers, sequences]


@pytest.mark.parametrize("method", ["moa", "oracle", "arrow", "svd"])
def test_evaluate_writes_predictions_and_metrics_for_every_task(experiment: Path, method: str) -> None:
    config = load_config(experiment, FAST)
    compose(config, method)
    run = evaluate(config, method)
    paths = ExperimentPaths.of(config)
    assert run.path == paths.evaluations(method) and sorted(p.name for p in run.path.iterdir()) == sorted(TASKS)
    for task in TASKS:
        predictions = pd.read_parquet(paths.predictions(method, task))
        metrics = pd.read_parquet(paths.metrics(method, task))
        assert list(metrics.columns) == ["method", "task", "metric", "value", "n"]
        assert set(metrics.method) == {method} and set(metrics.task) == {task}
        assert 0 < len(predictions) <= 4  # evaluation.limit
        assert {"id", "prompt", "prediction", "references"} <= set(predictions.columns)
        if task == "dialogue":  # scored, not generated: no format to check
            assert {"nll", "n_tokens"} <= set(predictions.columns) and predictions.prediction.isna().all()
            ppl = metrics.set_index("metric").value["perplexity"]
            assert ppl == pytest.approx(float(torch.tensor(predictions.nll.sum() / predictions.n_tokens.sum()).exp()))
            assert "format" not in predictions.columns and FORMAT_ADHERENCE not in set(metrics.metric)
            continue
        costs = {*STREAM_COSTS, "latency_s"}
        assert costs <= set(metrics.metric) and set(metrics[~metrics.metric.isin(costs)].n) == {len(predictions)}
        values = metrics.set_index("metric").value  # per-example statistics, of which each metric is the mean
        assert 0 <= values["shared_prefix_pct"] < 100 and (values["shared_prefix_pct"] == 0) == (method == "moa")
        metric = {"qa": "f1", "sentiment": "accuracy"}[task]
        assert predictions[metric].mean() == pytest.approx(values[metric]) and predictions[metric].between(0, 100).all()
        check, metas = get_task(config, task).format, read_split(config, task, "test")["meta"].map(json.loads)
        expected = [100.0 * check.follows(p, m) for p, m in zip(predictions.prediction, metas)]
        assert predictions.format.tolist() == expected
        assert values[FORMAT_ADHERENCE] == pytest.approx(predictions.format.mean())
        assert (predictions.new_tokens <= 6).all() and (predictions.latency_s > 0).all()
        assert ("router_accuracy" in set(metrics.metric)) == (method == "moa")
        expected = {"moa": set(TASKS), "oracle": {task}, "arrow": {None}, "svd": {None}}[method]  # who served it
        assert set(predictions.expert.replace({np.nan: None})) <= expected
    assert f"{TASKS[1]}.f1" in run.metrics  # the MLflow run has every task's metrics


@pytest.mark.parametrize("method", ["concat", "task_arithmetic", "svd"])
def test_exact_merges_record_their_components_responses(experiment: Path, method: str) -> None:
    """concat and task_arithmetic are their task components' sum: evaluate measures each component's
    response on every sequence; an inexact merge has no components to measure."""
    config = load_config(experiment, FAST)
    compose(config, method)
    evaluate(config, method)
    paths = ExperimentPaths.of(config)
    for task in TASKS:
        path = paths.implicit_routing(method, task)
        if method == "svd":
            assert not path.exists()
            continue
        table = pd.read_parquet(path)
        ids = pd.read_parquet(paths.predictions(method, task)).id
        assert set(table.id) == set(ids) and len(table) == len(ids) * 2 * 7 * 2  # layers x modules x segments
        responses = np.stack(table.response.to_numpy())
        assert responses.shape[1] == len(TASKS) and (responses >= 0).all()
        assert (responses[table.segment.to_numpy() == "prompt"] > 0).all()  # every prompt token moves every part


def test_evaluate_one_task_alone_gives_what_the_stream_gives(experiment: Path) -> None:
    """Served in a mixed stream or alone, greedy outputs are the same."""
    config = load_config(experiment, FAST)
    compose(config, "oracle")
    paths = ExperimentPaths.of(config)
    evaluate(config, "oracle")
    streamed = pd.read_parquet(paths.predictions("oracle", "qa"))
    evaluate(config, "oracle", task="qa")
    assert pd.read_parquet(paths.predictions("oracle", "qa")).prediction.tolist() == streamed.prediction.tolist()


def test_same_config_same_metrics(experiment: Path) -> None:
    config = load_config(experiment, FAST)
    compose(config, "ties")
    first = pd.read_parquet(evaluate(config, "ties", "qa").path / "qa" / "predictions.parquet")
    compose(config, "ties")
    second = pd.read_parquet(evaluate(config, "ties", "qa").path / "qa" / "predictions.parquet")
    assert first.prediction.tolist() == second.prediction.tolist()


@pytest.mark.parametrize("method", ["moa", "arrow"])
def test_generate_cli_answers_a_prompt_file(experiment: Path, tmp_path: Path, capsys, method: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Review: a fine film\\nSentiment:\n\n" + json.dumps({"prompt": "Question: why?"}) + "\n")
    args = ["--config", str(experiment), *(x for s in FAST for x in ("--set", s))]
    assert main(["compose", *args, "--method", method]) == 0
    capsys.readouterr()
    assert main(["generate", *args, "--method", method, "--input", str(prompts), "--json",
                 "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["prompt"] for a in lines] == ["Review: a fine film\nSentiment:", "Question: why?"]  # \\n unescaped
    served_by = {"moa": set(TASKS), "arrow": {None}}[method]  # arrow: every token routed, no one expert
    assert all(a["expert"] in served_by and a["new_tokens"] <= 4 for a in lines)


def test_arrow_settings_are_recorded_and_top_k_capped_at_the_tasks(experiment: Path, capsys) -> None:
    config = load_config(experiment, [*FAST, "methods={arrow: {top_k: 5, temperature: 0.5}}"])
    manifest = json.loads((compose(config, "arrow").path / "composition.json").read_text())
    assert (manifest["top_k"], manifest["temperature"]) == (3, 0.5)
    assert {layer.active for layer in lora_layers(load_composition(config, "arrow").model).values()} == {Arrow(3, 0.5)}
    args = ["--config", str(experiment), *(x for s in FAST for x in ("--set", s))]
    for methods, message in (("{arrow: {top_k: 0}}", "methods.arrow.top_k"),
                             ("{arrow: {temperature: 0}}", "methods.arrow.temperature"),
                             ("{arrow: {k: 4}}", "k does not apply to method 'arrow'"),
                             ("{svd: {top_k: 2}}", "top_k does not apply to method 'svd'")):
        one_line_error(capsys, ["compose", *args, "--set", f"methods={methods}", "--method", "arrow"], message)


def fake_score(best: float):
    """moa.generate.score where a model's loss on every target token is 1 + (lambda - best)^2, lambda the weight it
    serves its one (merged) expert at, and 1 for the oracle's: the criterion is exp((lambda - best)^2)."""

    def score(model, examples, experts=None, router=None):
        active = next(iter(lora_layers(model).values())).active
        loss = 1.0 if experts is not None else 1.0 + (float(active[0]) - best) ** 2
        return [(loss * len(e.target_ids), len(e.target_ids)) for e in examples]

    return score


def test_tuning_picks_the_best_candidate_and_builds_it(experiment: Path, monkeypatch) -> None:
    """A constructed case where one scale is clearly best: it is chosen, written with every candidate's
    scores, and the merge is built at it (its weights scaled); equal criteria go to the first in grid order."""
    monkeypatch.setattr("moa.compose.tune.score", fake_score(best=0.7))
    grid = "{scale: [0.1, 0.7, 2.0], density: [0.3, 0.6]}"  # rank k: an adapter, served unfolded at each scale
    config = load_config(experiment, [*FAST, f"methods={{ties_tuned: {{method: ties, k: 8, tune: {grid}, tune_rows: 5}}}}"])
    result = compose(config, "ties_tuned")
    manifest = json.loads((result.path / "composition.json").read_text())
    assert manifest["tuned"] == {"scale": 0.7, "density": 0.3}
    assert manifest["tuning"]["criterion"] == pytest.approx(1.0) and manifest["tuning"]["labelled"] == 3 * 5
    table = pd.read_parquet(ExperimentPaths.of(config).tune("ties_tuned"))
    assert len(table) == 6 * len(TASKS) and set(table["task"]) == set(TASKS)
    by_candidate = table.groupby("candidate").first()
    np.testing.assert_allclose(by_candidate["criterion"], np.exp((by_candidate["scale"] - 0.7) ** 2))
    assert by_candidate.loc[by_candidate["chosen"], ["scale", "density"]].values.tolist() == [[0.7, 0.3]]
    report = json.loads(ExperimentPaths.of(config).merge_report("ties_tuned").read_text())
    assert (report["scale"], report["density"], report["weights"]) == (0.7, 0.3, [0.7] * 3)
    assert result.metrics["tuned.scale"] == 0.7 and "tuning.criterion" in result.metrics


@pytest.mark.parametrize("family", ["task_arithmetic", "ties"])  # served unfolded at each scale; a dense update
def test_tuning_criterion_is_the_validation_loss_evaluation_measures(experiment: Path, family: str) -> None:
    """Each candidate's criterion equals what evaluation's own scoring gives on the validation rows for the merge
    built untuned at that scale (folded, as evaluate serves it): its perplexity over the oracle's, averaged over the
    tasks."""
    methods = f"{{ta: {{method: {family}, tune: {{scale: [1.5, 3.0]}}}}, oracle: null, " \
              f"ta_15: {{method: {family}, scale: 1.5}}, ta_30: {{method: {family}, scale: 3.0}}}}"
    config = load_config(experiment, [*FAST, f"methods={methods}", "evaluation.dtype=float32"])
    for name in ("ta", "oracle", "ta_15", "ta_30"):
        compose(config, name)

    def losses(name: str) -> np.ndarray:
        composed = load_composition(config, name)
        per_task = []
        for task in TASKS:
            scores = run_scoring(config, composed, get_task(config, task), read_split(config, task, "validation"))
            per_task.append(sum(nll for nll, _ in scores) / sum(n for _, n in scores))
        return np.array(per_task)

    oracle = losses("oracle")
    expected = [float(np.exp(losses(name) - oracle).mean()) for name in ("ta_15", "ta_30")]
    table = pd.read_parquet(ExperimentPaths.of(config).tune("ta")).groupby("candidate").first()
    np.testing.assert_allclose(table["criterion"], expected, rtol=1e-4)
    assert table.index[table["chosen"]].tolist() == [int(np.argmin(expected))]


def task_arithmetic_case(experiment: Path, learned: str, w: float) -> tuple[dict, torch.Tensor, torch.Tensor,
                                                                          torch.nn.Module]:
    """A config with learned merge `learned` and task arithmetic at every weight w; PROMPT's ids, task arithmetic's
    logits on them, and the base model with every task LoRA attached (what the learner trains through)."""
    methods = f"{{{learned}: null, ta: {{method: task_arithmetic, scale: {w * len(TASKS)}}}}}"
    config = load_config(experiment, [*FAST, f"methods={methods}"])
    compose(config, "ta")
    ids = torch.tensor([byte_tokenizer().encode(PROMPT)])
    expected = logits(load_composition(config, "ta").model, ids)
    model, _ = base_model(config)
    attach_experts(model, [ExperimentPaths.of(config).adapter(t) for t in TASKS])
    return config, ids, expected, model


def composed_at(config: dict, learned: str, w: float, ids: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """The learned merge composed from coefficients all fixed to w gives `expected`; returns what it had learned."""
    coefficients = ExperimentPaths.of(config).learned(learned) / "coefficients.safetensors"
    found = load_file(coefficients)["coefficients"]
    save_file({"coefficients": torch.full_like(found, w)}, coefficients)
    compose(config, learned)
    torch.testing.assert_close(logits(load_composition(config, learned).model, ids), expected, atol=2e-5, rtol=1e-4)
    return found


def test_cat_at_fixed_scalars_is_task_arithmetic_at_those_weights(experiment: Path) -> None:
    """CAT's training forward with every scalar w, and the merge compose folds from coefficients all w, equal task
    arithmetic with every weight w (its weights are w * N x 1/N)."""
    w = 0.4
    config, ids, expected, model = task_arithmetic_case(experiment, "cat", w)
    paths = ExperimentPaths.of(config)
    CatTraining(model, w).apply_coefficients()
    torch.testing.assert_close(logits(model.eval(), ids), expected, atol=2e-5, rtol=1e-4)
    learned = composed_at(config, "cat", w, ids, expected)
    assert learned.shape == (len(lora_layers(model)), 3) and not torch.allclose(learned, torch.full_like(learned, 1 / 3))
    info = json.loads((paths.learned("cat") / "learned.json").read_text())
    manifest = json.loads(paths.manifest("cat").read_text())
    assert info["labelled"] == 3 * 16 and manifest["learned"]["labelled"] == 3 * 16  # the 16 training rows per task
    assert manifest["learned"]["seconds"] > 0


def test_a_learned_merge_is_learned_again_identically(experiment: Path) -> None:
    """The same config and seed give the same coefficients, whatever ran before in the process."""
    config = load_config(experiment, [*FAST, "methods={first: {method: cat}, again: {method: cat}}"])
    learn_merge(config, "first")
    torch.rand(7)  # the global generator moved on
    learn_merge(config, "again")
    paths = ExperimentPaths.of(config)
    first, again = (load_file(paths.learned(name) / "coefficients.safetensors")["coefficients"]
                    for name in ("first", "again"))
    assert torch.equal(first, again)


def test_lorahub_learns_weights_in_range_and_composes_them(experiment: Path) -> None:
    config = load_config(experiment, FAST)
    paths = ExperimentPaths.of(config)
    info = json.loads((paths.learned("lorahub") / "learned.json").read_text())
    weights = load_file(paths.learned("lorahub") / "coefficients.safetensors")["coefficients"]
    assert info["merge"] == "linear" and info["labelled"] == 5 * 3 and weights.shape == (3,)
    assert weights.abs().max() <= 1.5 and len(pd.read_parquet(paths.learned("lorahub") / "train_log.parquet")) == 40
    compose(config, "lorahub")
    report = json.loads(paths.merge_report("lorahub").read_text())
    assert report["weights"] == pytest.approx(weights.tolist()) and report["method"] == "linear"


def test_adamerging_lowers_the_entropy_of_unlabelled_test_prompts(experiment: Path) -> None:
    """Its objective, the entropy at the test prompts' last positions, falls (one batch holds every prompt, so each
    step's loss is the whole objective); every coefficient stays in [0, 1], shared by the modules of a block; the
    test prompts count as unlabelled, no labelled row."""
    methods = "{ada: {method: adamerging, steps: 8, prompts: 3}}"
    config = load_config(experiment, [*FAST, "training.batch_size=16", f"methods={methods}"])
    learn_merge(config, "ada")
    learned = ExperimentPaths.of(config).learned("ada")
    log = pd.read_parquet(learned / "train_log.parquet")
    assert len(log) == 8 and log["loss"].iloc[-1] < log["loss"].iloc[0]
    info = json.loads((learned / "learned.json").read_text())
    coefficients = load_file(learned / "coefficients.safetensors")["coefficients"]
    assert coefficients.shape == (len(info["modules"]), 3) and 0 <= coefficients.min() and coefficients.max() <= 1
    for block in {block_of(m) for m in info["modules"]}:
        rows = coefficients[[i for i, m in enumerate(info["modules"]) if block_of(m) == block]]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    assert (info["merge"], info["labelled"], info["unlabelled"]) == ("concat", 0, 3 * 3)
    default = json.loads((ExperimentPaths.of(config).learned("adamerging") / "learned.json").read_text())
    assert (default["labelled"], default["unlabelled"]) == (0, 3 * 4)  # router.prompts_per_task, capped at 4 rows


def test_adamerging_at_fixed_coefficients_is_task_arithmetic_at_those_weights(experiment: Path) -> None:
    """AdaMerging's training forward with every coefficient w, and the merge compose folds from coefficients all w,
    equal task arithmetic with every weight w; coefficients outside [0, 1] act clamped."""
    w = 0.4
    config, ids, expected, model = task_arithmetic_case(experiment, "adamerging", w)
    paths = ExperimentPaths.of(config)
    AdaMergingTraining(model, w).apply_coefficients()
    torch.testing.assert_close(logits(model.eval(), ids), expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(AdaMergingTraining(model, 1.7).per_module(), torch.ones(len(lora_layers(model)), 3))
    learned = composed_at(config, "adamerging", w, ids, expected)
    assert learned.shape == (len(lora_layers(model)), 3) and not torch.allclose(learned, torch.full_like(learned, 0.3))
    report = json.loads(paths.merge_report("adamerging").read_text())
    manifest = json.loads(paths.manifest("adamerging").read_text())
    assert report["method"] == "concat" and report["weights"] == pytest.approx([w] * 3)
    assert (manifest["learned"]["labelled"], manifest["learned"]["unlabelled"]) == (0, 3 * 4)


def test_bad_learned_merges_are_one_line(experiment: Path, capsys) -> None:
    args = ["--config", str(experiment), *(x for s in FAST for x in ("--set", s))]
    one_line_error(capsys, ["compose", *args, "--set", "methods={lorahub: {shots: 17}}", "--method", "lorahub"],
                   "methods.lorahub.shots: 17 is more than task dialogue's 16 validation rows")
    one_line_error(capsys, ["compose", *args, "--set", "methods={lorahub: {budget: 200}}", "--method", "lorahub"],
                   "methods.lorahub.budget")
    one_line_error(capsys, ["compose", *args, "--set", "tasks={qa: {source: {type: synthetic}}}", "--set",
                            "methods={cat: null}", "--method", "cat"], "methods.cat: cat learns how to combine")
    one_line_error(capsys, ["compose", *args, "--set", "methods={adamerging: {init: 1.5}}", "--method", "adamerging"],
                   "methods.adamerging.init")
    one_line_error(capsys, ["compose", *args, "--set", "methods={adamerging: {prompts: 5}}", "--method", "adamerging"],
                   "methods.adamerging.prompts: 5 is more than task dialogue's 4 test rows")


def test_bad_tune_grids_are_one_line(experiment: Path, capsys) -> None:
    args = ["--config", str(experiment), *(x for s in FAST for x in ("--set", s))]
    for methods, message in (("{ta: {method: task_arithmetic, tune: {density: [0.5]}}}",
                              "methods.ta.tune.density: task_arithmetic has no such parameter to tune; tune scale"),
                             ("{t: {method: ties, tune: {density: [1.5]}}}", "methods.t.tune.density.0"),
                             ("{t: {method: ties, tune: {scale: [0]}}}", "methods.t.tune.scale.0"),
                             ("{t: {method: ties, tune: {scale: []}}}", "methods.t.tune.scale"),
                             ("{moa: {tune: {}}}", "tune does not apply to method 'moa'"),
                             ("{t: {method: ties, tune_rows: 4}}", "methods.t.tune_rows: applies only to a tuned merge"),
                             ("{t: {method: ties, tune: {}, tune_rows: 17}}",
                              "methods.t.tune_rows: 17 is more than task dialogue's 16 validation rows")):
        one_line_error(capsys, ["compose", *args, "--set", f"methods={methods}", "--method", "oracle"], message)


def test_default_grids_follow_the_references() -> None:
    """Task arithmetic scans the mean task weight 0.1..1.0 whatever its default weights (1/N); TIES its disjoint
    mean's lambda 0.8..1.8 and top-k 10-30%."""
    ta = default_grid(MergeSpec("task_arithmetic"), 4)
    assert ta == {"scale": tuple(round(0.4 * i, 6) for i in range(1, 11))}
    assert default_grid(MergeSpec("task_arithmetic", weights=(0.5, 0.5)), 2)["scale"][-1] == 2.0
    assert default_grid(MergeSpec("ties"), 3) == {"scale": (0.8, 1.0, 1.2, 1.4, 1.6, 1.8), "density": (0.1, 0.2, 0.3)}


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def broken(experiment: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the experiment whose adapters a test may damage."""
    config = yaml.safe_load(experiment.read_text()) | {"results_dir": str(tmp_path / "results")}
    shutil.copytree(root(experiment) / "adapters", tmp_path / "results/smoke/adapters")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp_path / "results/smoke/adapters", ["--config", str(path), *(x for s in FAST for x in ("--set", s))]


def rewrite(adapter: Path, **changes: object) -> None:
    config, state = load_adapter(adapter)
    rank = changes.pop("rank", None)
    if rank:
        state = {k: (v[:rank] if k.endswith("lora_A.weight") else v[:, :rank]) for k, v in state.items()}
    drop = changes.pop("drop", None)
    if drop:
        state = {k: v for k, v in state.items() if f".{drop}." not in k}
        changes["target_modules"] = [t for t in config.target_modules if t != drop]
    fields = vars(config) | changes | ({"r": rank, "lora_alpha": 2 * rank} if rank else {})
    write_adapter(adapter, AdapterConfig(**fields), state)


def test_bad_compositions_are_one_line(broken, capsys) -> None:
    adapters, args = broken
    one_line_error(capsys, ["compose", *args, "--method", "nope"], "methods.nope", "known:")
    one_line_error(capsys, ["compose", *args, "--method", "svd", "--set", "methods={svd: {k: 100}}"],
                   "k=100 exceeds")
    sideways = "methods={moa_vote: {method: moa, strategy: sideways}}"
    one_line_error(capsys, ["compose", *args, "--method", "moa_vote", "--set", sideways], "methods.moa_vote.strategy")
    one_line_error(capsys, ["compose", *args, "--method", "moa"], "moa: no trained MoA routers", "train-router")
    rewrite(adapters / "qa", rank=4)
    one_line_error(capsys, ["compose", *args, "--method", "linear"], "equal rank", "concat", "svd")
    assert main(["compose", *args, "--method", "concat"]) == 0  # ranks may differ for an exact concat
    rewrite(adapters / "qa", base_model_name_or_path="another/model")
    one_line_error(capsys, ["compose", *args, "--method", "svd"], "another/model")
    rewrite(adapters / "qa", base_model_name_or_path="random:tiny", drop="v_proj")
    one_line_error(capsys, ["compose", *args, "--method", "ties"], "v_proj")
    shutil.rmtree(adapters / "sentiment")
    one_line_error(capsys, ["compose", *args, "--method", "oracle"], "adapters/sentiment", "train-lora")
    one_line_error(capsys, ["evaluate", *args, "--method", "oracle", "--task", "qa"], "compose")
