"""What evaluating in bf16 moves, against fp32: every metric of two reports of the same experiment that differ
only in `evaluation.dtype`. Run: python -m bench.bench_dtype BF16_REPORT FP32_REPORT

To make the fp32 report of the default run, copy the finished run's checkout and re-evaluate it there (the
adapters, routers and merges are reused; only the evaluations, the sweep's evaluations and the report rerun):
    cp -a . ../moa-fp32 && cd ../moa-fp32
    snakemake --profile workflow/profiles/default --cores all --config 'evaluation={dtype: float32}'
then: python -m bench.bench_dtype results/default/report ../moa-fp32/results/default/report

Per metric over every (method, task): how many evaluations are equal, the median and largest |bf16 - fp32|,
and the largest difference as a share of the fp32 value's 95% bootstrap interval width (a share well below
1 moves the figure less than the test set's own noise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from moa.report.markdown import markdown_table

KEYS = ["method", "task", "metric"]


def movement(bf16: pd.DataFrame, fp32: pd.DataFrame) -> pd.DataFrame:
    """One row per metric: n, equal, median and max |difference|, where the max is, max share of the interval."""
    both = bf16.merge(fp32, on=KEYS, suffixes=("_bf16", "_fp32"), validate="one_to_one")
    both = both[np.isfinite(both.value_bf16) & np.isfinite(both.value_fp32)]
    both["diff"] = (both.value_bf16 - both.value_fp32).abs()
    both["share"] = both["diff"] / (both.hi_fp32 - both.lo_fp32).where(lambda width: width > 0)
    rows = []
    for metric, group in both.groupby("metric", sort=False):
        worst = group.loc[group["diff"].idxmax()]
        rows.append({"metric": metric, "evaluations": len(group), "equal": int((group["diff"] == 0).sum()),
                     "median abs diff": group["diff"].median(), "max abs diff": worst["diff"],
                     "at": f"{worst.method}/{worst.task}" if worst["diff"] > 0 else "–",
                     "max share of interval": group["share"].max()})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bf16", type=Path, help="report/ directory of the bf16 evaluations")
    parser.add_argument("fp32", type=Path, help="report/ directory of the fp32 evaluations")
    args = parser.parse_args()
    bf16, fp32 = (pd.read_parquet(d / "intervals.parquet") for d in (args.bf16, args.fp32))
    table = movement(bf16, fp32)
    rows = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    print("\n".join(markdown_table(list(table.columns), rows)))


if __name__ == "__main__":
    main()
