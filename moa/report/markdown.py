"""How the summary writes numbers, intervals, differences and tables in Markdown."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def fmt(value: object, digits: int, sign: bool = False) -> str:
    """A number with `digits` decimals and a true minus sign; "–" where there is none."""
    if value is None or not np.isfinite(float(value)):
        return "–"
    return format(float(value), f"{'+' if sign else ''}.{digits}f").replace("-", "−")


def with_interval(row: pd.Series | None, digits: int, sign: bool = False, value: str = "value") -> str:
    if row is None or not np.isfinite(row[value]):
        return "–"
    return f"{fmt(row[value], digits, sign)} [{fmt(row['lo'], digits, sign)}, {fmt(row['hi'], digits, sign)}]"


def difference(row: pd.Series | None, digits: int = 3) -> str:
    """A paired difference, its interval and Holm-adjusted p; bold where significant."""
    if row is None:
        return "–"
    text = f"{with_interval(row, digits, sign=True, value='difference')}, p {fmt(row['p_holm'], 3)}"
    return f"**{text}**" if row["significant"] else text


def names(methods: Sequence[str]) -> str:
    return ", ".join(f"`{m}`" for m in methods) or "none"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """First column left-aligned (names), the rest right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
