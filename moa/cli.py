"""`moa <step> ...`: thin argparse wrappers over typed functions. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TextIO

import torch

from moa.errors import MoaError
from moa.model.config import DTYPES

SOURCE_HELP = ("model source: an HF directory, a .gguf file, a hub id (org/name), "
               "'smollm2-135m-instruct' (default, packaged) or random:PRESET")


def model_convert(args: argparse.Namespace) -> None:
    from moa.model import load_pretrained, save_hf_dir

    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.source, DTYPES[args.dtype])
    out = save_hf_dir(model, tokenizer, args.out, DTYPES[args.dtype])
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")


def model_info(args: argparse.Namespace) -> None:
    from moa.generate import greedy
    from moa.model import load_pretrained

    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.source, DTYPES[args.dtype])
    loaded = time.perf_counter() - start
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"architecture  {config.model_type} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, vocab {config.vocab_size})")
    print(f"parameters    {n_params / 1e6:.1f} M")
    print(f"dtype         {model.lm_head.weight.dtype}".replace("torch.", ""))
    print(f"loaded in     {loaded:.1f} s")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    stop = {t for t in (tokenizer.eos_token_id, config.eos_token_id) if isinstance(t, int)}
    answer = greedy(model, [tokenizer.encode(prompt)], args.max_new_tokens, stop, tokenizer.pad_token_id)[0]
    print(f"user          {args.prompt}")
    print(f"assistant     {tokenizer.decode(answer).strip()}")


def prepare_data(args: argparse.Namespace) -> None:
    from moa.config import load_config
    from moa.data.prepare import prepare_task
    from moa.model import load_tokenizer
    from moa.tracking import log_step

    config = load_config(args.config, args.set)
    out = prepare_task(config, args.task, load_tokenizer(config["model"]["source"]))
    stats = json.loads((out / "stats.json").read_text())["splits"]
    log_step(config, f"prepare_data:{args.task}", {"moa.step": "prepare_data", "moa.task": args.task},
             {"data": config["data"], "task": config["tasks"][args.task], "seed": config["seed"]},
             metrics={f"{split}_{key}": s[key] for split, s in stats.items() for key in ("rows_out", "truncated")},
             artifacts=[out / "stats.json"])
    rows = ", ".join(f"{split} {s['rows_out']}" for split, s in stats.items())
    print(f"wrote {out} ({rows} rows)")


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads follow the job's threads (Snakemake passes {threads})."""
    if threads:
        torch.set_num_threads(threads)


def pipeline_step(target: str, *wildcards: str,
         show: Callable[[Path], None] | None = None) -> Callable[[argparse.Namespace], None]:
    """A pipeline step: `module:function(config, *wildcards)` on the loaded config, in the job's threads;
    prints what it wrote (and `show(out)` if given)."""

    def run(args: argparse.Namespace) -> None:
        from moa.config import load_config

        set_threads(getattr(args, "threads", None))
        module, name = target.split(":")
        function = getattr(importlib.import_module(module), name)
        out = function(load_config(args.config, args.set), *(getattr(args, w) for w in wildcards))
        if show is not None:
            show(out)
        print(f"wrote {out}")

    return run


def show_metrics(out: Path) -> None:
    import pandas as pd

    metrics = pd.read_parquet(out / "metrics.parquet")
    print(", ".join(f"{m} {v:.4g}" for m, v in zip(metrics.metric, metrics.value)))


def read_prompts(source: TextIO) -> Iterator[str]:
    """Non-empty lines; a JSON object line gives its "prompt" field (JSONL files work as is)."""
    for line in source:
        line = line.rstrip("\n")
        if line.lstrip().startswith("{"):
            line = json.loads(line).get("prompt", "")
        if line.strip():
            yield line.replace("\\n", "\n")  # a literal \n in a one-line prompt means a line break


def generate(args: argparse.Namespace) -> None:
    from moa.compose.composition import load_composition
    from moa.config import load_config
    from moa.data.batching import prompt_texts
    from moa.data.tasks import get_task
    from moa.generate import Sampling, generate

    set_threads(args.threads)
    config = load_config(args.config, args.set)
    task = get_task(config, args.task) if args.task else None
    composed = load_composition(config, args.method, args.task, fold=config["evaluation"]["fold"])
    evaluation = config["evaluation"]
    sampling = Sampling(args.max_new_tokens or (task.max_new_tokens if task else 128),
                        evaluation["temperature"] if args.temperature is None else args.temperature,
                        evaluation["top_p"] if args.top_p is None else args.top_p, config["seed"],
                        task.stop if task else ())
    chat = config["data"]["chat_template"]

    def answer(prompts: list[str]) -> None:
        texts = prompt_texts(prompts, composed.tokenizer, chat)
        ids = [composed.tokenizer.encode(t, add_bos=False if chat else None) for t in texts]
        answers = generate(composed.model, composed.tokenizer, ids, sampling, evaluation["batch_size"],
                           composed.route)
        for prompt, reply in zip(prompts, answers):
            expert = None if reply.expert is None else composed.experts[reply.expert]
            if args.json:
                print(json.dumps({"prompt": prompt, "text": reply.text.strip(), "expert": expert,
                                  "new_tokens": len(reply.tokens), "latency_s": round(reply.latency_s, 4),
                                  "finish": reply.finish}), flush=True)
            else:
                print(("" if expert is None else f"[{expert}] ") + reply.text.strip(), flush=True)

    if args.input is None and sys.stdin.isatty():  # a conversation: answer each line as it comes
        print("one prompt per line (\\n for a line break); Ctrl-D ends", file=sys.stderr)
        for prompt in read_prompts(sys.stdin):
            answer([prompt])
        return
    if args.input and not Path(args.input).is_file():
        raise MoaError(f"{args.input}: prompt file not found")
    with open(args.input) if args.input else nullcontext(sys.stdin) as source:
        answer(list(read_prompts(source)))  # batched, answers in input order


def add_step(steps: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A pipeline step: every one takes --config and any number of --set overrides."""
    step = steps.add_parser(name, help=help, description=help)
    step.add_argument("--config", required=True, help="experiment config (YAML, see config/)")
    step.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set data.sizes.train=200 (typed by the schema)")
    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")

    model = steps.add_parser("model", help="inspect or convert a base model")
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    convert = actions.add_parser("convert", help="write a Hugging Face-format directory that "
                                 "transformers and moa load as is")
    convert.add_argument("source", help=SOURCE_HELP)
    convert.add_argument("out", help="output directory (written atomically)")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype on disk")
    convert.set_defaults(run=model_convert)

    info = actions.add_parser("info", help="print architecture, size, dtype and a short greedy chat reply")
    info.add_argument("source", nargs="?", default=None, help=SOURCE_HELP)
    info.add_argument("--dtype", choices=DTYPES, default="float32")
    info.add_argument("--prompt", default="What is the capital of France?")
    info.add_argument("--max-new-tokens", type=int, default=24)
    info.set_defaults(run=model_info)

    data = add_step(steps, "prepare-data", "build data/{task}/{split}.parquet and stats.json for one task")
    data.add_argument("--task", required=True, help="a task name from the config's tasks section")
    data.set_defaults(run=prepare_data)

    lora = add_step(steps, "train-lora", "train one task's LoRA -> adapters/{task}/ (PEFT format) + "
                    "train_log.parquet; rerunning after an interruption resumes from the last checkpoint")
    lora.add_argument("--task", required=True, help="a task name from the config's tasks section")
    lora.set_defaults(run=pipeline_step("moa.train.lora:train_lora", "task"))
    mixed = add_step(steps, "train-mixed", "train one LoRA on all tasks' data, balanced -> adapters/_mixed/ "
                     "(the Single-LoRA (mixed) baseline); resumable like train-lora")
    mixed.set_defaults(run=pipeline_step("moa.train.lora:train_mixed"))
    router = add_step(steps, "train-router", "MoA stage 2: train a router before every block on the task LoRAs "
                      "(teacher forcing) -> moa/ (routers, experts, router accuracy, confusion matrix); resumable")
    router.set_defaults(run=pipeline_step("moa.train.router:train_router"))
    model_step = add_step(steps, "prepare-model", "write the base model once as an HF directory -> model/ "
                          "(a GGUF is dequantized here; later steps load model/)")
    model_step.set_defaults(run=pipeline_step("moa.train.lora:prepare_model"))
    comp = add_step(steps, "compose", "build one composition from the trained adapters -> compositions/{method}/ "
                    "(a PEFT adapter + merge_report.json for merges; a manifest for base, oracle and moa)")
    comp.add_argument("--method", required=True, help="a name from the config's methods section, e.g. svd")
    comp.set_defaults(run=pipeline_step("moa.compose.composition:compose", "method"))
    ev = add_step(steps, "evaluate", "evaluate one composition on one task's test split -> "
                  "eval/{method}/{task}/predictions.parquet + metrics.parquet")
    ev.add_argument("--method", required=True, help="a name from the config's methods section")
    ev.add_argument("--task", required=True, help="a task name from the config's tasks section")
    ev.set_defaults(run=pipeline_step("moa.evaluate:evaluate", "method", "task", show=show_metrics))
    rep = add_step(steps, "report", "collect every evaluation -> report/metrics.parquet, summary.md and PNG plots")
    rep.set_defaults(run=pipeline_step("moa.report:build_report"))
    gen = add_step(steps, "generate", "answer prompts with any composition: one prompt per line from --input "
                   "or stdin (JSONL lines with a \"prompt\" field also work); interactive on a terminal")
    gen.add_argument("--method", required=True, help="a composition name from the config's methods section")
    gen.add_argument("--task", default=None, help="use this task's stop strings and token budget "
                     "(and its LoRA for the oracle)")
    gen.add_argument("--input", default=None, help="file of prompts (default: stdin)")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's, else 128")
    gen.add_argument("--temperature", type=float, default=None, help="0 decodes greedily (default: the config's)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus mass when sampling (default: the config's)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per answer (text, expert, tokens, "
                     "latency_s, finish)")
    gen.set_defaults(run=generate)
    for step in (lora, mixed, router, comp, ev, gen):
        step.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except MoaError as err:
        if args.debug:
            raise
        print(f"moa: error: {err}", file=sys.stderr)
        return 2
    return 0
