"""A prepared split, data/{task}/{split}.parquet (written by moa.data.prepare), as every later step reads it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from moa.errors import MoaError
from moa.layout import ExperimentPaths

COLUMNS = ["id", "task", "prompt", "target", "references", "meta"]


def read_split(config: Mapping[str, Any], name: str, split: str) -> pd.DataFrame:
    """A prepared split, with a clear error when prepare-data has not run or the file is not ours."""
    path = ExperimentPaths.of(config).split(name, split)
    if not path.is_file():
        raise MoaError(f"{path}: not found; run `moa prepare-data --config ... --task {name}` first")
    frame = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise MoaError(f"{path}: missing column {missing[0]!r} (columns present: {', '.join(frame.columns)}); "
                       "re-run prepare-data")
    return frame
