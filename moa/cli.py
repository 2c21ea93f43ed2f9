"""`moa <step> ...`: thin argparse wrappers over typed functions. Bad input exits 2 with one line.

The pipeline's steps come from moa.steps.STEPS (`moa train-lora` runs STEPS["train_lora"]); `moa model`
inspects or converts a base model, `moa generate` answers prompts with any composition and `moa export` writes one
where other tools load it.
"""

from __future__ import annotations

import argparse
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
from moa.steps import STEPS, run_step

SOURCE_HELP = ("model source: an HF directory, a .gguf file, a hub id (org/name), "
               "'smollm2-135m-instruct' (default, packaged) or random:PRESET")
WILDCARD_HELP = {"task": "a task name from the config's tasks section",
                 "method": "a composition name from the config's methods section, e.g. svd",
                 "subset": "run on this subset of the config's sweep, e.g. n4-s1 (its tasks: sweep/n4-s1/tasks.json)"}


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
    answer = greedy(model, tokenizer, [tokenizer.encode(prompt)], args.max_new_tokens)[0]
    print(f"user          {args.prompt}")
    print(f"assistant     {tokenizer.decode(answer).strip()}")


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads follow the job's threads (Snakemake passes {threads})."""
    if threads:
        torch.set_num_threads(threads)


def step_command(name: str) -> Callable[[argparse.Namespace], None]:
    """`moa <name>`: run the step on the loaded config in the job's threads; print what it wrote."""

    def run(args: argparse.Namespace) -> None:
        from moa.experiment import load_config

        set_threads(args.threads)
        step = STEPS[name]
        arguments = {a: getattr(args, a) for a in (*step.wildcards, *step.options)}
        result = run_step(name, load_config(args.config, args.set), **arguments)
        print(f"wrote {result.path}")
        if result.summary:
            print(result.summary)

    return run


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
    from moa.data.batching import encode_prompts
    from moa.data.tasks import get_task
    from moa.evaluate import sampling_settings
    from moa.experiment import load_config
    from moa.generate import Request, generate

    set_threads(args.threads)
    config = load_config(args.config, args.set)
    task = get_task(config, args.task) if args.task else None
    composed = load_composition(config, args.method, fold=config["evaluation"]["fold"])
    sampling = sampling_settings(config, task, args.max_new_tokens, args.temperature, args.top_p)
    expert = composed.expert_for(args.task)

    def answer(prompts: list[str]) -> None:
        ids = encode_prompts(prompts, composed.tokenizer, config["data"]["chat_template"])
        requests = [Request(prompt, sampling, expert) for prompt in ids]
        answers = generate(composed.model, composed.tokenizer, requests, config["evaluation"]["batch_size"],
                           composed.router)
        for prompt, reply in zip(prompts, answers):
            served = None if reply.expert is None else composed.experts[reply.expert]
            if args.json:
                print(json.dumps({"prompt": prompt, "text": reply.text.strip(), "expert": served,
                                  "new_tokens": len(reply.tokens), "latency_s": round(reply.latency_s, 4),
                                  "finish": reply.finish}), flush=True)
            else:
                print(("" if served is None else f"[{served}] ") + reply.text.strip(), flush=True)

    if args.input is None and sys.stdin.isatty():  # a conversation: answer each line as it comes
        print("one prompt per line (\\n for a line break); Ctrl-D ends", file=sys.stderr)
        for prompt in read_prompts(sys.stdin):
            answer([prompt])
        return
    if args.input and not Path(args.input).is_file():
        raise MoaError(f"{args.input}: prompt file not found")
    with open(args.input) if args.input else nullcontext(sys.stdin) as source:
        answer(list(read_prompts(source)))  # batched, answers in input order


def add_config_command(commands: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A command on an experiment: --config, any number of --set overrides, --threads."""
    command = commands.add_parser(name, help=help, description=help)
    command.add_argument("--config", required=True, help="experiment config (YAML, see config/)")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set data.sizes.train=200 (typed by the schema)")
    command.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return command


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="inspect or convert a base model")
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


def plan(args: argparse.Namespace) -> None:
    from moa.experiment import load_config
    from moa.plan import DEVICE_MARGIN, Setting, gib, model_config_of, parse_bytes, plan_config, shapes_of, table

    config = load_config(args.config, args.set)
    shapes = model_config_of(args.model_config) if args.model_config else shapes_of(config)
    here = Setting.here()  # this machine's GPU (already DEVICE_MARGIN of it) and host
    gpu = (int(parse_bytes(args.gpu_memory) * DEVICE_MARGIN) if args.gpu_memory
           else here.device_bytes if args.device is None or args.device.startswith("cuda") else None)
    where = Setting(gpu, parse_bytes(args.host_memory) if args.host_memory else here.host_bytes)
    plans = plan_config(config, shapes, where)
    print(f"{config['experiment']}: {shapes.model_type}, {shapes.num_hidden_layers} layers, hidden "
          f"{shapes.hidden_size}; GPU {'none' if where.device_bytes is None else gib(where.device_bytes) + ' GiB usable'}"
          f", host {gib(where.host_bytes)} GiB (GiB below)")
    print(table(plans, where))
    if not all(where.fits(p) for p in plans):
        raise MoaError("some jobs do not fit (fits: NO); `moa <step>` names the setting that fits")


def add_plan_command(commands: argparse._SubParsersAction) -> None:
    command = add_config_command(commands, "plan", "print every job's peak memory (weights, LoRA and optimizer, "
                                 "activations, KV cache, workspace, host) from the model's shapes, without "
                                 "loading it, against a GPU's memory and the host's")
    command.add_argument("--device", default=None, help="cuda:N to plan for this machine's GPU, cpu for none "
                         "(default: the GPU if there is one)")
    command.add_argument("--gpu-memory", default=None, help="plan for a GPU of this size, e.g. 80GB (90%% of it is "
                         "planned, the rest is the CUDA context and fragmentation)")
    command.add_argument("--host-memory", default=None, help="a job's host memory, e.g. 64GB (default: available here)")
    command.add_argument("--model-config", default=None, help="the model's shapes when the config's model cannot "
                         "be read here: a preset (e.g. mistral-7b) or a config.json")
    command.set_defaults(run=plan)


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    gen = add_config_command(commands, "generate", "answer prompts with any composition: one prompt per line "
                             "from --input or stdin (JSONL lines with a \"prompt\" field also work); interactive "
                             "on a terminal")
    gen.add_argument("--method", required=True, help=WILDCARD_HELP["method"])
    gen.add_argument("--task", default=None, help="use this task's stop strings and token budget "
                     "(and its LoRA for the oracle)")
    gen.add_argument("--input", default=None, help="file of prompts (default: stdin)")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="default: evaluation.max_new_tokens, else the task's, else 128")
    gen.add_argument("--temperature", type=float, default=None, help="0 decodes greedily (default: the config's)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus mass when sampling (default: the config's)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per answer (text, expert, tokens, "
                     "latency_s, finish)")
    gen.set_defaults(run=generate)


def export(args: argparse.Namespace) -> None:
    from moa.experiment import load_config
    from moa.export import export

    set_threads(args.threads)
    result = export(load_config(args.config, args.set), args.method, Path(args.out))
    print(f"wrote {result.path}: {result.summary}")


def add_export_command(commands: argparse._SubParsersAction) -> None:
    command = add_config_command(commands, "export", "write a composition where other tools load it: a merge as a "
                                 "merged HF directory (merged/) and a PEFT adapter (adapter/); the task LoRAs of a "
                                 "routed composition (experts/), MoA's routers or the centroids, and a README of how "
                                 "they fit together")
    command.add_argument("--method", required=True, help=WILDCARD_HELP["method"])
    command.add_argument("out", help="output directory (written atomically)")
    command.set_defaults(run=export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    add_model_commands(commands)
    for name, step in STEPS.items():
        command = add_config_command(commands, name.replace("_", "-"), step.help)
        for argument in (*step.wildcards, *step.options):
            command.add_argument(f"--{argument}", required=argument in step.wildcards, help=WILDCARD_HELP[argument])
        command.set_defaults(run=step_command(name))
    add_generate_command(commands)
    add_plan_command(commands)
    add_export_command(commands)
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
