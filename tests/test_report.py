"""The report: multitask scores (perplexity inverted), the factored adapter cosine, and a full report built
from a hand-written results tree, with and without its optional inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moa.config import Config, validate
from moa.layout import MIXED, ExperimentPaths, Plot
from moa.lora import AdapterConfig, write_adapter
from moa.report import adapter_cosine, build_report, multitask_scores, normalized_scores
from moa.routing import Upstream
from moa.train.router import router_report

TASKS = ["qa", "sentiment", "dialogue"]
REPRESENTATIVE = {"qa": "f1", "sentiment": "accuracy", "dialogue": "perplexity"}
SCORES = {  # method -> task -> metric -> value; svd was never evaluated on dialogue
    "oracle": {"qa": {"f1": 80.0, "exact_match": 70.0}, "sentiment": {"accuracy": 90.0},
               "dialogue": {"perplexity": 5.0}},
    "base": {"qa": {"f1": 20.0, "exact_match": 10.0}, "sentiment": {"accuracy": 45.0},
             "dialogue": {"perplexity": 20.0}},
    "moa": {"qa": {"f1": 84.0, "exact_match": 72.5, "unparseable": 1.0}, "sentiment": {"accuracy": 90.0},
            "dialogue": {"perplexity": 4.0}},
    "svd": {"qa": {"f1": 60.0, "exact_match": 50.0}, "sentiment": {"accuracy": 72.0}},
}


def long_metrics(scores: dict = SCORES) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "task": t, "metric": k, "value": v, "n": 50}
                         for m, tasks in scores.items() for t, values in tasks.items() for k, v in values.items()])


def make_config(tmp_path: Path) -> Config:
    return validate({"experiment": "t", "results_dir": str(tmp_path),
                     "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS},
                     "methods": {"base": None, "oracle": None, "moa": None, "svd": {"method": "svd"}}})


def write_metrics(config: Config) -> None:
    for (method, task), rows in long_metrics().groupby(["method", "task"]):
        path = ExperimentPaths.of(config).metrics(method, task)
        path.parent.mkdir(parents=True)
        rows.to_parquet(path, index=False)


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
    train_log(seed=9).to_parquet(paths.router_files[-1])


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


def test_multitask_scores_by_hand() -> None:
    scores = multitask_scores(long_metrics(), REPRESENTATIVE)
    assert scores["oracle"] == 1.0
    assert scores["base"] == pytest.approx((20 / 80 + 45 / 90 + 5 / 20) / 3)  # perplexity: oracle / method
    assert scores["moa"] == pytest.approx((84 / 80 + 1.0 + 5 / 4) / 3)
    assert np.isnan(scores["svd"])  # no dialogue score: no mean over the tasks it happens to have
    normalized = normalized_scores(long_metrics(), REPRESENTATIVE)
    assert list(normalized.columns) == TASKS and list(normalized.index) == list(SCORES)
    assert normalized.loc["svd", "sentiment"] == pytest.approx(0.8)


def test_multitask_scores_without_reference_are_nan() -> None:
    scores = multitask_scores(long_metrics({k: v for k, v in SCORES.items() if k != "oracle"}), REPRESENTATIVE)
    assert scores.isna().all()


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
    header = "| method | qa F1 | qa EM | sentiment accuracy | dialogue perplexity | multitask score |"
    assert header in text
    assert "| base | 20.00 | 10.00 | 45.00 | 20.00 | 0.333 |" in text
    assert "| oracle | 80.00 | 70.00 | 90.00 | 5.00 | 1.000 |" in text
    assert f"| moa | 84.00 | 72.50 | 90.00 | 4.00 | {(1.05 + 1 + 1.25) / 3:.3f} |" in text
    assert "| svd | 60.00 | 50.00 | 72.00 | – | – |" in text
    assert "`svd` has no evaluation on dialogue" in text
    assert "`svd` multitask score is – (no normalized score on dialogue)" in text
    assert "Router parameters: 1,234 (type linear, pooling mean, mode routers, eta 1.0)" in text
    assert "| `last` |" in text and "| `vote` |" in text and "each layer's router (mean)" in text
    assert "skipped" not in text
    for name in Plot:
        assert f"![{name}]({name}.png)" in text
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    table = pd.read_parquet(out / "metrics.parquet")
    assert list(table.columns) == ["method", "task", "metric", "value", "n", "normalized"]
    assert len(table) == len(long_metrics())
    normalized = table.set_index(["method", "task", "metric"])["normalized"]
    assert normalized["base", "dialogue", "perplexity"] == pytest.approx(0.25)
    assert normalized["oracle", "qa", "f1"] == 1.0
    assert np.isnan(normalized["base", "qa", "exact_match"]) and np.isnan(normalized["moa", "qa", "unparseable"])
    assert {p.name for p in out.iterdir()} == {"metrics.parquet", "summary.md", *(f"{n}.png" for n in Plot)}


def test_build_report_with_missing_inputs(tmp_path: Path) -> None:
    """No router, no adapters, no train logs, one evaluation: notes, not a crash."""
    config = make_config(tmp_path)
    path = ExperimentPaths.of(config).metrics("base", "qa")
    path.parent.mkdir(parents=True)
    long_metrics({"base": SCORES["base"]}).query("task == 'qa'").to_parquet(path)
    text = (build_report(config).path / "summary.md").read_text()
    assert "| base | 20.00 | 10.00 | – | – | – |" in text
    assert "No router evaluation" in text
    assert "| base | – | – | – |" in text.split("## Cost")[1]  # no decoding cost measured here
    for name in Plot:
        assert f"{name}.png skipped" in text and f"![{name}]" not in text
        assert ExperimentPaths.of(config).plot(name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`oracle` has no evaluation on qa, sentiment, dialogue" in text


def test_build_report_on_empty_results(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    out = build_report(config).path
    assert pd.read_parquet(out / "metrics.parquet").empty
    assert "| moa | – | – | – | – | – |" in (out / "summary.md").read_text()
