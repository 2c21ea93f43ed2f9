"""Loading shard by shard: the same tensors as one file, in the asked dtype on the asked device, and a bad
checkpoint refused from the shard headers before any tensor data is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from moa.errors import MoaError
from moa.experiment import load_config
from moa.model import checkpoint, load_hf_dir, load_pretrained, random_model, save_hf_dir
from moa.model.tokenizer import byte_tokenizer


def reshard(directory: Path, shards: int = 3, edit=None) -> Path:
    """Split model.safetensors into `shards` files of consecutive names (the last holds model.norm.weight)
    listed in model.safetensors.index.json; `edit` changes the last shard's tensors."""
    tensors = load_file(directory / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i * len(names) // shards:(i + 1) * len(names) // shards]}
        if edit and i == shards - 1:
            edit(part)
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def tiny_dir(out: Path) -> Path:
    """The tiny preset (tied embeddings) as moa writes it: one model.safetensors."""
    model, tokenizer = random_model("tiny", seed=0)
    return save_hf_dir(model, tokenizer, out)


def hf_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """One random transformers LLaMA saved twice: in one file, and sharded by transformers itself."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="40KB")
    for directory in (single, sharded):
        byte_tokenizer().save(directory)
    return single, sharded


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tensors whose data the loader reads, in order."""
    names: list[str] = []
    real = checkpoint.safe_open

    class Counting:
        def __init__(self, *args, **kwargs) -> None:
            self.file = real(*args, **kwargs)

        def __enter__(self) -> Counting:
            self.file.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.file.__exit__(*exc)

        def __getattr__(self, name: str):
            return getattr(self.file, name)

        def get_tensor(self, name: str) -> torch.Tensor:
            names.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Counting)
    return names


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for name, tensor in a_state.items():
        assert tensor.dtype == b_state[name].dtype and torch.equal(tensor, b_state[name]), name


def test_moa_resharded_loads_like_one_file(tmp_path: Path, reads: list[str]) -> None:
    single, _ = load_hf_dir(tiny_dir(tmp_path / "single"))
    reads.clear()
    sharded, _ = load_hf_dir(reshard(tiny_dir(tmp_path / "sharded")))
    assert_same_tensors(sharded, single)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    assert sorted(reads) == sorted(k for k in single.state_dict() if k != "lm_head.weight")  # each once


def test_transformers_sharded_loads_like_one_file(tmp_path: Path) -> None:
    single, sharded = hf_dirs(tmp_path)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    reference = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    ours, _ = load_hf_dir(sharded)
    assert_same_tensors(ours, load_hf_dir(single)[0])
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensors_come_in_the_asked_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    _, directory = hf_dirs(tmp_path)
    full, _ = load_hf_dir(directory)
    low, _ = load_hf_dir(directory, dtype)
    for name, tensor in low.state_dict().items():
        assert tensor.dtype == dtype and torch.equal(tensor, full.state_dict()[name].to(dtype)), name
    assert low.inv_freq.dtype == torch.float32 and torch.equal(low.inv_freq, full.inv_freq)  # not cast by loading


BAD_SHARDS = {
    "wrong shape": (lambda t: t.update({"model.norm.weight": torch.ones(3)}),
                    r"tensor 'model\.norm\.weight' has shape \[3\], the config implies \[64\]"),
    "missing": (lambda t: t.pop("model.norm.weight"), r"tensor 'model\.norm\.weight' is missing"),
    "unknown": (lambda t: t.update({"model.extra.weight": torch.ones(2)}), r"unknown tensor 'model\.extra\.weight'"),
}


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_bad_last_shard_fails_before_any_tensor_is_read(tmp_path: Path, reads: list[str], case: str) -> None:
    edit, message = BAD_SHARDS[case]
    directory = reshard(tiny_dir(tmp_path / "bad"), edit=edit)
    with pytest.raises(MoaError, match=message) as err:
        load_pretrained(directory)
    assert "\n" not in str(err.value) and str(directory) in str(err.value)
    assert reads == []
    load_pretrained(reshard(tiny_dir(tmp_path / "good")))  # unedited, it loads: its tensors are read
    assert reads


def test_corrupt_last_shard_fails_before_any_tensor_is_read(tmp_path: Path, reads: list[str]) -> None:
    directory = reshard(tiny_dir(tmp_path / "m"))
    last = sorted(directory.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(MoaError, match=rf"{last.name}: cannot read safetensors .*; re-download") as err:
        load_pretrained(directory)
    assert "\n" not in str(err.value)
    assert reads == []


@pytest.mark.parametrize("source", ["hf", "random:tiny"])
def test_device_is_honoured(tmp_path: Path, source: str) -> None:
    source = reshard(tiny_dir(tmp_path / "m")) if source == "hf" else source
    model, _ = load_pretrained(source, torch.bfloat16, device="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.integration
def test_gguf_device_and_dtype_are_honoured(smollm2_gguf: Path) -> None:
    model, _ = load_pretrained(smollm2_gguf, torch.bfloat16, device="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_base_model_loads_onto_the_jobs_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moa.model import prepared

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"experiment": "t", "results_dir": str(tmp_path / "results"),
                                    "model": {"source": "random:tiny"},
                                    "tasks": {"math": {"source": {"type": "synthetic"}}}}))
    monkeypatch.setattr(prepared, "device", lambda: torch.device("meta"))
    model, _ = prepared.base_model(load_config(path))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_a_hub_tokenizer_is_fetched_without_the_weights(tmp_path, monkeypatch) -> None:
    """prepare-data reads only the tokenizer of a hub model (on a login node: no 15 GB download or load)."""
    import huggingface_hub

    from moa.model import load_tokenizer, random_model
    from moa.model.checkpoint import save_hf_dir

    model, tokenizer = random_model("tiny")
    save_hf_dir(model, tokenizer, tmp_path / "repo")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.extend(allow_patterns)
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert load_tokenizer("org/model").encode("hello") == tokenizer.encode("hello")
    assert "tokenizer.json" in asked and not any("safetensors" in p or p == "config.json" for p in asked)
