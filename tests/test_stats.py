"""The paired bootstrap against scipy.stats.bootstrap and sacrebleu's paired bootstrap, its p-values and Holm's
correction, tasks without signal, and input that cannot be paired."""

from __future__ import annotations

from itertools import zip_longest

import numpy as np
import pytest
import scipy.stats
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

from moa.errors import MoaError
from moa.metrics import aggregate, example_statistics
from moa.stats import (
    ALL_TASKS,
    MULTITASK,
    NORMALIZED,
    Evaluated,
    bootstrap,
    comparisons,
    detectable_difference,
    holm,
    intervals,
    p_value,
    resample_counts,
    resamples_for,
)

ALPHA = 0.05


def accuracies(rng: np.random.Generator, n: int, rate: float) -> dict[str, np.ndarray]:
    return {"accuracy": 100 * (rng.random(n) < rate).astype(float)}


def one_task(systems: dict[str, dict[str, np.ndarray]], resamples: int = 1000, seed: int = 0, task: str = "t",
             metrics: tuple[str, ...] = ("accuracy",)):
    n = len(next(iter(next(iter(systems.values())).values())))
    evaluations = {(m, task): Evaluated(np.arange(n), stats) for m, stats in systems.items()}
    return bootstrap(evaluations, list(systems), {task: metrics}, resamples, seed, ALPHA)


def test_resample_counts_draw_n_items_each() -> None:
    counts = resample_counts(7, 500, np.random.default_rng(0))
    assert counts.shape == (500, 7) and (counts.sum(axis=1) == 7).all()
    assert abs(counts.mean() - 1) < 0.05  # every item is drawn once per resample on average


def test_interval_of_a_mean_matches_scipy_percentile_bootstrap() -> None:
    """Same data, independent resamples: the percentile bounds agree within Monte-Carlo error, computed from
    the quantile's asymptotic standard error sqrt(q (1 - q) / B) / density, for both estimates."""
    data = np.random.default_rng(3).normal(50, 10, size=100)
    resamples = 20000
    row = intervals(one_task({"oracle": {"f1": data}}, resamples, metrics=("f1",)), ALPHA).iloc[0]
    reference = scipy.stats.bootstrap((data,), np.mean, n_resamples=resamples, method="percentile",
                                      confidence_level=1 - ALPHA, rng=np.random.default_rng(4)).confidence_interval
    se = data.std(ddof=1) / np.sqrt(len(data))
    density = scipy.stats.norm.pdf(scipy.stats.norm.ppf(ALPHA / 2)) / se  # of the mean's sampling distribution
    mc_error = np.sqrt(2 * (ALPHA / 2) * (1 - ALPHA / 2) / resamples) / density  # difference of two estimates
    assert row["value"] == pytest.approx(data.mean())
    assert abs(row["lo"] - reference.low) < 4 * mc_error
    assert abs(row["hi"] - reference.high) < 4 * mc_error
    assert row["hi"] - row["lo"] == pytest.approx(2 * 1.96 * se, rel=0.05)  # the normal-theory width


def test_bleu_resamples_reproduce_sacrebleu_paired_bs() -> None:
    """On sacrebleu's own resample indices, the resampled corpus BLEU that moa computes from per-example
    statistics gives exactly sacrebleu's paired_bs p-value (its statistic: the centred absolute difference,
    one tail). moa's own p-value is two-sided and counts the resamples on the far side of zero: sacrebleu's
    statistic folds the differences at zero, so its p is smaller than half of moa's (see the next test for
    what that does to the error rate)."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]
    refs = [" ".join(rng.choice(vocab, size=rng.integers(5, 15))) for _ in range(150)]
    systems = [[" ".join(w if rng.random() < keep else rng.choice(vocab) for w in r.split()) for r in refs]
               for keep in (0.5, 0.54)]
    samples = 2000
    _, result = PairedTest([("a", systems[0]), ("b", systems[1])], {"BLEU": BLEU()}, [refs], test_type="bs",
                           n_samples=samples)()
    expected = result["BLEU"][1].p_value
    draws = np.random.default_rng(12345).choice(len(refs), size=(samples, len(refs)))  # sacrebleu's seed
    weights = np.stack([np.bincount(d, minlength=len(refs)) for d in draws]).astype(float)
    stats = [example_statistics("translation", ["bleu"], s, [[r] for r in refs])[0] for s in systems]
    scores = [aggregate("bleu", s, np.vstack([np.ones(len(refs)), weights])) for s in stats]
    observed = scores[1][0] - scores[0][0]
    assert scores[0][0] == pytest.approx(result["BLEU"][0].score) and observed > 0
    folded = np.abs(scores[1][1:] - scores[0][1:])
    moses = ((folded - folded.mean() > abs(observed)).sum() + 1) / (samples + 1)
    assert moses == pytest.approx(expected, abs=1e-12)
    two_sided = p_value(scores[1][1:] - scores[0][1:])
    assert 0.05 < two_sided < 1 and expected < two_sided / 2


def test_p_value_keeps_its_level_under_the_null() -> None:
    """Pairs of systems of equal quality: moa's two-sided p falls below 0.05 about 5% of the time (slightly
    more: percentile bootstraps are a little liberal at small n), the Moses statistic above about three times
    as often."""
    rng = np.random.default_rng(5)
    n, pairs = 200, 300
    weights = resample_counts(n, 1000, np.random.default_rng(6))
    ours = moses = 0
    for _ in range(pairs):
        a, b = (100 * (rng.random(n) < 0.6) for _ in range(2))
        differences = weights @ (b - a) / n
        observed = (b - a).mean()
        ours += p_value(differences) < ALPHA
        folded = np.abs(differences)
        moses += ((folded - folded.mean() > abs(observed)).sum() + 1) / (len(folded) + 1) < ALPHA
    assert 0.02 < ours / pairs < 0.09
    assert moses / pairs > 0.1


def test_identical_method_has_p_one_and_a_zero_width_difference() -> None:
    rng = np.random.default_rng(0)
    same = accuracies(rng, 40, 0.7)
    result = one_task({"oracle": same, "moa": same, "copy": dict(same), "base": accuracies(rng, 40, 0.2)})
    table = comparisons(result, ["moa"], ALPHA).set_index(["method", "task", "metric"])
    for key in (("copy", "t", NORMALIZED), ("copy", ALL_TASKS, MULTITASK), ("oracle", ALL_TASKS, MULTITASK)):
        row = table.loc[key]
        assert (row["difference"], row["lo"], row["hi"], row["p"], row["p_holm"]) == (0, 0, 0, 1, 1)
        assert not row["significant"]


def test_clearly_better_system_on_500_items() -> None:
    rng = np.random.default_rng(1)
    result = one_task({"oracle": accuracies(rng, 500, 0.8), "moa": accuracies(rng, 500, 0.7),
                       "base": accuracies(rng, 500, 0.3)})
    row = comparisons(result, ["moa"], ALPHA).set_index(["method", "task", "metric"]).loc["oracle", ALL_TASKS,
                                                                                          MULTITASK]
    assert row["p"] < 0.01 and row["significant"] and row["lo"] > 0


def test_p_value_edges() -> None:
    assert p_value(np.zeros(100)) == 1.0
    assert p_value(np.full(999, 0.5)) == pytest.approx(2 / 1000)
    assert p_value(np.r_[np.full(50, -1.0), np.full(50, 1.0)]) == 1.0
    assert np.isnan(p_value(np.full(10, np.nan)))


def test_holm_by_hand() -> None:
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, np.nan, 0.9]), [1.0, np.nan, 1.0])  # NaN is not in the family
    assert holm([]).size == 0


def test_detectable_difference_of_a_mean() -> None:
    """(z_0.975 + z_0.8) x the standard error: 2.80 sd / sqrt(n) for a difference of paired means."""
    differences = np.random.default_rng(0).normal(0, 0.1, size=200000)
    assert detectable_difference(differences, ALPHA) == pytest.approx(2.8016 * 0.1, rel=0.01)


def test_tasks_without_signal_leave_the_multitask_score() -> None:
    """math: every method at 0 (the oracle included); qa: the oracle equal to base. Only sentiment carries
    signal, so the multitask score is its normalized score; the excluded tasks keep their raw metrics."""
    rng = np.random.default_rng(2)
    n = 64
    same = accuracies(rng, n, 0.5)
    systems = {"sentiment": {"base": accuracies(rng, n, 0.3), "oracle": accuracies(rng, n, 0.9),
                             "svd": accuracies(rng, n, 0.6)},
               "math": {m: {"accuracy": np.zeros(n)} for m in ("base", "oracle", "svd")},
               "qa": {"base": same, "oracle": same, "svd": accuracies(rng, n, 0.4)}}
    evaluations = {(m, t): Evaluated(np.arange(n), stats) for t, per in systems.items() for m, stats in per.items()}
    result = bootstrap(evaluations, ["base", "oracle", "svd"], dict.fromkeys(systems, ("accuracy",)), 500, 0, ALPHA)
    assert set(result.excluded) == {"math", "qa"}
    assert "oracle (0) is not above base (0)" in result.excluded["math"]
    value = result.metrics["oracle", "qa", "accuracy"][0]
    assert f"oracle ({value:.4g}) is not above base ({value:.4g})" in result.excluded["qa"]
    np.testing.assert_array_equal(result.multitask["svd"], result.normalized["svd", "sentiment"])
    assert result.multitask["oracle"][0] == 1.0
    assert ("svd", "math") not in result.normalized and ("svd", "math", "accuracy") in result.metrics
    table = intervals(result, ALPHA)
    assert table.query("task == 'all'")["n"].eq(1).all()  # one task averaged
    assert set(table.query("metric == 'normalized'")["task"]) == {"sentiment"}


def test_oracle_at_zero_without_base_is_excluded() -> None:
    result = one_task({"oracle": {"accuracy": np.zeros(20)}, "svd": {"accuracy": np.full(20, 100.0)}})
    assert result.excluded == {"t": "base was not evaluated and the oracle's interval reaches 0 [0, 0]"}
    assert result.multitask == {} and result.normalized == {}


def test_method_missing_a_task_gets_no_multitask_score() -> None:
    rng = np.random.default_rng(3)
    evaluations = {(m, t): Evaluated(np.arange(30), accuracies(rng, 30, q))
                   for t in ("a", "b") for m, q in (("base", 0.1), ("oracle", 0.9), ("svd", 0.5))
                   if (m, t) != ("svd", "b")}
    result = bootstrap(evaluations, ["base", "oracle", "svd"], {"a": ("accuracy",), "b": ("accuracy",)}, 200, 0, ALPHA)
    assert result.missing == {"svd": ["b"]} and "svd" not in result.multitask and "base" in result.multitask
    assert ("svd", "a") in result.normalized


def test_items_are_paired_by_id_whatever_their_order() -> None:
    rng = np.random.default_rng(4)
    base, oracle = accuracies(rng, 25, 0.2), accuracies(rng, 25, 0.9)
    order = rng.permutation(25)
    shuffled = {"oracle": Evaluated(np.arange(25)[order], {"accuracy": oracle["accuracy"][order]}),
                "base": Evaluated(np.arange(25), base)}
    result = bootstrap({(m, "t"): e for m, e in shuffled.items()}, ["base", "oracle"], {"t": ("accuracy",)}, 300, 0,
                       ALPHA)
    reference = one_task({"base": base, "oracle": oracle}, 300)
    np.testing.assert_array_equal(result.normalized["base", "t"], reference.normalized["base", "t"])


def test_different_test_rows_cannot_be_paired() -> None:
    stats = {"accuracy": np.zeros(3)}
    evaluations = {("base", "qa"): Evaluated(np.array(["a", "b", "c"]), stats),
                   ("svd", "qa"): Evaluated(np.array(["a", "b", "d"]), stats)}
    with pytest.raises(MoaError, match=r"`svd` was evaluated on other test rows of qa than `base` \(2 ids differ\)"
                       r".*rerun `moa evaluate --method svd --task qa`") as err:
        bootstrap(evaluations, ["base", "svd"], {"qa": ("accuracy",)}, 10, 0, ALPHA)
    assert "\n" not in str(err.value)


def test_same_seed_same_intervals() -> None:
    rng = np.random.default_rng(5)
    systems = {"base": accuracies(rng, 30, 0.3), "oracle": accuracies(rng, 30, 0.8), "svd": accuracies(rng, 30, 0.6)}
    first, again = (intervals(one_task(systems, seed=7), ALPHA) for _ in range(2))
    assert first.equals(again)
    assert not first.equals(intervals(one_task(systems, seed=8), ALPHA))
    # a task's resamples do not depend on the methods next to it
    fewer = intervals(one_task({k: systems[k] for k in ("base", "oracle")}, seed=7), ALPHA)
    assert fewer.set_index(["method", "task", "metric"]).equals(
        first.set_index(["method", "task", "metric"]).loc[fewer.set_index(["method", "task", "metric"]).index])


def test_corpus_metrics_inside_the_bootstrap() -> None:
    """BLEU's row of intervals.parquet: the value is sacrebleu's corpus BLEU of the whole test set."""
    preds = ["der Hund bellt", "die Katze schläft heute", "das ist gut"]
    refs = [["der Hund bellt laut"], ["die Katze schläft"], ["das ist sehr gut"]]
    stats, _ = example_statistics("translation", ["bleu", "chrf"], preds, refs)
    table = intervals(one_task({"oracle": stats}, 200, metrics=("bleu", "chrf")), ALPHA).set_index("metric")
    streams = [list(s) for s in zip_longest(*refs)]
    assert table.loc["bleu", "value"] == pytest.approx(BLEU().corpus_score(preds, streams).score, rel=1e-13)
    assert table.loc["bleu", "lo"] <= table.loc["bleu", "value"] <= table.loc["bleu", "hi"]


@pytest.mark.parametrize("compared", [1, 16, 30, 200])
def test_default_resamples_leave_room_for_every_comparison(compared: int) -> None:
    """The smallest p-value the bootstrap can give (every resample on one side), Holm-multiplied by the methods
    compared, stays at most alpha / 10; and never fewer than 1000 resamples."""
    resamples = resamples_for(compared, ALPHA)
    differences = np.ones(resamples)  # every resample favours one side: the smallest p there is
    smallest = holm([p_value(differences)] * compared).min()
    assert smallest <= ALPHA / 10 and resamples >= 1000
    assert resamples == 1000 or holm([p_value(np.ones(resamples - 50))] * compared).min() > ALPHA / 10  # not more
