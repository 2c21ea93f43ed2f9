"""What a learned token-level gate costs at decoding, side by side in one run. Run: python -m bench.bench_gates
[--requests 16] [--new-tokens 32] [--threads 2] [--repeats 2]

SmolLM2-135M-Instruct in float32 with three seeded random rank-8 LoRAs on every projection as experts and random
gates. Two tables:
- X-LoRA: moa's engine (continuous batching, the scaling pass with its own KV cache) against PEFT's XLoraModel
  generate (greedy; PEFT turns the KV cache off, so every step runs both passes over the whole sequence), the
  same classifier weights, the same prompts; tokens generated per second, and how many generations are equal.
- every routed composition through moa's engine against the oracle (one expert per sequence): LoRA-Flow (a gate
  per block), X-LoRA (two passes per token), Arrow (a training-free rule in every module).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import print_table, side_by_side

N_EXPERTS, RANK = 3, 8


def library(directory: Path) -> tuple[Path, list[Path]]:
    """SmolLM2 as an HF directory and three random PEFT adapters on it."""
    from moa.lora import DEFAULT_TARGETS, AdapterConfig, adapter_state_dict, inject_lora, lora_layers, write_adapter
    from moa.model import load_pretrained
    from moa.model.checkpoint import save_hf_dir

    model, tokenizer = load_pretrained()
    save_hf_dir(model, tokenizer, directory / "model")
    torch.manual_seed(0)
    inject_lora(model, rank=RANK, alpha=2 * RANK, experts=N_EXPERTS)
    for layer in lora_layers(model).values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)
    return directory / "model", [write_adapter(directory / f"e{i}", AdapterConfig(RANK, 2 * RANK, DEFAULT_TARGETS),
                                               adapter_state_dict(model, i)) for i in range(N_EXPERTS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import XLoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from moa.gates import build_gates, gate_spec
    from moa.generate import Request, Sampling, generate
    from moa.lora import Arrow, activate, attach_experts
    from moa.model import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = library(Path(tmp))
        ours, tokenizer = load_pretrained(model_dir)
        attach_experts(ours, adapters)
        ours.eval()
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(100, 40000, (int(n),), generator=gen).tolist()
                   for n in torch.randint(48, 128, (args.requests,), generator=gen)]
        sampling = Sampling(args.new_tokens)
        no_stop: set[int] = set()  # every sequence decodes its whole budget on both sides

        def served(requests: list[Request]) -> list[list[int]]:
            return [g.tokens for g in generate(ours, tokenizer, requests, batch_size=args.requests,
                                               stop_tokens=no_stop)]

        plain = [Request(p, sampling) for p in prompts]
        new_tokens = args.requests * args.new_tokens

        base = LlamaForCausalLM.from_pretrained(model_dir)
        base.config.use_cache = False
        torch.manual_seed(2)
        peft = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                                adapters={str(i): str(a) for i, a in enumerate(adapters)},
                                                layerwise_scalings=True)).eval()
        xlora = build_gates(gate_spec("xlora", ours, "abc", layerwise_scalings=True))
        xlora.load_state_dict({k.split("internal_xlora_classifier.", 1)[1]: v for k, v in peft.state_dict().items()
                               if "internal_xlora_classifier" in k})

        def peft_generate() -> list[list[int]]:
            out = []
            with torch.inference_mode():
                for p in prompts:
                    ids = peft.generate(input_ids=torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, min_new_tokens=args.new_tokens)
                    out.append(ids[0, len(p):].tolist())
            return out

        xlora.eval().attach(ours)
        results: dict[str, list[list[int]]] = {}
        t_ours, t_peft = side_by_side(lambda: results.__setitem__("moa", served(plain)),
                                      lambda: results.__setitem__("peft", peft_generate()), args.repeats)
        equal = sum(a == b for a, b in zip(results["moa"], results["peft"]))
        print_table(f"X-LoRA decoding, {args.requests} prompts x {args.new_tokens} new tokens, SmolLM2-135M fp32 "
                    f"({equal}/{args.requests} generations equal)",
                    [("X-LoRA generate vs PEFT XLoraModel.generate", new_tokens / t_ours, new_tokens / t_peft,
                      "tokens/s")])
        xlora.detach()

        oracle = [Request(p, sampling, expert=i % N_EXPERTS) for i, p in enumerate(prompts)]
        flow = build_gates(gate_spec("loraflow", ours, "abc"))
        with torch.no_grad():
            flow.weight.normal_(std=0.1)

        def with_gate(gates) -> None:
            gates.attach(ours)
            served(plain)
            gates.detach()

        def with_arrow() -> None:
            activate(ours, Arrow(N_EXPERTS))
            served(plain)
            activate(ours, 0)

        rows = []
        for name, run in (("LoRA-Flow", lambda: with_gate(flow)), ("X-LoRA", lambda: with_gate(xlora)),
                          ("Arrow", with_arrow)):
            t_run, t_oracle = side_by_side(run, lambda: served(oracle), args.repeats)
            rows.append((f"{name} vs the oracle (one expert per sequence)", new_tokens / t_run,
                         new_tokens / t_oracle, "tokens/s"))
        print_table("moa's engine, each routed composition against one expert per sequence", rows)
        print(f"\nextra parameters: LoRA-Flow {flow.n_parameters:,}, X-LoRA (layerwise) {xlora.n_parameters:,}")


if __name__ == "__main__":
    main()
