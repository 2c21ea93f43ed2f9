"""The same lm-evaluation-harness tasks through moa's harness model and through the harness's own `hf` model with the
adapter loaded by PEFT, side by side in one run. Run: python -m bench.bench_harness [--docs 128] [--threads 2]

SmolLM2-135M-Instruct (dequantized once into an HF directory), two seeded random rank-8 LoRAs on every projection,
task arithmetic over them (an exact merge: moa folds it; hf serves it through PEFT, unmerged, as `peft=` does), in
float32. Local harness tasks written here (nothing downloaded): a 4-way multiple-choice task of --docs questions and a
generation task of --docs prompts (16 new tokens, greedy, stop at a newline). Printed: wall time of each task on each
side (the best of --repeats, alternating sides), the tokens it read per second (context and continuation tokens of
every loglikelihood request; prompt and generated tokens of every generation), and how many of moa's samples equal
hf's (loglikelihoods within 1e-4, generations identical).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from bench.common import print_table, side_by_side

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["qa", "sentiment"]


def experiment(root: Path) -> Path:
    from moa.compose.composition import compose
    from moa.experiment import load_config
    from moa.layout import ExperimentPaths
    from moa.lora import DEFAULT_TARGETS, AdapterConfig, adapter_state_dict, inject_lora, lora_layers, write_adapter
    from moa.model import load_pretrained
    from moa.model.prepare import prepare_model

    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config |= {"results_dir": str(root / "results"), "tracking": {"enabled": False},
               "model": {"source": "smollm2-135m-instruct", "dtype": "float32"},
               "evaluation": {"dtype": "float32"}, "tasks": {t: {"source": {"type": "synthetic"}} for t in TASKS},
               "methods": {"task_arithmetic": None}}
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    prepare_model(loaded)
    model, _ = load_pretrained()
    torch.manual_seed(0)
    inject_lora(model, rank=8, alpha=16, experts=len(TASKS))
    for layer in lora_layers(model).values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)
    for index, task in enumerate(TASKS):
        write_adapter(ExperimentPaths.of(loaded).adapter(task), AdapterConfig(8, 16, list(DEFAULT_TARGETS)),
                      adapter_state_dict(model, index))
    compose(loaded, "task_arithmetic")
    return path


def harness_tasks(root: Path, docs: int) -> Path:
    rows = {"mc": [{"question": f"Question {i}: which number follows {i}?",
                    "choices": [f" {i + 1}", f" {i + 2}", f" {i - 1}", " none"], "answer": 0} for i in range(docs)],
            "gen": [{"prompt": f"Passage: the parcel {i} was sent on day {i % 7}.\nQuestion: which parcel?\nAnswer:",
                     "target": f" {i}"} for i in range(docs)]}
    specs = {"bench_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                          "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
             "bench_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
                           "metric_list": [{"metric": "exact_match"}]}}
    for name, records in rows.items():
        (root / f"{name}.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for task, spec in specs.items():
        data = str(root / f"{task.removeprefix('bench_')}.json")
        (root / f"{task}.yaml").write_text(yaml.safe_dump(
            {"task": task, "dataset_path": "json", "test_split": "train",
             "dataset_kwargs": {"data_files": {"train": data}}, **spec}))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa.experiment import load_config
    from moa.harness import MoaLM
    from moa.layout import ExperimentPaths

    with tempfile.TemporaryDirectory() as scratch:
        config = experiment(Path(scratch))
        paths = ExperimentPaths.of(load_config(config))
        include = TaskManager(include_path=str(harness_tasks(Path(scratch), args.docs)))
        ours = MoaLM(str(config), "task_arithmetic", batch_size=64)
        base = AutoModelForCausalLM.from_pretrained(paths.model, torch_dtype=torch.float32)
        peer = HFLM(pretrained=PeftModel.from_pretrained(base, paths.composition("task_arithmetic")).eval(),
                    tokenizer=AutoTokenizer.from_pretrained(paths.model), batch_size=64)
        rows, agree = [], []
        for task in ("bench_mc", "bench_gen"):
            results: dict[str, dict] = {}

            def run(name: str, model: object) -> None:
                results[name] = simple_evaluate(model=model, tasks=[task], task_manager=include,
                                                log_samples=True)["samples"][task]

            mine, theirs = side_by_side(lambda: run("moa", ours), lambda: run("hf", peer), args.repeats)
            tokens = read_tokens(ours, results["moa"])
            rows += [(f"{task}: wall", mine, theirs, "s"), (f"{task}: tokens read", tokens / mine, tokens / theirs,
                                                                "tok/s")]
            agree.append((task, same(results["moa"], results["hf"]), len(results["moa"])))
        print_table(f"lm-evaluation-harness, task_arithmetic on SmolLM2-135M, {args.docs} docs per task, float32",
                    rows)
        for task, equal, total in agree:
            print(f"{task}: {equal} of {total} samples equal hf's")


def read_tokens(model: object, entries: list[dict]) -> int:
    """Tokens a side reads: every request's context and continuation, or prompt and generated text."""
    total = 0
    for entry in entries:
        for arguments, response in zip(entry["arguments"], entry["resps"]):
            texts = [arguments[0], arguments[1] if isinstance(arguments[1], str) else response[0]]
            total += sum(len(model.tok_encode(text)) for text in texts)
    return total


def same(ours: list[dict], theirs: list[dict]) -> int:
    def key(entries: list[dict]) -> list[list]:
        return [e["resps"] for e in sorted(entries, key=lambda e: e["doc_id"])]

    equal = 0
    for a, b in zip(key(ours), key(theirs), strict=True):
        pairs = list(zip(a, b, strict=True))
        equal += all(x == y if isinstance(x[0], str) else abs(x[0][0] - y[0][0]) <= 1e-4 for x, y in pairs)
    return equal


if __name__ == "__main__":
    main()
