"""Peak host RAM and time of loading a sharded checkpoint into bfloat16: moa's loader against transformers'.

Writes a random-weight LLaMA checkpoint of TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate
5632, vocab 32000: 1.1 B parameters) in shards of about 500 MB listed in model.safetensors.index.json, one
shard in memory at a time, into a temporary directory: in bfloat16 (2.2 GB, loaded as is), then in float32
(4.4 GB, cast while loading). Each load runs in a fresh process, which reports the RSS after its imports,
its peak RSS (VmHWM: ru_maxrss would carry the parent's peak through fork and exec) and the model's own
bytes. safetensors maps each tensor from its file and reads it on first use, so the child reads every
weight once after loading: only then is the model in RAM. The table gives the peak beyond the imports and
the model, as a multiple of the largest shard (moa's target: at most 1.3x), the load time and the time to
load and read every weight (best of --repeats; the checkpoint is in the page cache). Each checkpoint is
deleted after its loads. Run: python -m bench.bench_load [--repeats 2] [--shard-mb 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moa.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ("moa", "transformers")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def tinyllama_config() -> ModelConfig:
    from moa.model import ModelConfig

    return ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def write_checkpoint(directory: Path, dtype: torch.dtype, shard_bytes: int) -> int:
    """A random checkpoint in shards of at most `shard_bytes` (or one tensor); returns the largest shard's size
    in bytes. The names and shapes are moa's meta model's, so nothing is allocated but one shard."""
    from safetensors.torch import save_file

    from moa.model.checkpoint import empty_model
    from moa.model.tokenizer import byte_tokenizer

    config = tinyllama_config()
    shapes = {k: v.shape for k, v in empty_model(config).state_dict().items()}
    itemsize = dtype.itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: torch.empty(shapes[k], dtype=dtype).normal_(std=0.02) for k in names},
                  directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": sum(s.numel() * itemsize for s in shapes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf(torch_dtype=str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    byte_tokenizer().save(directory)
    return max((directory / f).stat().st_size for f in set(weight_map.values()))


def peak_rss() -> int:
    """This process image's peak RSS in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def child(loader: str, directory: Path) -> None:
    """One load into bfloat16 in this fresh process, then one read of every weight; prints its figures as JSON."""
    if loader == "transformers":
        import transformers.models.llama.modeling_llama  # noqa: F401 (imported before the baseline)
        from transformers import AutoModelForCausalLM

        def load() -> torch.nn.Module:
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    else:
        from moa.model import load_pretrained

        def load() -> torch.nn.Module:
            return load_pretrained(directory, torch.bfloat16)[0]
    baseline = peak_rss()
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter() - start
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    with torch.no_grad():
        for p in params:
            p.sum()
    read = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps({"load": loaded, "read": read, "baseline": baseline, "peak": peak_rss(), "model": model_bytes}))


def measure(directory: Path, repeats: int) -> dict[str, dict]:
    """Each loader's figures from its fastest load-and-read, the loaders alternating."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for loader in LOADERS:
            run = subprocess.run([sys.executable, "-m", "bench.bench_load", "--child", loader, str(directory)],
                                 capture_output=True, text=True, cwd=ROOT, check=True)
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            if loader not in best or figures["read"] < best[loader]["read"]:
                best[loader] = figures
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]))
    from bench.common import device_label

    print(f"\nLoading TinyLlama-1.1B's shape into bfloat16, random weights  "
          f"[{device_label()}, torch {torch.__version__}]")
    print("| checkpoint | loader | load s | load + read s | RSS after imports MB | peak RSS MB | model MB "
          "| peak beyond both MB | / largest shard |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, dtype in DTYPES.items():
        work = Path(tempfile.mkdtemp(prefix="bench-load-"))
        try:
            largest = write_checkpoint(work / "ckpt", dtype, args.shard_mb * 10**6)
            shards = len(list((work / "ckpt").glob("model-*.safetensors")))
            best = measure(work / "ckpt", args.repeats)
        finally:
            shutil.rmtree(work)
        for loader, f in best.items():
            beyond = f["peak"] - f["baseline"] - f["model"]
            print(f"| {name}, {shards} shards of <= {largest / 1e6:.0f} MB | {loader} | {f['load']:.1f} "
                  f"| {f['read']:.1f} | {f['baseline'] / 1e6:.0f} | {f['peak'] / 1e6:.0f} | {f['model'] / 1e6:.0f} "
                  f"| {beyond / 1e6:.0f} | {beyond / largest:.2f}x |")
    print("moa's target: at most 1.3x the largest shard beyond the model")


if __name__ == "__main__":
    main()
