"""Tokenized training examples, packed or length-bucketed batches, and the LM loss on targets only.

A packed row holds several documents (prompt + target + EOS) back to back; attention within each
document (moa.model.llama.Documents) and positions restarting at 0 make each document see exactly what it
would see alone, so packing changes the speed, never the loss.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moa.errors import MoaError
from moa.model.llama import Documents
from moa.model.tokenizer import Tokenizer


class Batching(StrEnum):
    PACK = "pack"  # several examples per row, each attending only to itself
    BUCKET = "bucket"  # one example per row, rows of similar length together


IGNORE = -100  # label of positions without loss (F.cross_entropy's ignore_index)
PAD_ID = 0  # padding is masked out of attention and loss, so its token id never matters


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    target_ids: list[int]  # the target's tokens followed by EOS: the only tokens with loss
    task: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def prompt_texts(prompts: Sequence[str], tokenizer: Tokenizer, chat_template: bool) -> list[str]:
    """The text the model sees before the target: the prompt, or a user turn + generation prompt."""
    if not chat_template:
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def encode_prompts(prompts: Sequence[str], tokenizer: Tokenizer, chat_template: bool) -> list[list[int]]:
    """The token ids the model continues: the prompt (with BOS if the tokenizer asks for one), or a user
    turn + generation prompt (the chat template writes any BOS itself)."""
    return [tokenizer.encode(text, add_bos=False if chat_template else None)
            for text in prompt_texts(prompts, tokenizer, chat_template)]


def target_text(target: str, chat_template: bool) -> str:
    """A plain prompt ends in "Answer:" and the model continues with " Paris" (BPE words carry their
    leading space); a chat turn starts its answer on a fresh line."""
    return target if chat_template else " " + target


def encode_examples(prompts: Sequence[str], targets: Sequence[str], tokenizer: Tokenizer,
                    chat_template: bool = False, tasks: Sequence[int] | None = None) -> list[Example]:
    """Tokenize prompt/target pairs; with chat_template the prompt is a user turn + generation prompt."""
    tasks = [0] * len(prompts) if tasks is None else list(tasks)
    if not len(prompts) == len(targets) == len(tasks):
        raise MoaError(f"encode_examples: {len(prompts)} prompts, {len(targets)} targets and "
                       f"{len(tasks)} tasks; give one of each per example")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MoaError("the tokenizer has no EOS token; training needs one to end every target")
    prompt_ids = encode_prompts(prompts, tokenizer, chat_template)
    target_ids = tokenizer.encode_batch([target_text(t, chat_template) for t in targets])
    empty = sum(not ids for ids in prompt_ids)
    if empty:  # the first target token is predicted from the last prompt token, so one must exist
        raise MoaError(f"{empty} examples have an empty prompt; every example needs at least one prompt token")
    return [Example(p, t + [eos], task) for p, t, task in zip(prompt_ids, target_ids, tasks)]


@dataclass
class Batch:
    input_ids: Tensor  # [B, T] long
    labels: Tensor  # [B, T] long: the token to predict at each position, IGNORE where no loss
    positions: Tensor  # [B, T] long, restarting at 0 for every document
    doc_ids: Tensor  # [B, T] long: document index inside its row, -1 on padding
    tasks: Tensor  # [B] long: the task of the row's documents, -1 if they are mixed (or none)
    example_index: list[int]  # which input Example each document is, in row-major document order

    @property
    def n_examples(self) -> int:
        return len(self.example_index)

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def real_tokens(self) -> int:
        return int((self.doc_ids >= 0).sum())

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.doc_ids.numel()

    def documents(self) -> Documents:
        """The attention's documents, row-major; each row's padding is the tail of its last document (a row of
        padding is one document): padding follows every real token, so it changes no real token's output,
        and a padded row of one example stays one causal call."""
        lengths = []
        for row in self.doc_ids.tolist():
            sizes = [0] * (max(row) + 1) if max(row) >= 0 else [0]
            for d in row:
                sizes[d] += 1  # padding (-1) counts towards the last document
            lengths += sizes
        return Documents(tuple(lengths))

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start:stop as a batch of their own, trimmed to their longest row (a micro-batch)."""
        doc_ids = self.doc_ids[start:stop]
        width = int((doc_ids >= 0).sum(1).max())
        first = int(self.docs_per_row[:start].sum())
        n_docs = int(self.docs_per_row[start:stop].sum())
        cut = {k: getattr(self, k)[start:stop, :width] for k in ("input_ids", "labels", "positions", "doc_ids")}
        return Batch(**cut, tasks=self.tasks[start:stop], example_index=self.example_index[first:first + n_docs])

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of at most `rows` rows each, in order."""
        n = self.input_ids.shape[0]
        return [self.rows(k, min(k + rows, n)) for k in range(0, n, rows)]

    @property
    def docs_per_row(self) -> Tensor:
        """[B]: how many documents each row holds (0 for a row of padding)."""
        return self.doc_ids.amax(dim=1) + 1

    def document_index(self) -> Tensor:
        """[B, T]: the batch-wide document number of each position (-1 on padding)."""
        per_row = self.docs_per_row
        offset = torch.cumsum(per_row, 0) - per_row
        return torch.where(self.doc_ids >= 0, self.doc_ids + offset[:, None], -1)

    def to(self, device: torch.device | str) -> Batch:
        move = {k: getattr(self, k).to(device) for k in ("input_ids", "labels", "positions", "doc_ids", "tasks")}
        return Batch(**move, example_index=self.example_index)


def collate(rows: list[list[int]], examples: Sequence[Example]) -> Batch:
    """Right-pad rows (lists of example indices) to the longest row."""
    T = max(sum(len(examples[i]) for i in row) for row in rows)
    shape = (len(rows), T)
    input_ids, labels = torch.full(shape, PAD_ID), torch.full(shape, IGNORE)
    positions, doc_ids = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1)
    tasks = []
    for b, row in enumerate(rows):
        start = 0
        for d, i in enumerate(row):
            ex, n = examples[i], len(examples[i])
            end = start + n
            input_ids[b, start:end] = torch.tensor(ex.prompt_ids + ex.target_ids)
            # Position t predicts token t + 1; the document's last token (EOS) predicts nothing.
            labels[b, start + len(ex.prompt_ids) - 1:end - 1] = torch.tensor(ex.target_ids)
            positions[b, start:end] = torch.arange(n)
            doc_ids[b, start:end] = d
            start = end
        row_tasks = {examples[i].task for i in row}
        tasks.append(row_tasks.pop() if len(row_tasks) == 1 else -1)
    return Batch(input_ids, labels, positions, doc_ids, torch.tensor(tasks, dtype=torch.long),
                 [i for row in rows for i in row])


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}")  # str seeds hash deterministically (not PYTHONHASHSEED)


def _check_fits(examples: Sequence[Example], limit: int, name: str) -> None:
    too_long = [len(ex) for ex in examples if len(ex) > limit]
    if too_long:
        raise MoaError(f"{len(too_long)} of {len(examples)} examples are longer than {name}={limit} tokens "
                       f"(longest {max(too_long)}): raise {name} or lower the tasks' max_prompt_tokens/"
                       f"max_target_tokens")


def _best_fit_decreasing(order: list[int], examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Pack into rows of <= seq_len tokens: longest first, each into the fullest row it fits."""
    order = sorted(order, key=lambda i: -len(examples[i]))  # stable: ties keep the shuffled order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        n = len(examples[i])
        k = bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([])
            space, r = seq_len, len(rows) - 1
        else:
            space, r = free.pop(k)
        rows[r].append(i)
        if space > n:
            insort(free, (space - n, r))
    return rows


def pack(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int = 0, epoch: int = 0,
         by_task: bool = False) -> list[Batch]:
    """Pack examples into rows of at most seq_len tokens, batch_size rows per batch, shuffled.

    by_task=True packs only same-task examples into a row (a row then has one task, as the
    router's teacher forcing needs); batches may still mix rows of different tasks.
    """
    _check_fits(examples, seq_len, "seq_len")
    rng = _rng(seed, epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(examples[i].task if by_task else 0, []).append(i)
    rows = [row for key in sorted(groups) for row in _best_fit_decreasing(groups[key], examples, seq_len)]
    rng.shuffle(rows)  # otherwise batches would follow the packer's long-to-short order
    batches = [collate(rows[k:k + batch_size], examples) for k in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    return batches


def bucket(examples: Sequence[Example], max_tokens_per_batch: int, seed: int = 0, epoch: int = 0,
           window: int = 1024) -> list[Batch]:
    """One example per row, right-padded; batches of similar lengths up to max_tokens_per_batch
    (rows x longest row). Sorting only within shuffled windows of examples keeps batches random."""
    _check_fits(examples, max_tokens_per_batch, "max_tokens_per_batch")
    rng = _rng(seed, epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(examples[i]))
        rows: list[list[int]] = []
        for i in chunk:  # ascending lengths: the newest example is the longest of its batch
            if rows and (len(rows) + 1) * len(examples[i]) > max_tokens_per_batch:
                batches.append(collate(rows, examples))
                rows = []
            rows.append([i])
        batches.append(collate(rows, examples))
    rng.shuffle(batches)
    return batches


def padding_fraction(batches: Sequence[Batch]) -> float:
    total = sum(b.doc_ids.numel() for b in batches)
    return 1.0 - sum(b.real_tokens for b in batches) / total if total else 0.0


Reduction = Literal["mean", "sum", "per_example"]


LOSS_CHUNK_BYTES = 2**30  # fp32 logits of one chunk of the training loss (its log-softmax and gradients alike)


def loss_chunk(vocab_size: int) -> int:
    """Loss tokens whose logits exist at once in training: 8,192 for a 32k vocabulary, 1,766 for 152k."""
    return max(256, LOSS_CHUNK_BYTES // (4 * vocab_size))


def token_losses(model: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy [N] of the final hidden states [N, H] (before the final norm) against `labels` [N]. With
    gradients, in chunks (loss_chunk) whose logits are recomputed in backward: the logits of a long micro-batch
    over a large vocabulary (32k tokens x 152k) would otherwise take tens of GB."""
    def chunk(h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model.lm_head(model.model.norm(h)).float(), y, reduction="none")

    size = loss_chunk(model.lm_head.out_features)
    if not torch.is_grad_enabled() or len(labels) <= size:
        return chunk(hidden, labels)
    return torch.cat([checkpoint(chunk, h, y, use_reentrant=False)
                      for h, y in zip(hidden.split(size), labels.split(size))])


def lm_loss(model: nn.Module, batch: Batch, reduction: Reduction = "mean") -> Tensor:
    """Cross-entropy on target tokens (+ EOS) only; the LM head runs only at those positions.

    reduction: "mean" over loss tokens, "sum", or "per_example" -> [n_examples] mean loss of each
    document, in the order of batch.example_index.
    """
    if reduction not in ("mean", "sum", "per_example"):
        raise MoaError(f"unknown loss reduction {reduction!r}: use mean, sum or per_example")
    batch = batch.to(next(model.parameters()).device)
    at = batch.labels != IGNORE
    hidden = model.block_input(batch.input_ids, batch.positions, batch.documents(), len(model.model.layers))
    loss = token_losses(model, hidden[at], batch.labels[at])  # [N]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    doc = batch.document_index()[at]
    sums = loss.new_zeros(batch.n_examples).index_add(0, doc, loss)
    counts = loss.new_zeros(batch.n_examples).index_add(0, doc, torch.ones_like(loss))
    return sums / counts
