"""Evaluation of one composition over the default config's test prompts (all six tasks), three engines side
by side in one run. Run: python -m bench.bench_eval [--method base|oracle] [--dtype bfloat16] [--batch 64]

- moa: this checkout's engine: every task's prompts as one stream, continuous batching, packed prefill.
- moa@OLD: the engine as it was at commit OLD (default 5183041, checked out into a git worktree so the
  figure is measured, not remembered): per task, static left-padded batches of 16 (its default run's),
  padded scoring.
- HF: transformers `generate` (+ PEFT for the oracle) on the same prompts, per task, in static padded
  batches of --batch prompts sorted by length, with the task's stop strings; padded scoring.

Every engine runs in a fresh process with the same threads (--threads, default 2), loads the same weights
(SmolLM2-135M-Instruct, dequantized once into an HF directory) and serves the same token ids; `oracle`
gives each task a seeded random rank-8 LoRA on every projection (served per sequence by moa, per task by
moa@OLD, with `adapter_names=` by PEFT). Printed: prompt and generated tokens per second of wall time,
wall time, peak RSS (VmHWM), the share of the compute bound (2 x parameters FLOP per token at the matmul
peak measured in the same run, in the same dtype) reached by the prompt tokens (over moa's prefill time)
and by the generated ones (over its decoding time), how many prompt tokens moa read from a shared prefix
instead of computing them, each engine's wall time over the generation's compute floor (its prompt and
generated tokens at the compute bound: no engine that computes every token can be faster), and how many
greedy outputs equal moa's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OLD_BATCH = 16  # the old engine's batch in its default run
RANK = 8


# --- the parent: workload, peak, sides ------------------------------------------------------------------


def workload(directory: Path, method: str) -> Path:
    """The default config's test prompts tokenized (and for the oracle, one random LoRA per task), with
    the base model as an HF directory: what every side reads."""
    from moa.data.batching import encode_examples, encode_prompts
    from moa.data.prepare import prepare_task
    from moa.data.splits import read_split
    from moa.data.tasks import get_task
    from moa.evaluate import sampling_settings
    from moa.experiment import load_config
    from moa.model import load_pretrained, save_hf_dir

    config = load_config(ROOT / "config/config.yaml", [f"results_dir={directory / 'results'}"])
    model, tokenizer = load_pretrained(config["model"]["source"])
    save_hf_dir(model, tokenizer, directory / "model")
    tasks = []
    for name in config["tasks"]:
        prepare_task(config, name, tokenizer)
        task, frame = get_task(config, name), read_split(config, name, "test")
        chat = config["data"]["chat_template"]
        entry: dict = {"name": name}
        if not task.scored:
            sampling = sampling_settings(config, task)
            entry |= {"prompts": encode_prompts(frame.prompt.tolist(), tokenizer, chat),
                      "budget": sampling.max_new_tokens, "stop": list(sampling.stop)}
        if task.scored:
            entry["examples"] = [(e.prompt_ids, e.target_ids) for e in
                                 encode_examples(frame.prompt.tolist(), frame.target.tolist(), tokenizer, chat)]
        tasks.append(entry)
    if method == "oracle":
        random_adapters(model, directory, [t["name"] for t in tasks])
    path = directory / "workload.json"
    path.write_text(json.dumps({"model": str(directory / "model"), "method": method, "tasks": tasks,
                                "adapters": [str(directory / "adapters" / t["name"]) for t in tasks],
                                "eos": sorted({tokenizer.eos_token_id, model.config.eos_token_id} - {None}),
                                "parameters": sum(p.numel() for p in model.parameters())}))
    return path


def random_adapters(model: torch.nn.Module, directory: Path, names: list[str]) -> None:
    from moa.lora import DEFAULT_TARGETS, inject_lora, lora_layers, save_adapter

    torch.manual_seed(0)
    inject_lora(model, DEFAULT_TARGETS, rank=RANK, alpha=2 * RANK, experts=len(names))
    for layer in lora_layers(model).values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)
    for i, name in enumerate(names):
        save_adapter(directory / "adapters" / name, model, i)


def matmul_peak(dtype: torch.dtype, threads: int) -> float:
    """GFLOP/s of the model's largest matmul shape ([tokens, 576] x [576, 1536]), best of 10 after a warm-up."""
    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    best = float("inf")
    for _ in range(12):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 576 * 1536 / best / 1e9


def old_worktree(commit: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"moa-{commit}"
    if not (path / "moa").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), commit],
                       check=True, capture_output=True)
    return path


def run_side(side: str, work: Path, args: argparse.Namespace, code: Path) -> dict:
    result = work.parent / f"{side}.json"
    env = os.environ | {"PYTHONPATH": str(code)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, str(work), str(result),
           "--dtype", args.dtype, "--batch", str(args.batch), "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, cwd=code, env=env)
    return json.loads(result.read_text())


# --- the children ---------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_moa(work: dict, dtype: torch.dtype, batch: int) -> dict:
    from moa.data.batching import Example
    from moa.generate import Request, Sampling, score, serve
    from moa.lora import attach_experts
    from moa.model import load_pretrained

    model, tokenizer = load_pretrained(work["model"])
    oracle = work["method"] == "oracle"
    if oracle:
        attach_experts(model, [Path(p) for p in work["adapters"]])
    model.to(dtype).eval()
    requests = [Request(p, Sampling(t["budget"], stop=tuple(t["stop"])), i if oracle else None)
                for i, t in enumerate(work["tasks"]) for p in t.get("prompts", [])]
    start = time.perf_counter()
    served = serve(model, tokenizer, requests, batch)
    for i, t in enumerate(work["tasks"]):
        if "examples" in t:
            examples = [Example(p, q) for p, q in t["examples"]]
            score(model, examples, [i] * len(examples) if oracle else None)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "prefill_s": served.prefill_s, "decode_s": served.decode_s,
            "prompt_tokens": served.prompt_tokens, "reused_tokens": served.reused_tokens,
            "new_tokens": served.new_tokens,
            "outputs": [g.tokens for g in served.generations]}


def child_old(work: dict, dtype: torch.dtype, batch: int) -> dict:
    """The engine at the old commit, through its own API (moa.generate.generate / score, set_route)."""
    from moa.data.batching import Example
    from moa.generate import Sampling, generate, score
    from moa.lora import attach_adapter, set_route
    from moa.model import load_pretrained

    model, tokenizer = load_pretrained(work["model"])
    oracle = work["method"] == "oracle"
    if oracle:
        for path in work["adapters"]:
            attach_adapter(model, path, model.config.fingerprint())
    model.to(dtype).eval()
    outputs, prompt_tokens, new_tokens = [], 0, 0
    start = time.perf_counter()
    for i, t in enumerate(work["tasks"]):
        if oracle:
            set_route(model, i)
        if "prompts" in t:
            sampling = Sampling(t["budget"], 0.0, 1.0, 0, tuple(t["stop"]))
            generations = generate(model, tokenizer, t["prompts"], sampling, OLD_BATCH)
            outputs += [g.tokens for g in generations]
            prompt_tokens += sum(map(len, t["prompts"]))
            new_tokens += sum(len(g.tokens) for g in generations)
        if "examples" in t:
            score(model, [Example(p, q) for p, q in t["examples"]], OLD_BATCH)
    return {"wall_s": time.perf_counter() - start, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "outputs": outputs}


def child_hf(work: dict, dtype: torch.dtype, batch: int) -> dict:
    """transformers generate (+ PEFT adapter_names for the oracle) in static, left-padded batches."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=dtype).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(work["model"]) / "tokenizer.json"))
    oracle = work["method"] == "oracle"
    if oracle:
        from peft import PeftModel

        names = [t["name"] for t in work["tasks"]]
        model = PeftModel.from_pretrained(model, work["adapters"][0], adapter_name=names[0])
        for name, path in zip(names[1:], work["adapters"][1:]):
            model.load_adapter(path, adapter_name=name)
        model.eval()
    outputs, prompt_tokens, new_tokens = [], 0, 0
    ends = {0, *work["eos"]}  # padding after a sequence ends, and the EOS moa leaves out
    start = time.perf_counter()
    with torch.inference_mode():
        for t in work["tasks"]:
            extra = {"adapter_names": None} if oracle else {}
            generated: dict[int, list[int]] = {}
            for rows in batches(t.get("prompts", []), batch):
                ids, mask = left_padded([t["prompts"][i] for i in rows])
                if oracle:
                    extra["adapter_names"] = [t["name"]] * len(rows)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=t["budget"], do_sample=False,
                                     eos_token_id=work["eos"], pad_token_id=0, tokenizer=tokenizer,
                                     stop_strings=t["stop"] or None, **extra)
                for r, row in zip(rows, out[:, ids.shape[1]:].tolist()):
                    generated[r] = [x for x in row if x not in ends]
                prompt_tokens += int(mask.sum())
            outputs += [generated[r] for r in sorted(generated)]
            new_tokens += sum(map(len, generated.values()))
            for rows in batches(t.get("examples", []), batch):
                docs = [t["examples"][i][0] + t["examples"][i][1] for i in rows]
                ids, mask = left_padded(docs)
                model(input_ids=ids, attention_mask=mask, **({"adapter_names": [t["name"]] * len(rows)}
                                                              if oracle else {}))
    return {"wall_s": time.perf_counter() - start, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "outputs": outputs}


def batches(items: list, size: int) -> list[list[int]]:
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0] if isinstance(items[i], tuple) else items[i]))
    return [order[k:k + size] for k in range(0, len(order), size)]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - len(row):], mask[k, width - len(row):] = torch.tensor(row), 1
    return ids, mask


CHILDREN = {"moa": child_moa, "old": child_old, "hf": child_hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["base", "oracle"], default="base")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="default: the default config's evaluation.dtype")
    parser.add_argument("--batch", type=int, default=64, help="moa's slots and HF's static batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--old", default="5183041", help="the commit whose engine is the baseline")
    parser.add_argument("--sides", nargs="+", choices=list(CHILDREN), default=list(CHILDREN))
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "WORK", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        from moa.experiment import load_config

        args.dtype = load_config(ROOT / "config/config.yaml")["evaluation"]["dtype"]
    dtype = getattr(torch, args.dtype)
    if args.child:
        side, work, result = args.child
        torch.set_num_threads(args.threads)
        out = CHILDREN[side](json.loads(Path(work).read_text()), dtype, args.batch)
        Path(result).write_text(json.dumps(out | {"peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = workload(Path(tmp), args.method)
        peak = matmul_peak(dtype, args.threads)
        code = {"moa": ROOT, "old": old_worktree(args.old), "hf": ROOT}
        results = {side: run_side(side, work, args, code[side]) for side in args.sides}
        parameters = json.loads(work.read_text())["parameters"]
    report(results, peak, parameters, args)


def report(results: dict[str, dict], peak: float, parameters: int, args: argparse.Namespace) -> None:
    bound = peak * 1e9 / (2 * parameters)  # tokens/s if every FLOP ran at the matmul peak
    labels = {"moa": "moa", "old": f"moa@{args.old}", "hf": "transformers+PEFT" if args.method == "oracle" else
              "transformers"}
    ours = results.get("moa")
    tokens = next(iter(results.values()))
    floor = (tokens["prompt_tokens"] + tokens["new_tokens"]) / bound  # every prompt and generated token computed
    print(f"\nEvaluation of `{args.method}` over the default test prompts, {args.dtype}, {args.threads} threads, "
          f"batch {args.batch}; matmul peak {peak:.0f} GFLOP/s -> compute bound {bound:.0f} tokens/s; the "
          f"generation's compute floor (its prompt and generated tokens at the bound) {floor:.1f} s")
    print("| engine | prompt tok/s | generated tok/s | wall (s) | wall / floor | peak RSS (MB) | wall vs moa | "
          "outputs = moa's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, r in results.items():
        same = (f"{sum(a == b for a, b in zip(r['outputs'], ours['outputs']))}/{len(ours['outputs'])}"
                if ours and side != "moa" else "")
        ratio = f"{r['wall_s'] / ours['wall_s']:.1f}x" if ours else ""
        print(f"| {labels[side]} | {r['prompt_tokens'] / r['wall_s']:.0f} | {r['new_tokens'] / r['wall_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['wall_s'] / floor:.1f} | {r['peak_rss_mb']:.0f} | {ratio} | {same} |")
    if ours:
        computed = ours["prompt_tokens"] - ours["reused_tokens"]
        print(f"\nmoa: prefill {ours['prompt_tokens'] / ours['prefill_s']:.0f} prompt tok/s, of which "
              f"{ours['reused_tokens']} of {ours['prompt_tokens']} read from a shared prefix "
              f"({ours['reused_tokens'] / ours['prompt_tokens']:.0%}); the {computed} computed at "
              f"{computed / ours['prefill_s']:.0f} tok/s ({computed / ours['prefill_s'] / bound:.0%} of the bound); "
              f"decoding {ours['new_tokens'] / ours['decode_s']:.0f} generated tok/s "
              f"({ours['new_tokens'] / ours['decode_s'] / bound:.0%} of the bound at batch {args.batch})")


if __name__ == "__main__":
    main()
