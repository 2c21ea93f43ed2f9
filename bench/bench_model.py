"""moa vs transformers+PEFT on SmolLM2-135M with LoRA r=8 on 7 modules, side by side in one run.

Measures forward+backward training tokens/s (batch 8 x 256) and greedy generation tokens/s at batch 1
and 8 (64 new tokens, the LoRA active on both sides). Run: python bench/bench_model.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench.common import print_table, side_by_side
from moa.generate import greedy
from moa.lora import DEFAULT_TARGETS, inject_lora, mark_only_lora_as_trainable
from moa.model import Tokenizer, load_pretrained, save_hf_dir

RANK, ALPHA = 8, 16


def models() -> tuple[torch.nn.Module, torch.nn.Module, Tokenizer]:
    base, tokenizer = load_pretrained()
    directory = tempfile.mkdtemp(prefix="bench-smollm2-")
    save_hf_dir(base, tokenizer, directory)
    ours = copy.deepcopy(base)
    inject_lora(ours, DEFAULT_TARGETS, rank=RANK, alpha=ALPHA)
    mark_only_lora_as_trainable(ours)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peer = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)))
    return ours, peer, tokenizer


def train_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> None:
    """Next-token loss on every position. moa runs its LM head only where a loss is taken
    (`logits_at`), which spares the copy of the full-vocabulary logits and its zero-filled gradient."""
    logits = model(input_ids=ids).logits[:, :-1] if hf else model(ids, logits_at=slice(None, -1))
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5
    torch.manual_seed(0)
    ours, peer, tokenizer = models()
    ours.train(), peer.train()
    ids = torch.randint(0, 49152, (8, 256))
    rows = []
    t_ours, t_peer = side_by_side(lambda: train_step(ours, ids, hf=False), lambda: train_step(peer, ids, hf=True),
                                  repeats)
    rows.append(("forward+backward, batch 8 x 256", ids.numel() / t_ours, ids.numel() / t_peer, "tok/s"))

    ours.eval(), peer.eval()
    new = 64
    for batch in (1, 8):
        prompts = torch.randint(100, 49152, (batch, 32))
        ours_fn = lambda: greedy(ours, tokenizer, prompts.tolist(), new, stop_tokens=set())  # noqa: E731
        peer_fn = lambda: peer.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),  # noqa: E731
                                        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            t_ours, t_peer = side_by_side(ours_fn, peer_fn, repeats)
        rows.append((f"greedy generation, batch {batch}, 64 new", batch * new / t_ours, batch * new / t_peer, "tok/s"))
    print_table("SmolLM2-135M + LoRA r=8 (7 modules), fp32: moa vs transformers+PEFT", rows)


if __name__ == "__main__":
    main()
