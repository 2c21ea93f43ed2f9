"""The report's paired bootstrap, moa vs sacrebleu's paired bootstrap. Run: python -m bench.bench_report [--keep DIR]

The default run's shape: 15 methods x 6 tasks (16 test items per task, 64 for sentiment), 1000 resamples. The
results tree is simulated (each method's per-item outcomes drawn around a quality per task, shared item
difficulty so that methods are correlated as real ones are); translation's BLEU and chrF statistics are
sacrebleu's own, from hypotheses that copy each reference word with the method's quality.
moa: the whole bootstrap of the report (`moa.report.uncertainty.Uncertainty`: every metric of every method on every task,
the normalized and multitask scores inside each resample, the intervals, the paired comparisons with moa and
the oracle and Holm's correction), vectorized over the per-example statistics.
sacrebleu: `PairedTest(test_type="bs", n_samples=1000)` of the 14 other methods against moa on translation
alone (BLEU and chrF), which recomputes each resample's corpus score in a Python loop. Best of --repeat runs.
--keep DIR also writes the full report of the simulated tree to DIR (summary.md and the plots, to look at).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from bench.common import device_label, side_by_side
from moa.config import Config
from moa.data.tasks import get_task
from moa.experiment import validate
from moa.layout import ExperimentPaths
from moa.metrics import METRICS, aggregate, example_statistics, format_statistics, statistics_columns
from moa.report import build_report
from moa.report.inputs import read_evaluations
from moa.report.uncertainty import Uncertainty

TASKS = {"summarization": 16, "translation": 16, "qa": 16, "sentiment": 64, "dialogue": 16, "math": 16}
# quality per task (a success rate; for dialogue 1 - a perplexity gap), loosely the README's default run
QUALITY = {
    "base": (0.03, 0.10, 0.15, 0.92, 0.30, 0.00), "oracle": (0.67, 0.45, 0.94, 1.00, 0.90, 0.06),
    "mixed": (0.40, 0.15, 0.73, 0.86, 0.62, 0.00), "moa": (0.67, 0.45, 0.94, 0.63, 0.90, 0.06),
    "moa_vote": (0.67, 0.45, 0.94, 0.63, 0.90, 0.06), "moa_per_layer": (0.67, 0.40, 0.94, 0.69, 0.90, 0.06),
    "concat": (0.41, 0.15, 0.75, 0.89, 0.10, 0.00), "linear": (0.00, 0.00, 0.00, 0.00, 0.00, 0.00),
    "avg": (0.12, 0.15, 0.60, 0.95, 0.40, 0.00), "task_arithmetic": (0.40, 0.16, 0.79, 0.95, 0.45, 0.00),
    "svd": (0.25, 0.11, 0.73, 0.97, 0.42, 0.00), "ties": (0.42, 0.22, 0.81, 0.97, 0.44, 0.00),
    "dare_linear": (0.43, 0.15, 0.79, 0.94, 0.08, 0.00), "dare_ties": (0.44, 0.16, 0.88, 0.97, 0.36, 0.00),
    "magnitude_prune": (0.43, 0.15, 0.81, 0.95, 0.09, 0.00),
}
VOCAB = ["der", "die", "das", "Hund", "Katze", "Haus", "bellt", "schläft", "läuft", "heute", "morgen", "nicht",
         "sehr", "gut", "klein", "groß"]


def simulated_config(root: Path) -> Config:
    return validate({"experiment": "bench", "results_dir": str(root),
                     "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS}})


def _outcomes(rng: np.random.Generator, difficulty: np.ndarray, quality: float) -> np.ndarray:
    """Per-item success: shared difficulty plus the method's own noise, so methods are correlated."""
    return (difficulty + 0.25 * rng.standard_normal(len(difficulty))) < quality * 1.25 - 0.125


def _statistics(rng: np.random.Generator, task: str, difficulty: np.ndarray, quality: float,
                hypotheses: list[str], references: list[str]) -> dict[str, np.ndarray]:
    n, right = len(difficulty), _outcomes(rng, difficulty, quality)
    if task == "summarization":
        base = np.clip(100 * quality + 20 * rng.standard_normal(n) - 30 * difficulty + 15, 0, 100)
        return {m: np.clip(base + 3 * rng.standard_normal(n), 0, 100) for m in ("rougeL", "rouge1", "rouge2",
                                                                                  "rougeLsum")}
    if task == "translation":
        return example_statistics("translation", ["bleu", "chrf"], hypotheses, [[r] for r in references])[0]
    if task == "qa":
        return {"f1": np.where(right, 100.0, 60 * rng.random(n) * (rng.random(n) < 0.5)), "exact_match": 100.0 * right}
    if task == "dialogue":
        tokens = rng.integers(30, 120, size=n)
        return {"nll": tokens * (0.8 + 1.5 * (1 - quality) + 0.2 * difficulty), "n_tokens": tokens}
    return {"accuracy" if task == "sentiment" else "exact_match": 100.0 * right}


def simulate(config: Config, seed: int = 0) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """eval/{method}/{task}/ of every method and task: predictions.parquet (per-example statistics) and
    metrics.parquet computed from them, as `moa evaluate` writes them. Returns translation's references and
    each method's hypotheses (moa first), for sacrebleu."""
    rng, paths = np.random.default_rng(seed), ExperimentPaths.of(config)
    systems: dict[str, list[str]] = {}
    translation: list[str] = []
    for i, (task, n) in enumerate(TASKS.items()):
        difficulty = rng.random(n)
        references = [" ".join(rng.choice(VOCAB, size=rng.integers(6, 14))) for _ in range(n)]
        for method, quality in QUALITY.items():
            hypotheses = [" ".join(w if rng.random() < quality[i] else rng.choice(VOCAB) for w in r.split())
                          for r in references]
            stats = _statistics(rng, task, difficulty, quality[i], hypotheses, references)
            if get_task(config, task).format:  # in format more often the better the method does the task
                stats |= format_statistics(rng.random(n) < 0.5 + 0.5 * quality[i])
            metrics = [m for m, r in METRICS.items() if r.statistics and set(r.statistics) <= stats.keys()]
            rows = [{"method": method, "task": task, "metric": m, "value": float(aggregate(m, stats, np.ones((1, n)))[0]),
                     "n": n} for m in metrics]
            paths.evaluation(method, task).mkdir(parents=True)
            pd.DataFrame(rows).to_parquet(paths.metrics(method, task), index=False)
            pd.DataFrame({"id": [f"{task}-{k}" for k in range(n)], "prompt": "", "prediction": "",
                          "references": [[r] for r in references]} | statistics_columns(stats)
                         ).to_parquet(paths.predictions(method, task), index=False)
            if task == "translation":
                systems[method] = hypotheses
                translation = references
    return translation, [("moa", systems["moa"]), *((m, h) for m, h in systems.items() if m != "moa")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the simulated tree's full report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        config = simulated_config(root)
        references, systems = simulate(config)
        evaluations = read_evaluations(config)

        def peer() -> object:
            return PairedTest(systems, {"BLEU": BLEU(), "chrF": CHRF()}, [references], test_type="bs",
                              n_samples=1000)()

        ours, theirs = side_by_side(lambda: Uncertainty(config, evaluations), peer, args.repeat)
        figures = len(Uncertainty(config, evaluations).intervals)
        print(f"\nPaired bootstrap, 1000 resamples  [{device_label()}]")
        print("| what | time (s) |")
        print("|---|---:|")
        print(f"| moa: the report's whole bootstrap, {len(QUALITY)} methods x {len(TASKS)} tasks "
              f"({figures} intervals + comparisons) | {ours:.3f} |")
        print(f"| sacrebleu paired_bs: translation only, BLEU + chrF, {len(systems) - 1} systems vs moa | {theirs:.3f} |")
        print(f"| ratio (sacrebleu / moa) | {theirs / ours:.1f}x |")
        if args.keep:
            print(f"report: {build_report(config).path}")


if __name__ == "__main__":
    main()
