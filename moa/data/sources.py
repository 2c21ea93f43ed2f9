"""Where a task's raw rows come from: the `synthetic`, `hf` and `local` sources of the config.

`load_split` returns one split's rows in the dataset's own schema (squad: id, title, context, question,
answers{text, answer_start}), as plain Python dicts and lists whatever the file format, or None when the
source has no such split (the caller then carves it out of train). For `hf` and `local` it returns every
row of the split; the caller filters and samples.

Local formats: jsonl, json (a list of records, an object with a `data` list, or SQuAD's official nested
JSON), parquet and csv, each optionally gzipped except parquet. csv holds flat schemas only: a column
such as squad's `answers` or wmt14's `translation` cannot be written in it; use jsonl or parquet.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from moa.data import synthetic
from moa.errors import MoaError

Row = dict[str, Any]

SOURCE_TYPES = ("synthetic", "hf", "local")
FORMATS = ("jsonl", "json", "parquet", "csv")
_DEFAULT_SPLITS = {split: split for split in synthetic.SPLITS}


def load_split(spec: Mapping[str, Any], split: str, *, task: str, n: int, seed: int,
               base_dir: Path) -> list[Row] | None:
    """The rows of `split` from the source `spec` (tasks.<task>.source), or None if it has no such split.

    `n` and `seed` matter to the synthetic source only: the others return all rows of the split.
    """
    kind = spec.get("type")
    if kind == "synthetic":
        return synthetic.generate(spec.get("generator") or task, n, seed, split)
    if kind == "hf":
        return _load_hf(spec, split, task)
    if kind == "local":
        return _load_local(spec, split, task, Path(base_dir))
    raise MoaError(f"tasks.{task}.source: unknown type {kind!r}; known types: {', '.join(SOURCE_TYPES)}")


def check_columns(rows: Sequence[Mapping[str, Any]], required: Sequence[str], source: str) -> None:
    """Fail when no row has one of the `required` columns (one row lacking one is dropped later, not here)."""
    if not rows or all(column in rows[0] for column in required):
        return  # the common case, decided by the first row alone
    present = dict.fromkeys(key for row in rows for key in row)  # union of keys, in first-seen order
    for column in required:
        if column not in present:
            raise MoaError(f"{source}: missing column {column!r} (columns present: {', '.join(present)})")


# --- hf ------------------------------------------------------------------------------------------------


def _load_hf(spec: Mapping[str, Any], split: str, task: str) -> list[Row] | None:
    splits = spec.get("splits")
    name = (splits if splits is not None else _DEFAULT_SPLITS).get(split)
    if name is None:
        return None
    dataset = _hf_dataset(spec, task)
    if name not in dataset:
        if splits is None:  # the default mapping only guesses that the dataset has this split
            return None
        raise MoaError(f"tasks.{task}.source.splits.{split}: dataset {spec['path']!r} has no split {name!r} "
                       f"(its splits: {', '.join(dataset)}); map {split} to one of them or to null")
    return dataset[name].to_list()


def _hf_dataset(spec: Mapping[str, Any], task: str) -> Any:
    """All splits of the dataset (a DatasetDict): load_dataset prepares every split whichever one is asked for."""
    import datasets
    from huggingface_hub.errors import EntryNotFoundError

    path, data_files = spec["path"], spec.get("data_files")
    try:
        return datasets.load_dataset(path, spec.get("name"), revision=spec.get("revision"), data_files=data_files)
    # datasets' and huggingface_hub's errors for an unreachable hub or an unknown dataset are all OSErrors
    except (OSError, EntryNotFoundError) as err:
        cause = _one_line(err)
        if data_files:
            raise MoaError(f"cannot load dataset {path!r} from data_files ({cause}); "
                           f"fix tasks.{task}.source.data_files") from err
        raise MoaError(f"cannot load dataset {path!r} from the Hugging Face Hub (offline? {cause}): set "
                       f"tasks.{task}.source to {{type: local, files: ...}} with the dataset's files instead") from err
    except ValueError as err:  # e.g. an unknown configuration name
        raise MoaError(f"cannot load dataset {path!r} ({_one_line(err)}); fix tasks.{task}.source") from err


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --- local ---------------------------------------------------------------------------------------------


def _load_local(spec: Mapping[str, Any], split: str, task: str, base_dir: Path) -> list[Row] | None:
    files = spec["files"]
    patterns = ({"train": files} if isinstance(files, str) else files).get(split)  # a bare path means train
    if patterns is None:
        return None
    fmt = spec.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise MoaError(f"tasks.{task}.source.format: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    where = f"tasks.{task}.source.files.{split}"
    rows: list[Row] = []
    for path in _expand([patterns] if isinstance(patterns, str) else patterns, base_dir, where):
        rows.extend(_read_file(path, fmt or _format_of(path, task)))
    return rows


def _expand(patterns: Sequence[str], base_dir: Path, where: str) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else base_dir / full
        if glob.has_magic(str(full)):
            matches = sorted(glob.glob(str(full)))  # sorted so that row order does not depend on the filesystem
            if not matches:
                raise MoaError(f"{where}: no file matches {str(full)!r}; fix the path or glob")
            paths.extend(Path(match) for match in matches)
        elif full.is_file():
            paths.append(full)
        else:
            raise MoaError(f"{where}: file not found: {str(full)!r}; fix the path (relative paths are relative to "
                           f"{str(base_dir)!r})")
    return paths


def _format_of(path: Path, task: str) -> str:
    name = path.name.lower().removesuffix(".gz")
    fmt = name.rpartition(".")[2] if "." in name else ""
    if fmt not in FORMATS:
        raise MoaError(f"{path}: cannot tell the format from the file name; set tasks.{task}.source.format "
                       f"to one of: {', '.join(FORMATS)}")
    return fmt


def _read_file(path: Path, fmt: str) -> list[Row]:
    try:
        if fmt == "jsonl":
            return list(_read_jsonl(path))
        if fmt == "json":
            return _read_json(path)
        import pyarrow.csv
        import pyarrow.parquet

        # pyarrow types csv columns (label -> int) and reads .csv.gz by its extension
        table = pyarrow.parquet.read_table(path) if fmt == "parquet" else pyarrow.csv.read_csv(path)
        return table.to_pylist()
    except MoaError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:  # not UTF-8, not parquet, ragged csv, bad SQuAD...
        raise MoaError(f"{path}: cannot read it as {fmt} ({_one_line(err)}); fix the file or the format") from err


def _open(path: Path) -> TextIO:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[Row]:
    with _open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MoaError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                               f"fix or remove the line") from err
            if not isinstance(record, dict):
                raise MoaError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield record


def _read_json(path: Path) -> list[Row]:
    with _open(path) as file:
        try:
            data = json.load(file)
        except json.JSONDecodeError as err:
            raise MoaError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
    records = data.get("data") if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise MoaError(f"{path}: expected a list of objects or an object with a 'data' list of objects")
    if records and "paragraphs" in records[0]:
        return list(_flatten_squad(records))
    return records


def _flatten_squad(articles: list[Row]) -> Iterator[Row]:
    """SQuAD's official nested JSON as rows in the HF squad schema: one row per question."""
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = qa.get("answers", [])
                yield {
                    "id": qa["id"],
                    "title": article.get("title", ""),
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {"text": [a["text"] for a in answers],
                                "answer_start": [a["answer_start"] for a in answers]},
                }
