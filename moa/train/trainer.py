"""The training loop: AdamW, linear warm-up then cosine decay, clipping, gradient accumulation over
micro-batches, activation checkpointing, validation loss, bf16 autocast, and checkpoints that make a killed
run resume bitwise identically (on another device too)."""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moa.data.batching import Batch, Batching, Example, bucket, lm_loss, pack, padding_fraction
from moa.errors import MoaError
from moa.io import atomic_dir
from moa.model.llama import Transformer

LossFn = Callable[[nn.Module, Batch], Tensor]  # summed loss over the batch's units (LossUnit)
LossUnit = Literal["token", "example"]  # what a step's loss is the mean over: target tokens, or examples
STATE_FILE = "state.pt"


class Precision(StrEnum):
    AUTO = "auto"  # bf16 autocast on CUDA, fp32 elsewhere
    FP32 = "fp32"
    BF16 = "bf16"  # autocast; also on CPUs with native bf16


@dataclass(frozen=True)
class TrainSettings:
    """The config's `training` section (see workflow/schemas/config.schema.yaml)."""

    steps: int | None
    epochs: float
    batch_size: int
    seq_len: int
    batching: Batching
    micro_batch_size: int | None  # rows per forward/backward; None: the whole batch
    gradient_checkpointing: bool | str  # True, False or "auto" (moa.plan decides from the device's memory)
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    max_grad_norm: float | None
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    precision: Precision

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> TrainSettings:
        settings = cls(**{f.name: section[f.name] for f in fields(cls)})
        return replace(settings, batching=Batching(settings.batching), precision=Precision(settings.precision))

    @property
    def micro_rows(self) -> int:
        return min(self.micro_batch_size or self.batch_size, self.batch_size)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.precision == Precision.BF16 or (self.precision == Precision.AUTO and device.type == "cuda"):
            return torch.bfloat16
        return None

    def autocast(self, device: torch.device) -> torch.autocast:
        """The forward pass's precision context: bf16 autocast, or a disabled one for fp32."""
        dtype = self.autocast_dtype(device)
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batches_for(examples: Sequence[Example], settings: TrainSettings, seed: int, epoch: int,
                by_task: bool = False) -> list[Batch]:
    """by_task: every row holds one task (bucketing always has one example per row)."""
    if settings.batching == Batching.PACK:
        return pack(examples, settings.seq_len, settings.batch_size, seed=seed, epoch=epoch, by_task=by_task)
    return bucket(examples, settings.seq_len * settings.batch_size, seed=seed, epoch=epoch)


def micro_batches(batch: Batch, settings: TrainSettings) -> list[Batch]:
    """One step's batch as forward/backward passes of at most micro_batch_size x seq_len tokens each."""
    if settings.micro_rows >= settings.batch_size:
        return [batch]
    return batch.split(max(1, settings.micro_rows * settings.seq_len // batch.input_ids.shape[1]))


def total_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    return settings.steps or max(1, math.ceil(settings.epochs * batches_per_epoch))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_for(params: list[nn.Parameter], settings: TrainSettings,
                  total: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule: linear warm-up, then cosine decay to min_lr_ratio at step `total`."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, settings.warmup_steps, settings.min_lr_ratio))


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, settings: TrainSettings) -> float:
    """Clip the gradients to max_grad_norm (if set), step and zero them; returns their norm before clipping."""
    norm = (torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            if settings.max_grad_norm else torch.tensor(float("nan")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class Trainer:
    """Trains the parameters of `model` that require grad; `run()` resumes from `checkpoint_dir`."""

    def __init__(self, model: nn.Module, train: Sequence[Example], validation: Sequence[Example],
                 settings: TrainSettings, seed: int, checkpoint_dir: Path, loss_fn: LossFn | None = None,
                 desc: str = "train", by_task: bool = False, unit: LossUnit = "token") -> None:
        self.model, self.train_examples, self.settings, self.seed = model, train, settings, seed
        self.by_task, self.unit = by_task, unit
        self.checkpoint_dir, self.desc = Path(checkpoint_dir), desc
        self.loss_fn = loss_fn or (lambda m, b: lm_loss(m, b, reduction="sum"))
        self.device = next(model.parameters()).device
        for module in model.modules():
            if isinstance(module, Transformer):
                module.gradient_checkpointing = settings.gradient_checkpointing is True
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise MoaError("nothing to train: the model has no parameter that requires grad")
        self.total = total_steps(settings, len(self._batches(train, 0)))
        self.optimizer, self.scheduler = optimizer_for(list(self.params.values()), settings, self.total)
        self.val_batches = self._batches(validation, 0)[:settings.eval_batches] if validation else []
        self.step, self.epoch, self.position = 0, 0, 0  # position: next batch within the epoch
        self.log: list[dict[str, float]] = []

    def _batches(self, examples: Sequence[Example], epoch: int) -> list[Batch]:
        return batches_for(examples, self.settings, self.seed, epoch, self.by_task)

    def _units(self, batch: Batch) -> int:
        return batch.loss_tokens if self.unit == "token" else batch.n_examples

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> pd.DataFrame:
        """Train to the end (resuming from the last checkpoint if there is one) and return the log."""
        self._resume()
        batches = self._batches(self.train_examples, self.epoch)
        self.model.train()
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)
        while self.step < self.total:
            batch, batches = self._next_batch(batches)
            micro = micro_batches(batch, self.settings)
            start = time.perf_counter()
            loss, grad_norm = self._optimize(micro)
            seconds = time.perf_counter() - start
            tokens = batch.real_tokens
            row = {"step": self.step + 1, "epoch": self.epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / seconds,
                   "pad_fraction": padding_fraction(micro)}
            self.scheduler.step()
            self.step += 1
            if self.val_batches and (self.step % self.settings.eval_every == 0 or self.step == self.total):
                row["val_loss"] = self.validation_loss()
            self.log.append(row)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update()
            if self.step % self.settings.checkpoint_every == 0 and self.step < self.total:
                self._checkpoint()
        bar.close()
        self.model.eval()
        return pd.DataFrame(self.log)

    def _next_batch(self, batches: list[Batch]) -> tuple[Batch, list[Batch]]:
        """The step's batch, moving to a freshly shuffled epoch when one runs out."""
        if self.position == len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._batches(self.train_examples, self.epoch)
        self.position += 1
        return batches[self.position - 1], batches

    def _optimize(self, micro: list[Batch]) -> tuple[float, float]:
        """One optimizer step over the batch's micro-batches; the loss is the mean over all their units (loss
        tokens or examples), so the update does not depend on how the batch is split."""
        n_units = sum(map(self._units, micro))
        total = 0.0
        for batch in micro:
            with self.settings.autocast(self.device):
                loss = self.loss_fn(self.model, batch.to(self.device)) / n_units
            if not torch.isfinite(loss):
                raise MoaError(f"{self.desc}: the loss is {loss.item()} at step {self.step + 1}; lower training.lr "
                               f"or use precision fp32 (checkpoints in {self.checkpoint_dir} are intact)")
            loss.backward()
            total += loss.item()
        return total, clip_and_step(list(self.params.values()), self.optimizer, self.settings)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss per unit (target token or example) over the fixed validation batches (dropout off)."""
        self.model.eval()
        total, units = 0.0, 0
        for micro in (micro for batch in self.val_batches for micro in micro_batches(batch, self.settings)):
            with self.settings.autocast(self.device):
                total += self.loss_fn(self.model, micro.to(self.device)).item()
            units += self._units(micro)
        self.model.train()
        return total / units

    # --- checkpoints ----------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        state = {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(), "step": self.step, "epoch": self.epoch, "position": self.position,
            "total": self.total, "log": self.log,
        }
        if self.device.type == "cuda":  # the generator of the training device only: resumable on any GPU count
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        with atomic_dir(self.checkpoint_dir) as tmp:
            torch.save(state, tmp / STATE_FILE)

    def _resume(self) -> None:
        path = self.checkpoint_dir / STATE_FILE
        if not path.is_file():
            return
        try:
            # On the CPU first: RNG states must stay CPU ByteTensors; the rest moves with copy_/load_state_dict.
            state = torch.load(path, weights_only=True, map_location="cpu")  # never unpickle code
        except Exception as err:  # torch raises several types on a damaged file
            raise MoaError(f"{path}: unreadable checkpoint ({err}); delete {self.checkpoint_dir} to start over") from err
        if state["total"] != self.total or state["params"].keys() != self.params.keys():
            raise MoaError(f"{path}: checkpoint of a different run (steps or trainable parameters differ); "
                           f"delete {self.checkpoint_dir} to start over")
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.epoch, self.position, self.log = state["step"], state["epoch"], state["position"], state["log"]
        tqdm.write(f"{self.desc}: resuming from step {self.step} ({path})", file=sys.stderr)

    def discard_checkpoints(self) -> None:
        """Called once the final outputs are written: the checkpoint has served its purpose."""
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
