"""Adapter composition, moa vs PEFT. Run: python -m bench.bench_compose [--sections svd] [--repeat 3]

svd: rank-16 SVD merge of 4 rank-16 adapters (lora_alpha 32, weights 1/4) on one module of each shape.
moa: ``merge_module`` (QR of the stacked factors + SVD of the 64 x 64 core; never forms the dense update).
PEFT: ``add_weighted_adapter(combination_type="svd", svd_rank=16)`` on a one-Linear model wrapped by
``get_peft_model`` that holds the same 4 adapters; it SVDs the dense out x in sum (its defaults, so
full_matrices=True). Time: median of ``--repeat`` calls. Memory: peak RSS delta of the merge calls in a
fresh process per side, i.e. VmHWM after the calls minus VmRSS before them, with the high-water mark reset
(/proc/self/clear_refs) once the inputs exist, so the model and adapters themselves are not counted (Linux only).
Agreement: relative Frobenius difference of the two merged updates, each with its own scaling (PEFT's svd
applies each adapter's scaling once and gives the merged adapter scaling 1 when, as here, no adapter uses rsLoRA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=["svd"], default=["svd"])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per side (median)")
    parser.add_argument("--child", nargs=5, metavar=("SIDE", "OUT", "IN", "REPEAT", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, out, inp, repeat, result = args.child
        return _child(side, int(out), int(inp), int(repeat), Path(result))
    if "svd" in args.sections:
        print_svd_table(bench_svd_merge(repeat=args.repeat), args.repeat)


if __name__ == "__main__":
    main()
