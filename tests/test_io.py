"""Every safetensors file moa writes is byte-identical for the same content, in any process, and is the file
safetensors itself writes but for the order of the metadata keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from moa.io import write_safetensors

# Quotes, a newline, a control character and non-ASCII text: each escaped (or not) as safetensors does.
METADATA = {f"key{i}": f'value {i}: "quoted"\n\x01 Grüße 模型' for i in range(8)}

# Writes an adapter, routers, an HF model directory and a file with many metadata keys into argv[1].
WRITER = f"""
import sys
from pathlib import Path
import torch
from moa.io import write_safetensors
from moa.lora import inject_lora, save_adapter
from moa.model import random_model, save_hf_dir
from moa.routing import LayerRouters, Pooling, RouterSpec, RouterType, save_routers

out = Path(sys.argv[1])
model, tokenizer = random_model("tiny", seed=0)
save_hf_dir(model, tokenizer, out / "model")
torch.manual_seed(0)
inject_lora(model, rank=4, alpha=8)
save_adapter(out / "adapter", model, base_model_name_or_path="tiny", arch_fingerprint=model.config.fingerprint())
(out / "moa").mkdir()
spec = RouterSpec(RouterType.LINEAR, Pooling.MEAN, model.config.num_hidden_layers, model.config.hidden_size, ("a", "b"))
save_routers(out / "moa", LayerRouters(spec), mode="routers")
write_safetensors(out / "many.safetensors", {{"x": torch.arange(4.0)}}, {METADATA!r})
"""


def header(data: bytes) -> tuple[int, bytes]:
    size = int.from_bytes(data[:8], "little")
    return size, data[8:8 + size]


def test_the_file_is_safetensors_own_with_the_metadata_sorted(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=gen), "a.bias": torch.randn(7, generator=gen).half(),
               "c": torch.arange(6).reshape(2, 3), "d": torch.randn(2, 2, generator=gen).bfloat16().t()}
    path = write_safetensors(tmp_path / "t.safetensors", tensors, METADATA)
    ours, reference = path.read_bytes(), save({k: v.contiguous() for k, v in tensors.items()},
                                              {"format": "pt", **METADATA})
    (size, text), (ref_size, ref_text) = header(ours), header(reference)
    assert size == ref_size and (8 + size) % 8 == 0 and ours[8 + size:] == reference[8 + ref_size:]
    assert json.loads(text) == json.loads(ref_text)
    assert list(json.loads(text)["__metadata__"]) == sorted(["format", *METADATA])
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", **METADATA}


def test_adapters_routers_and_models_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """safetensors orders the metadata anew in each process: fresh processes, not one, show it."""
    runs = [tmp_path / f"run{i}" for i in range(5)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stderr=subprocess.PIPE, text=True)
             for run in runs]
    for proc in procs:
        assert proc.wait() == 0, proc.stderr.read()
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*") if p.is_file())
    assert {"adapter/adapter_model.safetensors", "moa/routers.safetensors", "model/model.safetensors",
            "many.safetensors"} <= {str(f) for f in files}
    for run in runs[1:]:
        assert sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file()) == files
        for file in files:
            assert (run / file).read_bytes() == (runs[0] / file).read_bytes(), file
