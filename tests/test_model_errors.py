"""Bad model input: every case is one MoaError naming the file or tensor; the CLI exits 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moa.errors import MoaError
from moa.model import load_pretrained
from tests.conftest import hf_tiny_dir


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    return hf_tiny_dir(tmp_path, "llama")


def rewrite_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_weights(llama_dir: Path) -> None:
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(MoaError, match="no model.safetensors"):
        load_pretrained(llama_dir)


def test_corrupt_safetensors(llama_dir: Path) -> None:
    (llama_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MoaError, match=r"model\.safetensors: cannot read safetensors"):
        load_pretrained(llama_dir)


def test_missing_shard(llama_dir: Path) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoaError, match="model-00001-of-00002.safetensors: shard listed"):
        load_pretrained(llama_dir)


def test_wrong_shape_names_the_tensor(llama_dir: Path) -> None:
    rewrite_weights(llama_dir, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(MoaError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[3, 3\]"):
        load_pretrained(llama_dir)


def test_missing_and_unknown_tensors(llama_dir: Path) -> None:
    rewrite_weights(llama_dir, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(MoaError, match=r"'model\.norm\.weight' is missing"):
        load_pretrained(llama_dir)
    rewrite_weights(llama_dir, lambda t: t.update({"model.norm.weight": torch.ones(64), "extra.w": torch.ones(1)}))
    with pytest.raises(MoaError, match=r"unknown tensor 'extra\.w'"):
        load_pretrained(llama_dir)


def test_unknown_architecture(llama_dir: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoaError, match="unknown architecture 'gpt2'"):
        load_pretrained(llama_dir)


def test_sharded_checkpoint_loads(llama_dir: Path) -> None:
    tensors = load_file(llama_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, llama_dir / shard)
    (llama_dir / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_pretrained(llama_dir)
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_truncated_gguf(smollm2_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 5_000_000])
    with pytest.raises(MoaError, match=r"cut\.gguf: not a readable GGUF file"):
        load_pretrained(truncated)


def test_hub_id_offline_says_how_to_use_a_local_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoaError, match="pass a local path instead"):
        load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_cli_exits_2_with_one_line(llama_dir: Path) -> None:
    (llama_dir / "model.safetensors").write_bytes(b"garbage")
    run = subprocess.run([sys.executable, "-m", "moa", "model", "info", str(llama_dir)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("moa: error:") and "Traceback" not in run.stderr
    debug = subprocess.run([sys.executable, "-m", "moa", "--debug", "model", "info", str(llama_dir)],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
