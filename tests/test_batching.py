"""Training batches: labels and masks, packed == unpacked loss, determinism, padding, errors."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from moa.data.batching import IGNORE, Batch, Example, bucket, encode_examples, lm_loss, pack, padding_fraction
from moa.errors import MoaError
from moa.model import document_mask

TEXTS = [
    ("Translate to German: good morning", "Guten Morgen"),
    ("Sentiment: a wonderful film", "positive"),
    ("Q: 2+3?", "5"),
    ("Summarize: the cat sat on the mat all day long.", "A cat sat."),
    ("Hi", "Hello there, how can I help you today?"),
    ("Sentiment: dull and far too long", "negative"),
    ("Q: capital of France?", "Paris"),
]


def synthetic(n: int, seed: int = 0, tasks: int = 1) -> list[Example]:
    """Prompts of 30-250 and targets of 5-50 tokens, as in the real tasks after truncation."""
    rng = random.Random(seed)
    return [Example([rng.randrange(3, 300) for _ in range(rng.randint(30, 250))],
                    [rng.randrange(3, 300) for _ in range(rng.randint(5, 50))] + [2], task=i % tasks)
            for i in range(n)]


def check_structure(batch: Batch, examples: list[Example]) -> None:
    """Every document is laid out as prompt + target, with labels inside it only."""
    docs = batch.document_index()
    for d, i in enumerate(batch.example_index):
        b, t = (docs == d).nonzero(as_tuple=True)
        assert b.unique().numel() == 1 and torch.equal(t, torch.arange(t[0], t[0] + len(examples[i])))
        ex, b = examples[i], b[0]
        assert batch.input_ids[b, t].tolist() == ex.prompt_ids + ex.target_ids
        assert batch.positions[b, t].tolist() == list(range(len(ex)))
        assert batch.labels[b, t].tolist() == [IGNORE] * (len(ex.prompt_ids) - 1) + ex.target_ids + [IGNORE]
    has_label = batch.labels != IGNORE
    assert torch.equal(batch.labels[:, :-1][has_label[:, :-1]], batch.input_ids[:, 1:][has_label[:, :-1]])
    assert (batch.doc_ids[:, :-1] == batch.doc_ids[:, 1:])[has_label[:, :-1]].all()  # never across documents
    assert not has_label[:, -1].any() and not has_label[batch.doc_ids < 0].any()
    assert batch.loss_tokens == sum(len(examples[i].target_ids) for i in batch.example_index)


def test_labels_positions_and_documents() -> None:
    examples = [Example([5, 6, 7], [8, 9, 2], task=1), Example([10, 11], [12, 2], task=1)]
    [batch] = pack(examples, seq_len=16, batch_size=4)
    assert batch.input_ids.shape == (1, 10) and batch.n_examples == 2
    first = batch.example_index[0]
    expected = {0: ([5, 6, 7, 8, 9, 2], [-100, -100, 8, 9, 2, -100]), 1: ([10, 11, 12, 2], [-100, 12, 2, -100])}
    ids0, labels0 = expected[first]
    ids1, labels1 = expected[1 - first]
    assert batch.input_ids[0].tolist() == ids0 + ids1
    assert batch.labels[0].tolist() == labels0 + labels1
    assert batch.positions[0].tolist() == list(range(len(ids0))) + list(range(len(ids1)))
    assert batch.doc_ids[0].tolist() == [0] * len(ids0) + [1] * len(ids1)
    assert batch.tasks.tolist() == [1] and batch.loss_tokens == 5 and batch.pad_fraction == 0.0
    check_structure(batch, examples)


@pytest.mark.parametrize("strategy", ["pack", "bucket"])
def test_structure_on_random_batches(strategy: str) -> None:
    examples = synthetic(60, tasks=3)
    batches = pack(examples, 700, 3, seed=1) if strategy == "pack" else bucket(examples, 1500, seed=1)
    for batch in batches:
        check_structure(batch, examples)


def reference_losses(model: torch.nn.Module, examples: list[Example]) -> torch.Tensor:
    """Each example alone, unpacked, with the default causal mask and full logits."""
    losses = []
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids + ex.target_ids])
        logits = model(ids)[0, len(ex.prompt_ids) - 1:-1]
        losses.append(F.cross_entropy(logits, torch.tensor(ex.target_ids)))
    return torch.stack(losses)


@pytest.mark.parametrize("strategy", ["pack", "bucket"])
def test_batched_loss_equals_unpacked(tiny, strategy: str) -> None:
    model, tokenizer = tiny
    examples = encode_examples([p for p, _ in TEXTS], [t for _, t in TEXTS], tokenizer)
    batches = pack(examples, 96, 2) if strategy == "pack" else bucket(examples, 150)
    assert len(batches) > 1 and padding_fraction(batches) > 0  # several batches, with padding
    assert any(b.doc_ids.amax() > 0 for b in batches) == (strategy == "pack")  # packed rows hold several documents
    with torch.no_grad():
        reference = reference_losses(model, examples)
        for batch in batches:
            per_example = lm_loss(model, batch, "per_example")
            torch.testing.assert_close(per_example, reference[batch.example_index], atol=1e-5, rtol=0)
            token_losses = torch.cat([reference[[i]].repeat(len(examples[i].target_ids))
                                      for i in batch.example_index])
            torch.testing.assert_close(lm_loss(model, batch, "sum"), token_losses.sum(), atol=1e-4, rtol=1e-6)
            torch.testing.assert_close(lm_loss(model, batch), token_losses.mean(), atol=1e-5, rtol=0)


def test_padding_stays_finite(tiny) -> None:
    model, _ = tiny
    examples = [Example([3] * 20, [4] * 5 + [2]), Example([5] * 3, [6, 2])]
    [batch] = bucket(examples, 1000)
    assert batch.pad_fraction > 0.3
    with torch.no_grad():
        logits = model(batch.input_ids, positions=batch.positions, attn_mask=batch.documents())
    assert torch.isfinite(logits).all()
    trainable = copy.deepcopy(model).requires_grad_(True)  # the shared fixture stays frozen
    loss = lm_loss(trainable, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in trainable.parameters())


def test_deterministic_and_complete() -> None:
    examples = synthetic(300)
    for make in (lambda **kw: pack(examples, 1024, 4, **kw), lambda **kw: bucket(examples, 4096, **kw)):
        a, b = make(seed=3), make(seed=3)
        assert [x.example_index for x in a] == [x.example_index for x in b]
        assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
        order = lambda batches: [i for x in batches for i in x.example_index]
        for kw in ({"seed": 3}, {"seed": 4}, {"seed": 3, "epoch": 1}):
            assert sorted(order(make(**kw))) == list(range(len(examples)))  # each exactly once
        assert order(make(seed=4)) != order(a) and order(make(seed=3, epoch=1)) != order(a)


def test_padding_fraction_on_realistic_lengths() -> None:
    examples = synthetic(2000)
    packed = padding_fraction(pack(examples, 1024, 8))
    bucketed = padding_fraction(bucket(examples, 8192))
    print(f"padding: pack {packed:.2%}, bucket {bucketed:.2%}")
    assert packed < 0.10 and bucketed < 0.10


def test_by_task_rows_hold_one_task() -> None:
    examples = synthetic(200, tasks=3)
    mixed = pack(examples, 1024, 4)
    assert any(-1 in b.tasks.tolist() for b in mixed)  # default: rows mix tasks
    for batch in pack(examples, 1024, 4, by_task=True):
        docs = batch.document_index()
        for row, task in enumerate(batch.tasks.tolist()):
            row_docs = docs[row][docs[row] >= 0].unique().tolist()
            assert {examples[batch.example_index[d]].task for d in row_docs} == {task}


def test_chat_template_and_eos(tiny) -> None:
    _, tokenizer = tiny
    plain, chat = (encode_examples(["Q: 2+3?"], ["5"], tokenizer, chat_template=c, tasks=[2])[0]
                   for c in (False, True))
    head = tokenizer.encode("<|im_start|>user\n")
    tail = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    assert chat.prompt_ids == head + plain.prompt_ids + tail
    assert plain.target_ids == tokenizer.encode(" 5") + [tokenizer.eos_token_id]  # continues "...?" + " 5"
    assert chat.target_ids == tokenizer.encode("5") + [tokenizer.eos_token_id]  # the answer turn's first line
    assert chat.task == 2


def test_errors(tiny) -> None:
    _, tokenizer = tiny
    examples = synthetic(10)
    long = [Example([3] * 900, [4] * 200 + [2])] * 2
    with pytest.raises(MoaError, match=r"2 of 12 examples are longer than seq_len=1024.*raise seq_len"):
        pack(examples + long, 1024, 4)
    with pytest.raises(MoaError, match="max_tokens_per_batch"):
        bucket(long, 1000)
    with pytest.raises(MoaError, match="empty prompt"):
        encode_examples([""], ["x"], tokenizer)
    with pytest.raises(MoaError, match="2 prompts, 1 targets"):
        encode_examples(["a", "b"], ["x"], tokenizer)


def test_documents_match_the_dense_document_mask(tiny) -> None:
    """Per-document attention over several rows (packed, padded) gives the dense block-diagonal mask's outputs at
    every real token, without building the [B, 1, T, T] mask."""
    model, _ = tiny
    examples = [Example([3 + i] * (5 + 3 * i), [4] * (2 + i) + [2]) for i in range(7)]
    for batch in pack(examples, 40, 3, seed=1) + bucket(examples, 120, seed=1):
        real = batch.doc_ids >= 0
        with torch.no_grad():
            dense = model(batch.input_ids, positions=batch.positions, attn_mask=document_mask(batch.doc_ids))
            sparse = model(batch.input_ids, positions=batch.positions, attn_mask=batch.documents())
        torch.testing.assert_close(sparse[real], dense[real], atol=1e-5, rtol=1e-5)


def test_micro_batches_sum_to_the_batch(tiny) -> None:
    """Split rows (trimmed to their own longest row) keep every document and give the batch's summed loss."""
    model, _ = tiny
    examples = [Example([3 + i] * (5 + 3 * i), [4] * (2 + i) + [2]) for i in range(9)]
    [batch] = pack(examples, 40, 16)
    micro = batch.split(2)
    assert [i for m in micro for i in m.example_index] == batch.example_index
    assert sum(m.loss_tokens for m in micro) == batch.loss_tokens
    assert all(m.input_ids.shape[1] == int((m.doc_ids >= 0).sum(1).max()) for m in micro)
    with torch.no_grad():
        torch.testing.assert_close(sum(lm_loss(model, m, "sum") for m in micro), lm_loss(model, batch, "sum"))


def test_the_chunked_loss_equals_the_whole(tiny, monkeypatch) -> None:
    """In training, the loss over the vocabulary is taken in chunks whose logits are recomputed in backward: the
    same loss and gradients as all logits at once."""
    from moa.data import batching

    examples = [Example([3 + i] * (5 + 3 * i), [4] * (6 + i) + [2]) for i in range(6)]
    [batch] = pack(examples, 200, 4)

    def loss_and_grads(chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(batching, "loss_chunk", lambda vocab: chunk)
        model = copy.deepcopy(tiny[0]).requires_grad_(True)
        loss = lm_loss(model, batch, "sum")
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (whole, grads), (chunked, chunked_grads) = loss_and_grads(10_000), loss_and_grads(7)
    assert batch.loss_tokens > 7
    torch.testing.assert_close(chunked, whole)
    for got, want in zip(chunked_grads, grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
