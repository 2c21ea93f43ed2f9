"""moa.data.sources: the synthetic, hf (offline, from local files) and local sources."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moa.data import synthetic
from moa.data.sources import check_columns, load_split
from moa.errors import MoaError

ROWS = [{"sentence": "a fine film", "label": 1, "idx": 0}, {"sentence": "dull", "label": 0, "idx": 1}]

SQUAD_NESTED = {"version": "1.1", "data": [{"title": "Cats", "paragraphs": [
    {"context": "Cats purr. Cats sleep.", "qas": [
        {"id": "q1", "question": "What do cats do?", "answers": [{"text": "purr", "answer_start": 5},
                                                                 {"text": "Cats purr", "answer_start": 0}]},
        {"id": "q2", "question": "When?", "answers": [{"text": "sleep", "answer_start": 16}]}]},
    {"context": "Dogs bark.", "qas": [{"id": "q3", "question": "Who barks?",
                                       "answers": [{"text": "Dogs", "answer_start": 0}]}]}]}]}


def local(tmp_path: Path, files: object, fmt: str | None = None, split: str = "train") -> list[dict] | None:
    spec = {"type": "local", "files": files, "format": fmt}
    return load_split(spec, split, task="sentiment", n=0, seed=0, base_dir=tmp_path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# --- local -----------------------------------------------------------------------------------------------


def test_jsonl_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    assert local(tmp_path, {"train": "data/train.jsonl"}) == ROWS
    assert local(tmp_path, "data/train.jsonl") == ROWS  # a bare path means train


def test_gzipped_jsonl_and_json(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as file:
        file.write(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")  # blank lines are skipped
    with gzip.open(tmp_path / "b.json.gz", "wt") as file:
        json.dump(ROWS, file)
    assert local(tmp_path, {"train": "a.jsonl.gz"}) == ROWS
    assert local(tmp_path, {"train": "b.json.gz"}) == ROWS


def test_json_list_and_data_object(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "object.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    assert local(tmp_path, {"train": "list.json"}) == ROWS
    assert local(tmp_path, {"train": "object.json"}) == ROWS


def test_squad_nested_json_is_flattened(tmp_path: Path) -> None:
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(SQUAD_NESTED))
    rows = local(tmp_path, {"train": "dev-v1.1.json"})
    assert rows is not None and [row["id"] for row in rows] == ["q1", "q2", "q3"]
    assert rows[0] == {"id": "q1", "title": "Cats", "context": "Cats purr. Cats sleep.",
                       "question": "What do cats do?",
                       "answers": {"text": ["purr", "Cats purr"], "answer_start": [5, 0]}}
    assert rows[2]["context"] == "Dogs bark." and rows[2]["answers"] == {"text": ["Dogs"], "answer_start": [0]}
    for row in rows:  # answer_start points at the answer in the context
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start:start + len(text)] == text


def test_parquet_rows_are_plain_python(tmp_path: Path) -> None:
    nested = [{"translation": {"en": "a dog", "de": "ein Hund"}, "n": 3, "xs": [1, 2]}]
    pq.write_table(pa.Table.from_pylist(nested), tmp_path / "t.parquet")
    rows = local(tmp_path, {"train": "t.parquet"})
    assert rows == nested
    assert type(rows[0]["n"]) is int and type(rows[0]["xs"]) is list and type(rows[0]["translation"]) is dict


def test_csv_is_typed(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text('sentence,label,idx\na fine film,1,0\n"dull, really",0,1\n')
    assert local(tmp_path, {"train": "t.csv"}) == [ROWS[0], {**ROWS[1], "sentence": "dull, really"}]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rows.txt", ROWS)
    assert local(tmp_path, {"train": "rows.txt"}, fmt="jsonl") == ROWS
    with pytest.raises(MoaError, match=r"rows\.txt: cannot tell the format.*jsonl, json, parquet, csv"):
        local(tmp_path, {"train": "rows.txt"})


def test_glob_expands_sorted_and_lists_concatenate(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "part-b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "part-a.jsonl", ROWS[:1])
    assert local(tmp_path, {"train": "part-*.jsonl"}) == ROWS
    assert local(tmp_path, {"train": ["part-b.jsonl", "part-a.jsonl"]}) == ROWS[::-1]


def test_split_without_files_is_none(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert local(tmp_path, {"train": "train.jsonl"}, split="validation") is None
    assert local(tmp_path, "train.jsonl", split="test") is None


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "file.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": \n{"a": 4}\n')
    with pytest.raises(MoaError, match=r"file\.jsonl:3: invalid JSON") as info:
        local(tmp_path, {"train": "file.jsonl"})
    assert "\n" not in str(info.value)


def test_malformed_json_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(MoaError, match=r"bad\.json:2: invalid JSON"):
        local(tmp_path, {"train": "bad.json"})
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(MoaError, match=r"scalar\.json: expected a list of objects"):
        local(tmp_path, {"train": "scalar.json"})
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(MoaError, match=r"bad\.parquet: cannot read it as parquet"):
        local(tmp_path, {"train": "bad.parquet"})


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(MoaError, match=r"tasks\.sentiment\.source\.files\.train: file not found: .*nope\.jsonl"):
        local(tmp_path, {"train": "nope.jsonl"})
    with pytest.raises(MoaError, match=r"files\.test: no file matches .*data/\*\.json"):
        local(tmp_path, {"train": "nope.jsonl", "test": "data/*.json"}, split="test")


def test_unknown_format_and_type(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(MoaError, match=r"unknown format 'xml'; known formats: jsonl, json, parquet, csv"):
        local(tmp_path, {"train": "train.jsonl"}, fmt="xml")
    with pytest.raises(MoaError, match=r"unknown type 'ftp'; known types: synthetic, hf, local"):
        load_split({"type": "ftp"}, "train", task="qa", n=1, seed=0, base_dir=tmp_path)


# --- check_columns ---------------------------------------------------------------------------------------


def test_check_columns() -> None:
    check_columns([], ["article"], "x")
    check_columns(ROWS, ["sentence", "label"], "x")
    check_columns([{"a": 1}, {"a": 2, "b": 3}], ["a", "b"], "x")  # a row lacking b is dropped later
    with pytest.raises(MoaError) as info:
        check_columns([{"a": 1, "b": 2}, {"a": 1, "c": 3}], ["a", "article"], "tasks.summarization.source")
    assert str(info.value) == "tasks.summarization.source: missing column 'article' (columns present: a, b, c)"


# --- synthetic -------------------------------------------------------------------------------------------


def test_synthetic_passthrough_is_deterministic(tmp_path: Path) -> None:
    spec = {"type": "synthetic", "generator": None}
    rows = load_split(spec, "test", task="qa", n=5, seed=3, base_dir=tmp_path)
    assert rows == synthetic.generate("qa", 5, 3, "test")
    assert rows == load_split(spec, "test", task="qa", n=5, seed=3, base_dir=tmp_path)
    math = load_split({"type": "synthetic", "generator": "math"}, "train", task="custom", n=3, seed=0,
                      base_dir=tmp_path)
    assert math == synthetic.generate("math", 3, 0, "train")


# --- hf --------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and every cache under tmp_path; datasets reads its config at import, so patch it too."""
    import datasets
    import huggingface_hub

    home = tmp_path / "hf"
    for var, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
                       "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_CACHE": str(home / "hub")}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))


def test_hf_from_local_files_offline(tmp_path: Path, hf_offline: None) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    spec = {"type": "hf", "path": "json", "name": None, "revision": None,
            "data_files": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}

    def split(name: str, **override: object) -> list[dict] | None:
        return load_split({**spec, **override}, name, task="sentiment", n=1, seed=0, base_dir=tmp_path)

    assert split("train") == ROWS
    assert split("test") == ROWS[:1]
    assert split("validation") is None  # the dataset has no such split
    swapped = {"train": "test", "validation": None, "test": "train"}
    assert split("train", splits=swapped) == ROWS[:1]
    assert split("validation", splits=swapped) is None
    assert split("test", splits={"train": "train"}) is None  # absent from the mapping
    with pytest.raises(MoaError, match=r"splits\.test: dataset 'json' has no split 'dev' \(its splits: train, test\)"):
        split("test", splits={"train": "train", "test": "dev"})
    assert list((tmp_path / "hf" / "datasets").glob("json/*"))  # cached under tmp_path, not the user's home


def test_hf_missing_data_files(tmp_path: Path, hf_offline: None) -> None:
    spec = {"type": "hf", "path": "json", "data_files": {"train": str(tmp_path / "nope.jsonl")}}
    with pytest.raises(MoaError, match=r"cannot load dataset 'json' from data_files .*nope\.jsonl"):
        load_split(spec, "train", task="sentiment", n=1, seed=0, base_dir=tmp_path)


def test_hf_hub_dataset_offline_fails_in_one_line(tmp_path: Path, hf_offline: None) -> None:
    spec = {"type": "hf", "path": "cnn_dailymail", "name": "3.0.0", "revision": None, "data_files": None,
            "splits": {"train": "train", "validation": "validation", "test": "test"}}
    with pytest.raises(MoaError) as info:
        load_split(spec, "train", task="summarization", n=10, seed=0, base_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot load dataset 'cnn_dailymail' from the Hugging Face Hub (offline?")
    assert message.endswith("set tasks.summarization.source to {type: local, files: ...} "
                            "with the dataset's files instead")
