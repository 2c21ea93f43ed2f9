"""The trainer: the loss falls, a killed run resumes bitwise identically, a NaN stops cleanly, and the
adapter train-lora writes loads in transformers+PEFT with moa's logits."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from moa.data.prepare import prepare_task
from moa.errors import MoaError
from moa.experiment import load_config
from moa.layout import ExperimentPaths
from moa.lora import attach_adapter
from moa.model import load_pretrained, save_hf_dir
from moa.model.tokenizer import byte_tokenizer
from moa.train.lora import task_examples, train_lora
from moa.train.trainer import TrainSettings, batches_for, lr_factor

ROOT = Path(__file__).resolve().parents[1]
FAST = ["training.steps=24", "training.batch_size=4", "training.warmup_steps=4",
        "training.eval_every=8", "training.checkpoint_every=6", "training.lr=0.003", "lora.dropout=0.1"]


@pytest.fixture
def smoke(tmp_path: Path) -> Path:
    """The smoke config with its outputs under tmp_path and the sentiment data prepared."""
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    prepare_task(load_config(path), "sentiment", byte_tokenizer())
    return path


def adapter_of(config_path: Path) -> dict[str, bytes]:
    """The sentiment adapter's files (weights and config; the log has timings), byte for byte."""
    files = ExperimentPaths.of(load_config(config_path)).adapter_files("sentiment", train_log=False)
    return {file.name: file.read_bytes() for file in files}


def test_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_loss_decreases_and_the_log_is_complete(smoke: Path) -> None:
    config = load_config(smoke, FAST)
    out = train_lora(config, "sentiment").path
    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log.step) == list(range(1, 25))
    assert log.loss.iloc[-4:].mean() < log.loss.iloc[:4].mean() - 0.5
    assert log.val_loss.notna().sum() == 3 and log.val_loss.dropna().iloc[-1] < log.val_loss.dropna().iloc[0]
    assert not (Path(config["results_dir"]) / "smoke/checkpoints/sentiment").exists()


def test_killed_run_resumes_to_a_bitwise_identical_adapter(smoke: Path, tmp_path: Path) -> None:
    train_lora(load_config(smoke, FAST), "sentiment")
    uninterrupted = adapter_of(smoke)
    adapter_dir = Path(load_config(smoke)["results_dir"]) / "smoke/adapters/sentiment"
    for file in adapter_dir.iterdir():
        file.unlink()
    # A real SIGKILL in a real `moa train-lora` process, right after the optimizer step 15 (checkpoint at 12).
    killer = (
        "import os, signal, moa.train.trainer as t\n"
        "step = t.Trainer._optimize\n"
        "def dying(self, micro):\n"
        "    out = step(self, micro)\n"
        "    if self.step == 14: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return out\n"
        "t.Trainer._optimize = dying\n"
        "from moa.cli import main\n"
        f"main(['train-lora', '--config', {str(smoke)!r}, '--task', 'sentiment', "
        f"{', '.join(repr(a) for pair in zip(['--set'] * len(FAST), FAST) for a in pair)}])\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (adapter_dir / "adapter_model.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "moa", "train-lora", "--config", str(smoke), "--task", "sentiment",
                              *[a for pair in zip(["--set"] * len(FAST), FAST) for a in pair]],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 12" in resumed.stderr
    assert adapter_of(smoke) == uninterrupted  # the files, not only the tensors: hashes of artifacts agree
    log = pd.read_parquet(adapter_dir / "train_log.parquet")
    assert list(log.step) == list(range(1, 25))


def test_a_checkpoint_from_a_gpu_machine_resumes_here(smoke: Path) -> None:
    """A checkpoint that carries a CUDA generator state (written on a GPU) resumes on a machine with another
    device count: everything is read onto the CPU first, the CPU generator restored, the CUDA one left alone."""
    from moa.train.trainer import STATE_FILE, Trainer

    config = load_config(smoke, FAST)
    model, _ = load_pretrained("random:tiny")
    from moa.lora import inject_lora, mark_only_lora_as_trainable

    inject_lora(model, rank=4)
    mark_only_lora_as_trainable(model)
    examples = task_examples(config, "sentiment", "train", byte_tokenizer())[:16]
    settings = TrainSettings.from_config(config["training"])
    folder = Path(config["results_dir"]) / "ckpt"
    trainer = Trainer(model, examples, [], settings, 0, folder)
    trainer.step = 3
    trainer._checkpoint()
    state = torch.load(folder / STATE_FILE, weights_only=True)
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)  # as torch.cuda.get_rng_state() returns it
    torch.save(state, folder / STATE_FILE)
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    resumed = Trainer(model, examples, [], settings, 0, folder)
    resumed._resume()
    assert resumed.step == 3 and torch.equal(torch.get_rng_state(), rng)


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(smoke: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moa.train import trainer

    real = trainer.lm_loss
    calls = {"n": 0}

    def poisoned(model, batch, reduction="mean"):
        calls["n"] += 1
        loss = real(model, batch, reduction=reduction)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(trainer, "lm_loss", poisoned)
    config = load_config(smoke, FAST)
    with pytest.raises(MoaError, match=r"the loss is nan at step \d+; lower training.lr"):
        train_lora(config, "sentiment")
    assert (Path(config["results_dir"]) / "smoke/checkpoints/sentiment/state.pt").is_file()
    assert not (Path(config["results_dir"]) / "smoke/adapters/sentiment").exists()


def test_trained_adapter_loads_in_peft_with_moa_logits(smoke: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    config = load_config(smoke, FAST)
    out = train_lora(config, "sentiment").path
    base, tokenizer = load_pretrained("random:tiny")
    ours = copy.deepcopy(base)
    attach_adapter(ours, out, arch_fingerprint=base.config.fingerprint())
    base_dir = save_hf_dir(base, tokenizer, tmp_path / "tiny-hf")
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), out).eval()
    ids = torch.tensor([tokenizer.encode("Review: a fine film\nSentiment:")])
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-5
        assert (ours(ids) - base(ids)).abs().max().item() > 1e-3  # the adapter learned something


def test_balanced_upsamples_every_task_to_the_largest() -> None:
    from moa.data.batching import Example
    from moa.train.lora import balanced

    small = [Example([1], [2], task=0)] * 3
    large = [Example([1, 1], [2], task=1) for _ in range(8)]
    mixed = balanced([small, large], seed=0)
    assert sum(e.task == 0 for e in mixed) == sum(e.task == 1 for e in mixed) == 8


def test_train_mixed_writes_one_adapter_for_all_tasks(smoke: Path) -> None:
    from moa.layout import MIXED
    from moa.train.lora import train_mixed

    config = load_config(smoke, FAST + ["training.steps=6"])
    for task in ("qa", "math"):
        prepare_task(config, task, byte_tokenizer())
    out = train_mixed(config).path
    assert out.name == MIXED and (out / "adapter_config.json").is_file()
    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log.step) == list(range(1, 7))
    model, _ = load_pretrained("random:tiny")
    attach_adapter(model, out, arch_fingerprint=model.config.fingerprint())


def test_epochs_micro_batches_and_bf16_autocast(smoke: Path) -> None:
    """steps: null trains `epochs` passes of one batch per step; micro-batches and bf16 autocast run."""
    sets = FAST + ["training.steps=null", "training.epochs=2", "training.micro_batch_size=2", "training.precision=bf16"]
    config = load_config(smoke, sets)
    settings = TrainSettings.from_config(config["training"])
    assert settings.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    examples = task_examples(config, "sentiment", "train", byte_tokenizer())
    per_epoch = len(batches_for(examples, settings, config["seed"], 0))
    out = train_lora(config, "sentiment").path
    log = pd.read_parquet(out / "train_log.parquet")
    assert len(log) == 2 * per_epoch
    assert log.epoch.max() == 1 and log.loss.notna().all()
    assert (log.tokens > 0).all()


@pytest.mark.parametrize("change", [["training.gradient_checkpointing=true"],  # with dropout: the same masks
                                    ["training.micro_batch_size=1", "lora.dropout=0"],
                                    ["training.micro_batch_size=3", "training.gradient_checkpointing=true",
                                     "lora.dropout=0"]])
def test_micro_batches_and_checkpointing_give_the_same_update(smoke: Path, change: list[str]) -> None:
    """Splitting a step's batch into micro-batches, or recomputing blocks in backward (dropout masks included),
    changes memory, not the training: the same losses and adapter up to float rounding. (Micro-batches draw
    their dropout masks per micro-batch, so with dropout the update is the same in distribution only.)"""
    def trained(sets: list[str]) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        dropout = [s for s in change if s.startswith("lora.dropout")]
        config = load_config(smoke, FAST + ["training.steps=4", "training.gradient_checkpointing=false"] + dropout
                             + sets)
        out = train_lora(config, "sentiment").path
        return pd.read_parquet(out / "train_log.parquet"), load_file(out / "adapter_model.safetensors")

    (log, adapter), (other_log, other) = trained([]), trained(change)
    np.testing.assert_allclose(other_log.loss, log.loss, rtol=1e-5)
    for name, value in adapter.items():
        torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-6)
