"""moa's trainer vs transformers+PEFT as users run it, on the same examples and the same loss.

SmolLM2-135M, LoRA r=8 on 7 modules, the default synthetic data (all six tasks), loss on target tokens
only. moa: packed rows with per-document attention and the LM head only where there is a loss. Peer:
shuffled, padded batches (right padding to the longest example, labels -100 on prompt and padding) through
transformers' forward with `labels=` and a plain AdamW loop: what HF Trainer does per step.
Each side runs in its own process (peak RSS is per process), interleaved, best of `--repeats`.
Throughput counts real (non-pad) tokens. Run: python -m bench.bench_train [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA, STEPS, ROWS, SEQ_LEN, PEER_BATCH = 8, 16, 3, 4, 512, 8


def examples(results: Path) -> list:
    from moa.data.prepare import prepare_task
    from moa.experiment import load_config
    from moa.model import load_tokenizer
    from moa.train.lora import task_examples

    config = load_config(ROOT / "config/config.yaml", [f"results_dir={results}", "data.sizes.train=48",
                                                       "data.sizes.validation=2", "data.sizes.test=2"])
    tokenizer = load_tokenizer(config["model"]["source"])
    out = []
    for i, task in enumerate(config["tasks"]):
        if not (results / "default/data" / task).exists():
            prepare_task(config, task, tokenizer)
        out += task_examples(config, task, "train", tokenizer, i)
    return out


def moa_steps(data: list, precision: str) -> tuple[int, float]:
    from moa.data.batching import lm_loss, pack
    from moa.lora import inject_lora, mark_only_lora_as_trainable
    from moa.model import load_pretrained

    model, _ = load_pretrained()
    inject_lora(model, rank=RANK, alpha=ALPHA)
    mark_only_lora_as_trainable(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = pack(data, SEQ_LEN, ROWS, seed=0)

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, batches, lambda b: b.real_tokens)


def peer_steps(data: list, precision: str) -> tuple[int, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moa.lora import DEFAULT_TARGETS
    from moa.model import load_pretrained, save_hf_dir

    base, tokenizer = load_pretrained()
    directory = save_hf_dir(base, tokenizer, Path(tempfile.mkdtemp()) / "smollm2")
    del base
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = list(data)
    random.Random(0).shuffle(order)  # HF Trainer's RandomSampler: batches mix lengths (and tasks)
    batches = [padded(order[i:i + PEER_BATCH]) for i in range(0, len(order), PEER_BATCH)]

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, batches, lambda b: int(b["attention_mask"].sum()))


def padded(chunk: list) -> dict[str, torch.Tensor]:
    width = max(len(e) for e in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for row, e in enumerate(chunk):
        n, p = len(e), len(e.prompt_ids)
        ids[row, :n] = torch.tensor(e.prompt_ids + e.target_ids)
        labels[row, p:n] = torch.tensor(e.target_ids)  # transformers shifts labels itself
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def timed(step, batches: list, count) -> tuple[int, float]:
    """Real tokens and seconds of STEPS steps after one warm-up step."""
    step(batches[0])
    start, tokens = time.perf_counter(), 0
    for batch in batches[1:1 + STEPS]:
        step(batch)
        tokens += count(batch)
    return tokens, time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n ** 3 / (time.perf_counter() - start)


def useful_flops(tokens: int) -> float:
    """Forward + input-gradient matmuls of the frozen base (no weight gradients): 4 x params x tokens."""
    body = 134.5e6 - 49152 * 576  # parameters without the (tied) embedding
    return 4 * body * tokens


def child(side: str, precision: str, results: Path) -> None:
    torch.manual_seed(0)
    data = examples(results)
    tokens, seconds = (moa_steps if side == "moa" else peer_steps)(data, precision)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": tokens / seconds, "peak_rss_mb": peak_mb, "flops_per_s": useful_flops(tokens) / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "PRECISION", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]))
    from bench.common import device_label

    results = Path(tempfile.mkdtemp(prefix="bench-train-"))
    examples(results)  # prepare once, outside the timed children
    peaks = {p: matmul_peak(d) for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"\nLoRA training, SmolLM2-135M r=8 on 7 modules, target-token loss  [{device_label()}]")
    print("| precision | side | real tok/s | peak RSS MB | % of matmul peak |")
    print("|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for side in ("moa", "peer"):
                run = subprocess.run([sys.executable, "-m", "bench.bench_train", "--child", side, precision, str(results)],
                                     capture_output=True, text=True, cwd=ROOT, check=True)
                figures = json.loads(run.stdout.strip().splitlines()[-1])
                if side not in best or figures["tokens_per_s"] > best[side]["tokens_per_s"]:
                    best[side] = figures
        for side, figures in best.items():
            print(f"| {precision} | {side} | {figures['tokens_per_s']:.0f} | {figures['peak_rss_mb']:.0f} | "
                  f"{100 * figures['flops_per_s'] / peaks[precision]:.0f}% |")
        ratio = best["moa"]["tokens_per_s"] / best["peer"]["tokens_per_s"]
        memory = best["moa"]["peak_rss_mb"] / best["peer"]["peak_rss_mb"]
        print(f"| {precision} | moa/peer | {ratio:.2f}x | {memory:.2f}x | |")
    print(f"matmul peak (2048^3): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
