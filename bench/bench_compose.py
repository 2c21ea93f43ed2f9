"""Adapter composition, moa vs PEFT. Run: python -m bench.bench_compose [--sections svd generation] [--repeat 3]

svd: rank-16 SVD merge of 4 rank-16 adapters (lora_alpha 32, weights 1/4) on one module of each shape.
moa: ``merge_module`` (QR of the stacked factors + SVD of the 64 x 64 core; never forms the dense update).
PEFT: ``add_weighted_adapter(combination_type="svd", svd_rank=16)`` on a one-Linear model wrapped by
``get_peft_model`` that holds the same 4 adapters; it SVDs the dense out x in sum (its defaults, so
full_matrices=True). Time: median of ``--repeat`` calls. Memory: peak RSS delta of the merge calls in a
fresh process per side, i.e. VmHWM after the calls minus VmRSS before them, with the high-water mark reset
(/proc/self/clear_refs) once the inputs exist, so the model and adapters themselves are not counted (Linux only).
Agreement: relative Frobenius difference of the two merged updates, each with its own scaling (PEFT's svd
applies each adapter's scaling once and gives the merged adapter scaling 1 when, as here, no adapter uses rsLoRA).

generation: SmolLM2-135M, a batch of 8 prompts (--batch) mixing 4 tasks (synthetic test prompts), 64 new
tokens (greedy, no early stop), 4 random rank-8 experts on every projection, fp32 (--dtype bfloat16). Tokens/s of base, one adapter, MoA
`last` (routed in the prefill, one expert per sequence) with routers fitted to the prompts' tasks (they
agree across layers, as trained MoA routers do) and with random routers (their layers disagree, so every
row is prefilled again with its chosen expert), the exact concat merge (one rank-32 adapter) and an SVD
merge folded into the weights (merge_and_unload); Arrow (top 3 of the 4 experts per token in every module),
moa's vs PEFT's ``create_arrow_model``; and the mixed batch with each sequence's own expert, moa's
per-sequence route vs PEFT's ``generate(adapter_names=...)``. Best of ``--repeat`` runs, rounds interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bench.common import _timed, device_label

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((4096, 4096), (11008, 4096))  # (out, in)
N_ADAPTERS, RANK, ALPHA = 4, 16, 32


def adapter_factors(out: int, inp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A [r, in], B [out, r]) of each adapter, seeded, both nonzero and of LoRA-like magnitude."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(RANK, inp, generator=gen) / inp**0.5, torch.randn(out, RANK, generator=gen) * 0.01)
            for _ in range(N_ADAPTERS)]  # fmt: skip


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; the memory measurement needs Linux")


def _measured(run: Callable[[int], None], repeat: int) -> tuple[float, float]:
    """Median seconds of ``run(i)`` over ``repeat`` calls and the peak RSS delta (MiB) across them."""
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (_status_kb("VmHWM") - before) / 1024


def _moa_svd(out: int, inp: int, repeat: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    from moa.compose.merge import Factors, MergeSpec, merge_module

    factors = [Factors(A, B, ALPHA / RANK) for A, B in adapter_factors(out, inp)]
    spec = MergeSpec("svd", (1 / N_ADAPTERS,) * N_ADAPTERS, k=RANK)
    results = []
    seconds, peak = _measured(lambda i: results.append(merge_module(spec, factors, 0)), repeat)
    merged = results[-1]
    return seconds, peak, {"A": merged.A, "B": merged.B, "scaling": torch.tensor(merged.scaling)}


def _peft_svd(out: int, inp: int, repeat: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(inp, out, bias=False))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])
    peft = get_peft_model(model, config, adapter_name="a0")
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for name in names[1:]:
        peft.add_adapter(name, config)
    layer = peft.base_model.model.proj
    with torch.no_grad():
        for name, (A, B) in zip(names, adapter_factors(out, inp)):
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)

    def merge(i: int) -> None:
        if i:  # keep only the latest result; add_weighted_adapter ignores an existing name
            peft.delete_adapter(f"m{i - 1}")
        peft.add_weighted_adapter(names, [1 / N_ADAPTERS] * N_ADAPTERS, f"m{i}", combination_type="svd", svd_rank=RANK)

    seconds, peak = _measured(merge, repeat)
    last = f"m{repeat - 1}"
    return seconds, peak, {"A": layer.lora_A[last].weight.detach(), "B": layer.lora_B[last].weight.detach(),
                           "scaling": torch.tensor(float(layer.scaling[last]))}  # fmt: skip


def _child(side: str, out: int, inp: int, repeat: int, result: Path) -> None:
    torch.manual_seed(0)
    merge = _moa_svd if side == "moa" else _peft_svd
    merge(64, 48, 1)  # warm-up on a small module: one-off library initialization is not the merge's cost
    seconds, peak, tensors = merge(out, inp, repeat)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(result))
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def _run_child(side: str, out: int, inp: int, repeat: int, result: Path) -> dict:
    command = [sys.executable, "-m", "bench.bench_compose", "--child", side, str(out), str(inp), str(repeat)]
    run = subprocess.run([*command, str(result)], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _update(result: Path) -> torch.Tensor:
    t = load_file(str(result))
    return float(t["scaling"]) * t["B"].double() @ t["A"].double()


def bench_svd_merge(shapes: tuple[tuple[int, int], ...] = SHAPES, repeat: int = 3) -> list[dict]:
    """One row per (out, in) shape: each side's median time, peak RSS delta, and their agreement."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-compose-") as tmp:
        for out, inp in shapes:
            row: dict = {"shape": f"{out}x{inp}"}
            for side in ("moa", "peft"):
                row[side] = _run_child(side, out, inp, repeat, Path(tmp) / f"{side}.safetensors")
            ours, theirs = _update(Path(tmp) / "moa.safetensors"), _update(Path(tmp) / "peft.safetensors")
            row["relative_diff"] = float((theirs - ours).norm() / ours.norm())
            rows.append(row)
    return rows


def print_svd_table(rows: list[dict], repeat: int) -> None:
    from bench.common import device_label

    print(f"\nSVD merge, {N_ADAPTERS} adapters r={RANK} -> k={RANK}, fp32, median of {repeat}  "
          f"[{device_label()}, torch {torch.__version__}]")
    print("| module (out x in) | moa s | peft s | peft/moa time | moa peak MiB | peft peak MiB | peft/moa memory "
          "| rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        moa, peft = r["moa"], r["peft"]
        print(f"| {r['shape']} | {moa['seconds']:.3f} | {peft['seconds']:.2f} | {_ratio(peft, moa, 'seconds')} "
              f"| {moa['peak_mib']:.0f} | {peft['peak_mib']:.0f} | {_ratio(peft, moa, 'peak_mib')} "
              f"| {r['relative_diff']:.1e} |")


def _ratio(peer: dict, ours: dict, key: str) -> str:
    return f"{peer[key] / ours[key]:.1f}x" if ours[key] > 0 else "inf"


# --- generation -------------------------------------------------------------------------------------------

GEN_TASKS = ("summarization", "translation", "qa", "math")
NEW_TOKENS, GEN_RANK = 64, 8
ARROW, PEFT_ARROW = "Arrow, top 3 of 4 experts per token: moa", "Arrow, top 3 of 4 experts per token: PEFT"


def mixed_batch(tokenizer: Any, per_task: int) -> tuple[list[list[int]], list[int]]:
    """`per_task` synthetic test prompts of each task, and each prompt's task index."""
    from moa.data.synthetic import generate as synthetic
    from moa.data.tasks import get_task

    prompts, tasks = [], []
    for index, name in enumerate(GEN_TASKS):
        task = get_task({"tasks": {name: None}}, name)
        for row in synthetic(name, per_task, seed=0, split="test"):
            prompts.append(tokenizer.encode(task.prompt(row)))
            tasks.append(index)
    return prompts, tasks


def expert_model(base: torch.nn.Module) -> torch.nn.Module:
    """`base` with 4 seeded random experts (nonzero B, so each one changes the output)."""
    from moa.lora import inject_lora, lora_layers

    model = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(model, rank=GEN_RANK, alpha=2 * GEN_RANK, experts=len(GEN_TASKS))
    for layer in lora_layers(model).values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)
    return model.eval()


def fitted_routers(model: torch.nn.Module, prompts: list[list[int]], tasks: list[int]) -> Any:
    """Linear routers (moa's default mean pooling) fitted to the prompts' tasks on teacher-forced inputs."""
    from moa.data.batching import Example, collate
    from moa.lora import activated
    from moa.routing import LayerRouters, RouterSpec, pooled_block_inputs, prompt_index

    cfg = model.config
    routers = LayerRouters(RouterSpec("linear", "mean", cfg.num_hidden_layers, cfg.hidden_size, GEN_TASKS))
    batch, truth = collate([[i] for i in range(len(prompts))], [Example(p, []) for p in prompts]), torch.tensor(tasks)
    device = next(model.parameters()).device
    with torch.no_grad(), activated(model, truth.to(device)), \
            pooled_block_inputs(model, prompt_index(batch.to(device)), "mean") as pooled:
        model(batch.input_ids.to(device), positions=batch.positions.to(device), attn_mask=batch.attn_mask().to(device),
              logits_at=slice(0, 0))
    routers.to(device)
    optimizer = torch.optim.Adam(routers.parameters(), lr=0.01)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(routers(pooled).flatten(0, 1), truth.repeat(len(pooled)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return routers.eval()


def merged_model(base: torch.nn.Module, experts: torch.nn.Module, method: str, fold: bool) -> torch.nn.Module:
    from moa.compose.merge import MergeSpec, merge_adapters
    from moa.lora import AdapterConfig, adapter_state_dict, attach_adapter, merge_and_unload, write_adapter

    config = AdapterConfig(GEN_RANK, 2 * GEN_RANK, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    states = [(config, adapter_state_dict(experts, i)) for i in range(len(GEN_TASKS))]
    merged, state, _ = merge_adapters(MergeSpec(method), states, GEN_TASKS)
    model = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as tmp:
        attach_adapter(model, write_adapter(tmp, merged, state))
    if fold:
        merge_and_unload(model)
    return model.eval()


def hf_model(base: torch.nn.Module, tokenizer: Any) -> torch.nn.Module:
    """The same base weights as a transformers model."""
    from transformers import AutoModelForCausalLM

    from moa.model import save_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_dir(base, tokenizer, tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)


def peft_model(base: torch.nn.Module, tokenizer: Any, experts: torch.nn.Module) -> torch.nn.Module:
    """transformers + PEFT holding the same 4 experts as adapters "0".."3"."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from moa.lora import DEFAULT_TARGETS, adapter_state_dict

    config = LoraConfig(r=GEN_RANK, lora_alpha=2 * GEN_RANK, target_modules=list(DEFAULT_TARGETS))
    model = get_peft_model(hf_model(base, tokenizer), config, adapter_name="0")
    for i in range(len(GEN_TASKS)):
        if i:
            model.add_adapter(str(i), config)
        set_peft_model_state_dict(model, adapter_state_dict(experts, i), adapter_name=str(i))
    return model.eval()


def peft_arrow_model(base: torch.nn.Module, tokenizer: Any, experts: torch.nn.Module,
                     top_k: int) -> torch.nn.Module:
    """transformers + PEFT's Arrow (``create_arrow_model``) over the same 4 experts."""
    from peft import ArrowConfig, create_arrow_model

    from moa.lora import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        dirs = [str(save_adapter(Path(tmp) / str(i), experts, i)) for i in range(len(GEN_TASKS))]
        return create_arrow_model(hf_model(base, tokenizer), dirs, ArrowConfig(top_k=top_k, rng_seed=0)).eval()


def bench_generation(repeat: int, per_task: int, dtype: torch.dtype) -> list[tuple[str, float]]:
    from moa.generate import Request, Sampling, generate
    from moa.lora import Active, Arrow, activate
    from moa.model import load_pretrained
    from moa.model.prepared import device
    from moa.routing import LayerRouters, LearnedRouter, RouterSpec

    base, tokenizer = load_pretrained()
    base.eval()
    prompts, tasks = mixed_batch(tokenizer, per_task)
    experts, sampling = expert_model(base), Sampling(NEW_TOKENS)
    cfg = base.config
    fitted = LearnedRouter(fitted_routers(experts, prompts, tasks), "last")
    torch.manual_seed(0)
    random = LearnedRouter(LayerRouters(RouterSpec("linear", "mean", cfg.num_hidden_layers, cfg.hidden_size,
                                                   GEN_TASKS)), "last")
    concat, folded = merged_model(base, experts, "concat", False), merged_model(base, experts, "svd", True)
    peft, arrow = peft_model(base, tokenizer, experts), Arrow()
    peft_arrow = peft_arrow_model(base, tokenizer, experts, arrow.top_k)
    for model in (base, experts, concat, folded, peft, peft_arrow):
        model.to(device(), dtype)
    ids, valid = (t.to(device()) for t in left_pad(prompts))
    names = [str(t) for t in tasks]
    batch = len(prompts)

    def ours(model: torch.nn.Module, experts_of: list[int] | None = None, router: LearnedRouter | None = None,
             active: Active = None) -> Callable[[], list]:
        requests = [Request(p, sampling, None if experts_of is None else experts_of[i]) for i, p in enumerate(prompts)]

        def run() -> list:
            if active is not None:
                activate(model, active)
            return generate(model, tokenizer, requests, batch, router, stop_tokens=set())  # every row: NEW_TOKENS
        return run

    def theirs(model: torch.nn.Module, **kwargs: Any) -> Callable[[], Any]:
        return lambda: model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)

    routed = [g.expert for g in ours(experts, router=fitted)()]
    print(f"fitted routers send {sum(r == t for r, t in zip(routed, tasks))}/{len(tasks)} prompts to their task")
    runs = {
        "base": ours(base),
        "single adapter": ours(experts, active=0),
        "MoA last, fitted routers (one prefill)": ours(experts, router=fitted),
        "MoA last, random routers (every row prefilled twice)": ours(experts, router=random),
        "concat merge (one rank-32 adapter)": ours(concat),
        "SVD merge folded into the weights": ours(folded),
        ARROW: ours(experts, active=arrow),
        PEFT_ARROW: theirs(peft_arrow),
        "mixed batch, 4 experts: moa per-sequence experts": ours(experts, tasks),
        "mixed batch, 4 experts: PEFT adapter_names=": theirs(peft, adapter_names=names),
    }
    best = {name: float("inf") for name in runs}
    with torch.inference_mode(), tqdm(total=len(runs) * (repeat + 1), desc="generation runs") as bar:
        for name, run in runs.items():
            run()  # warm-up
            bar.update()
        for _ in range(repeat):
            for name, run in runs.items():
                best[name] = min(best[name], _timed(run))
                bar.set_postfix_str(f"{name}: {len(prompts) * NEW_TOKENS / best[name]:.1f} tok/s")
                bar.update()
    return [(name, len(prompts) * NEW_TOKENS / seconds) for name, seconds in best.items()]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] and attention mask [B, P] with every prompt flush right, as transformers' generate wants."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    return ids, valid


def print_generation_table(rows: list[tuple[str, float]], batch: int, dtype: torch.dtype) -> None:
    rate = dict(rows)
    print(f"\nGeneration, SmolLM2-135M {str(dtype).removeprefix('torch.')}, batch {batch} mixing 4 tasks, "
          f"{NEW_TOKENS} new tokens  [{device_label()}]")
    print("| run | tokens/s | ratio |")
    print("|---|---:|---|")
    peft = "mixed batch, 4 experts: PEFT adapter_names="
    reference = {"single adapter": "base", "MoA last, fitted routers (one prefill)": "single adapter",
                 "MoA last, random routers (every row prefilled twice)": "single adapter",
                 "concat merge (one rank-32 adapter)": "single adapter", "SVD merge folded into the weights": "base",
                 ARROW: "single adapter",
                 "mixed batch, 4 experts: moa per-sequence experts": peft}
    for name, value in rows:
        peer = reference.get(name)
        ratio = f"{value / rate[peer]:.2f}x vs {peer}" if peer else ""
        print(f"| {name} | {value:.1f} | {ratio} |")
    print(f"\nmoa's Arrow runs at {rate[ARROW] / rate[PEFT_ARROW]:.2f}x PEFT's create_arrow_model.")
    print(f"Ceiling of any per-sequence LoRA path here: moa's base model with no adapter runs at "
          f"{rate['base'] / rate[peft]:.2f}x PEFT's mixed batch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=["svd", "generation"], default=["svd", "generation"])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per side (median)")
    parser.add_argument("--batch", type=int, default=8, help="generation: prompts in the batch (a multiple of 4)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="generation: weights")
    parser.add_argument("--child", nargs=5, metavar=("SIDE", "OUT", "IN", "REPEAT", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, out, inp, repeat, result = args.child
        return _child(side, int(out), int(inp), int(repeat), Path(result))
    if "svd" in args.sections:
        print_svd_table(bench_svd_merge(repeat=args.repeat), args.repeat)
    if "generation" in args.sections:
        dtype = getattr(torch, args.dtype)
        print_generation_table(bench_generation(args.repeat, args.batch // len(GEN_TASKS), dtype), args.batch, dtype)


if __name__ == "__main__":
    main()
