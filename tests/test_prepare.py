"""`moa prepare-data`: Parquet outputs, stats, drops by reason, truncation, custom tasks, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moa.cli import main
from moa.config import method_params
from moa.data.batching import encode_examples, pack, padding_fraction
from moa.data.prepare import prepare_task
from moa.data.splits import COLUMNS
from moa.data.tasks import DropRow, get_task
from moa.experiment import load_config
from moa.layout import SPLITS
from moa.metrics import example_statistics
from moa.model import load_tokenizer
from moa.model.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, tasks: dict, **data) -> Path:
    """A config of `tasks` on the tiny model; training rows are long enough for any example."""
    config = {"experiment": "t", "results_dir": str(tmp_path / "results"), "model": {"source": "random:tiny"},
              "data": {"sizes": {"train": 20, "validation": 5, "test": 5}} | data, "tasks": tasks,
              "training": {"seq_len": 4096}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def qa_row(i: int, context: str | None = None, answer: str | None = None, start: int | None = None) -> dict:
    context = context or f"Town {i} lies on the river Avon {i}. It has a market every Monday."
    answer = answer or f"Avon {i}"
    return {"id": f"q{i}", "title": "t", "context": context, "question": f"Which river is at town {i}?",
            "answers": {"text": [answer], "answer_start": [context.find(answer) if start is None else start]}}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(tmp_path: Path, task: str) -> tuple[dict[str, pd.DataFrame], dict]:
    folder = tmp_path / "results" / "t" / "data" / task
    frames = {s: pd.read_parquet(folder / f"{s}.parquet") for s in SPLITS}
    return frames, json.loads((folder / "stats.json").read_text())


@pytest.mark.parametrize("task", ["summarization", "translation", "qa", "sentiment", "dialogue", "math"])
def test_synthetic_tasks_prepare_deterministically(tmp_path: Path, task: str) -> None:
    config = load_config(write_config(tmp_path, {task: {"source": {"type": "synthetic"}}}, max_prompt_tokens=2048))
    prepare_task(config, task, byte_tokenizer())
    first, stats = read(tmp_path, task)
    prepare_task(config, task, byte_tokenizer())
    second, _ = read(tmp_path, task)
    for split, frame in first.items():
        assert list(frame.columns) == COLUMNS
        assert len(frame) == config["data"]["sizes"][split]
        pd.testing.assert_frame_equal(frame, second[split])
        assert frame.prompt.is_unique and (frame.task == task).all()
        assert all(len(refs) >= 1 for refs in frame.references)
        assert stats["splits"][split]["rows_out"] == len(frame)
        assert stats["splits"][split]["prompt_tokens"]["max"] <= 2048
    train, test = set(first["train"].prompt), set(first["test"].prompt)
    assert not train & test


def test_drops_are_counted_by_reason(tmp_path: Path) -> None:
    good = [qa_row(i) for i in range(50)]
    bad = [qa_row(100, answer="Avon 7", start=0),  # the span does not match the context
           qa_row(101, answer=" ")]  # an empty answer
    files = {"train": jsonl(tmp_path / "train.jsonl", good[:40] + bad + [good[0], good[1], good[45]]),
             "validation": jsonl(tmp_path / "val.jsonl", good[40:45]),
             "test": jsonl(tmp_path / "test.jsonl", good[45:])}
    source = {"type": "local", "files": {split: str(path) for split, path in files.items()}}
    config = load_config(write_config(tmp_path, {"qa": {"source": source}},
                                      sizes={"train": 100, "validation": 100, "test": 100}))
    prepare_task(config, "qa", byte_tokenizer())
    frames, stats = read(tmp_path, "qa")
    assert stats["splits"]["train"]["drops"] == {"invalid_answer_span": 1, "empty_target": 1, "duplicate": 3}
    assert stats["splits"]["train"]["rows_in"] == 45 and len(frames["train"]) == 40
    assert "q45" in set(frames["test"].id) and "q45" not in set(frames["train"].id)  # a duplicate leaves train


def test_long_contexts_are_cut_at_token_level(tmp_path: Path) -> None:
    filler = "The weather was calm that year. " * 20
    early = [qa_row(i, context=f"Avon {i} is the river. " + filler) for i in range(30)]
    late = [qa_row(50 + i, context=filler + f"The river is the Avon {50 + i}.") for i in range(5)]
    source = {"type": "local", "files": str(jsonl(tmp_path / "qa.jsonl", early + late))}
    config = load_config(write_config(tmp_path, {"qa": {"source": source}}, max_prompt_tokens=300))
    prepare_task(config, "qa", byte_tokenizer())
    frames, stats = read(tmp_path, "qa")
    tokenizer = byte_tokenizer()
    for frame in frames.values():
        assert all(len(tokenizer.encode(p)) <= 300 for p in frame.prompt)
        assert all(target in prompt for target, prompt in zip(frame.target, frame.prompt))
    late_read = 0
    for split in SPLITS:  # every row read was too long: either cut, or dropped with its answer cut off
        split_stats = stats["splits"][split]
        late = split_stats["drops"].get("answer_truncated", 0)
        assert split_stats["truncated"] + late == split_stats["rows_read"]
        late_read += late
    kept = set().union(*(frame.id for frame in frames.values()))
    assert late_read >= 3 and not kept & {f"q{50 + i}" for i in range(5)}


def test_custom_task_defined_in_config_alone(tmp_path: Path) -> None:
    csv = tmp_path / "capitals.csv"
    pd.DataFrame({"country": [f"Land{i}" for i in range(30)], "capital": [f"City{i}" for i in range(30)]}).to_csv(csv)
    task = {"source": {"type": "local", "files": str(csv)}, "template": "Capital of {country}?",
            "target": "{capital}", "metric": "exact_match", "max_new_tokens": 8}
    config = load_config(write_config(tmp_path, {"capitals": task}))
    prepare_task(config, "capitals", byte_tokenizer())
    frames, _ = read(tmp_path, "capitals")
    row = frames["train"].iloc[0]
    assert row.prompt == f"Capital of {row.target.replace('City', 'Land')}?"
    assert list(row.references) == [row.target]


def test_hf_source_builds_from_local_files_offline(tmp_path: Path) -> None:
    rows = [{"sentence": f"a {'good' if i % 2 else 'bad'} film number {i}", "label": i % 2, "idx": i}
            for i in range(40)]
    train, test = jsonl(tmp_path / "train.jsonl", rows[:30]), jsonl(tmp_path / "test.jsonl", rows[30:])
    source = {"type": "hf", "path": "json", "data_files": {"train": str(train), "test": str(test)}}
    config = load_config(write_config(tmp_path, {"sentiment": {"source": source}}))
    prepare_task(config, "sentiment", byte_tokenizer())
    frames, _ = read(tmp_path, "sentiment")
    assert len(frames["test"]) == 5 and set(frames["test"].id) <= {str(i) for i in range(30, 40)}
    assert set(frames["train"].target) == {"positive", "negative"}
    carved, train = set(frames["validation"].id), set(frames["train"].id)  # no validation file: carved
    assert len(carved) == 5 and not carved & train and carved <= {str(i) for i in range(30)}


# Rows in GLUE MNLI's schema (nyu-mll/glue, mnli): label is a ClassLabel, 0 entailment, 1 neutral, 2 contradiction.
MNLI_ROWS = [
    {"premise": "A man is playing a guitar on a stage.", "hypothesis": "A person is making music.", "label": 0,
     "idx": 0},
    {"premise": "The museum opens at nine on weekdays.", "hypothesis": "The museum is popular with tourists.",
     "label": 1, "idx": 1},
    {"premise": "Two dogs sleep on the porch.", "hypothesis": "The dogs are running in the park.", "label": 2,
     "idx": 2},
]
THESIS = ROOT / "config" / "thesis.yaml"


def test_thesis_config_is_the_reference_studys_setting() -> None:
    config = load_config(THESIS)
    assert config["model"] == {"source": "Qwen/Qwen2-1.5B", "dtype": "bfloat16"}
    assert config["training"]["precision"] == "bf16" and config["evaluation"]["dtype"] == "bfloat16"
    assert "grad_accum" not in yaml.safe_load(THESIS.read_text())["training"]  # batch_size: rows per optimizer step
    assert list(config["tasks"]) == ["summarization", "translation", "qa", "sentiment", "mnli"]
    assert config["lora"]["rank"] == 8
    table = {name: method_params(config, name) for name in ("base", "moa", "svd", "weighted_sum", "concat")}
    assert {name: params["method"] for name, params in table.items()} == {
        "base": "base", "moa": "moa", "svd": "svd", "weighted_sum": "linear", "concat": "concat"}
    assert table["svd"]["k"] == 8 and "oracle" in config["methods"]


def test_thesis_mnli_builds_prompts_and_targets_from_mnli_rows() -> None:
    task = get_task(load_config(THESIS), "mnli")
    assert task.columns == ("premise", "hypothesis", "label") and task.metric == "accuracy"
    assert task.prompt(MNLI_ROWS[0]) == (
        "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.\n\n"
        "Premise: A man is playing a guitar on a stage.\nHypothesis: A person is making music.\nRelation:")
    labels = ["entailment", "neutral", "contradiction"]
    assert [task.target(row) for row in MNLI_ROWS] == labels
    assert [task.references(row) for row in MNLI_ROWS] == [[label] for label in labels]
    for unlabeled in (-1, 3, None, "neutral"):  # GLUE's test splits hold -1
        with pytest.raises(DropRow, match="invalid_label"):
            task.check(MNLI_ROWS[0] | {"label": unlabeled})
    assert task.format.follows(" Neutral", {}) is False and task.format.follows(" neutral\n", {})
    outputs = [" entailment", " neutral.", " It is a contradiction", " maybe"]
    stats, extra = example_statistics("custom", ["accuracy"], outputs, [[label] for label in [*labels, "neutral"]])
    assert stats["accuracy"].tolist() == [100, 100, 100, 0] and extra["unparseable"] == 1


def test_labelled_custom_task_prepares_names_and_drops_unlabeled_rows(tmp_path: Path) -> None:
    rows = [row | {"idx": 10 * i + row["idx"]} for i in range(8) for row in MNLI_ROWS]
    rows = [row | {"premise": f"{row['premise']} ({row['idx']})"} for row in rows]
    unlabeled = [MNLI_ROWS[0] | {"premise": f"Unlabeled {i}.", "label": -1, "idx": 100 + i} for i in range(3)]
    source = f"{{type: local, files: {jsonl(tmp_path / 'mnli.jsonl', rows + unlabeled)}}}"
    config = load_config(THESIS, [f"results_dir={tmp_path / 'results'}", "experiment=t", f"tasks.mnli.source={source}",
                                  "tasks.mnli.sizes={train: 40, validation: 3, test: 3}"])
    prepare_task(config, "mnli", byte_tokenizer())
    frames, stats = read(tmp_path, "mnli")
    assert sum(split["drops"].get("invalid_label", 0) for split in stats["splits"].values()) == 3
    assert not {str(row["idx"]) for row in unlabeled} & set().union(*(frame.id for frame in frames.values()))
    for frame in frames.values():
        assert set(frame.target) <= {"entailment", "neutral", "contradiction"}
        assert all(list(refs) == [target] for refs, target in zip(frame.references, frame.target))
        assert all(prompt.startswith("Does the premise entail") for prompt in frame.prompt)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa", *args], capture_output=True, text=True, cwd=ROOT)


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    good = [qa_row(i) for i in range(30)]
    config = write_config(tmp_path, {
        "qa": {"source": {"type": "local", "files": str(jsonl(tmp_path / "qa.jsonl", good))}},
        "broken": {"source": {"type": "local", "files": str(tmp_path / "broken.jsonl")}, "template": "{question}",
                   "target": "{answer}", "metric": "exact_match"},
    })
    assert main(["prepare-data", "--config", str(config), "--task", "qa"]) == 0
    kept = (tmp_path / "results/t/data/qa/train.parquet").read_bytes()
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "nope"), "unknown task 'nope'")
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "broken"), "broken.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": \n')
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "broken"), "broken.jsonl:2")
    (tmp_path / "broken.jsonl").write_text('{"query": "a", "answer": "b"}\n')
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "broken"),
                          "missing column 'question'", "columns present: query, answer")
    bad_spans = [qa_row(i, answer="Avon 7", start=0) for i in range(30)]
    jsonl(tmp_path / "qa.jsonl", bad_spans)
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "qa"),
                          "no rows left after filtering", "invalid_answer_span")
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "qa", "--set", "data.bogus=1"),
                          "data: Additional properties are not allowed ('bogus' was unexpected)")
    assert_one_line_error(run_cli("prepare-data", "--config", str(config), "--task", "qa",
                                  "--set", "tasks.qa.source.type=ftp"), "tasks.qa.source.type")
    assert (tmp_path / "results/t/data/qa/train.parquet").read_bytes() == kept  # the failed runs changed nothing
    assert not (tmp_path / "results/t/data/broken").exists()
    assert not [p for p in (tmp_path / "results/t/data").iterdir() if p.name.startswith(".")]


@pytest.mark.integration
def test_packing_wastes_under_ten_percent_on_the_default_data(tmp_path: Path) -> None:
    config = load_config(ROOT / "config/config.yaml", [f"results_dir={tmp_path}", "data.sizes.train=300"])
    tokenizer = load_tokenizer(config["model"]["source"])
    examples = []
    for index, task in enumerate(config["tasks"]):
        prepare_task(config, task, tokenizer)
        frame = pd.read_parquet(tmp_path / "default" / "data" / task / "train.parquet")
        examples += encode_examples(frame.prompt.tolist(), frame.target.tolist(), tokenizer, tasks=[index] * len(frame))
    assert padding_fraction(pack(examples, seq_len=1024, batch_size=8, seed=0)) < 0.10
