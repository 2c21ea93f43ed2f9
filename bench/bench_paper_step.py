"""A few training steps of a randomly initialized paper-scale model at the paper's micro-batch, on one device:
tokens/s and the peak memory against moa's plan (moa.plan.training_memory) for the same step.

On a GPU (bench/gpu_check.sh): python -m bench.bench_paper_step --preset mistral-7b --rows 16 --seq-len 2048
On this CPU, the same code path on a small preset: python -m bench.bench_paper_step --preset tiny --device cpu
Peak memory: torch.cuda.max_memory_allocated on CUDA, moa.memory.PeakMemory elsewhere.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from moa.data.batching import Example, lm_loss, pack
from moa.lora import inject_lora, mark_only_lora_as_trainable
from moa.lora.inject import DEFAULT_TARGETS
from moa.memory import PeakMemory
from moa.model.config import preset
from moa.model.llama import Transformer
from moa.plan import GiB, LoraShape, Training, training_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--target", type=int, default=256, help="target tokens per document")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    device, config, checkpointing = torch.device(args.device), preset(args.preset), not args.no_checkpointing
    with torch.device(device):  # random weights straight on the device: no 14 GB detour through the host
        model = Transformer(config).to(torch.bfloat16)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    inject_lora(model, DEFAULT_TARGETS, rank=8, alpha=16, dropout=0.05)
    mark_only_lora_as_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.gradient_checkpointing = checkpointing
    docs = [Example([5] * (args.seq_len - args.target - 1), [6] * args.target + [2]) for _ in range(args.rows)]
    [batch] = pack(docs, args.seq_len, args.rows)
    batch = batch.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    resident = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tracker = nullcontext() if cuda else PeakMemory()
    times = []
    with tracker:
        for _ in range(args.steps):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = lm_loss(model, batch, "sum") / batch.loss_tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else tracker.peak + resident
    plan = training_memory(config, LoraShape(DEFAULT_TARGETS, 8, 0.05), torch.bfloat16,
                           Training(args.rows * args.seq_len, batch.loss_tokens, checkpointing, torch.bfloat16))
    tokens_per_s = batch.real_tokens / min(times[1:] or times)
    print(f"| preset | device | micro-batch | checkpointing | tokens/s | peak (GiB) | plan (GiB) | plan / peak |")
    print(f"| {args.preset} | {device} | {args.rows} x {args.seq_len} | {checkpointing} | {tokens_per_s:,.0f} | "
          f"{peak / GiB:.2f} | {plan.device / GiB:.2f} | {plan.device / peak:.3f} |")


if __name__ == "__main__":
    main()
