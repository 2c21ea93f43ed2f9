"""Does a merged model route itself? The proposal asks whether a model "could inherently leverage contextual
information to activate the appropriate parts of merged LoRA modules without explicit routing".

An exact merge (concat, task_arithmetic) is the sum of its task components: every LoRA module adds
sum_i w_i s_i B_i A_i x. For every evaluated sequence and every module, each component's response over a
segment of the sequence is a_i = sum over its tokens of ||w_i s_i B_i A_i x_t|| (LoRALinear.component_norms:
from the rank-r projections, no dense matrix). The segments are the prompt and the generated tokens (for a
scored task: the reference target it is scored on). Normalized to shares, a_i / sum_j a_j says which task's
part of the merge a sequence activates; the implicit routing accuracy is how often the true task's share is
the largest. Over several modules (a layer's, or all of them), responses are summed before the shares.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from moa.config import Config
from moa.data.batching import encode_examples, encode_prompts
from moa.data.tasks import Task
from moa.generate import Generation
from moa.lora import attach_experts, lora_layers
from moa.model import DTYPES
from moa.model.llama import Documents, Transformer
from moa.model.prepared import base_model, device

ROW_TOKENS = 4096  # tokens packed into one measured row
ALL = "all"  # the `module` of a layer's modules pooled
EVERY_LAYER = -1  # the `layer` of every layer pooled


class Segment(StrEnum):
    PROMPT = "prompt"
    GENERATED = "generated"  # for a scored task: the reference target


def split_name(module: str) -> tuple[int, str]:
    """"model.layers.3.self_attn.q_proj" -> (3, "q_proj")."""
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1]), parts[-1]


@contextmanager
def recorded_norms(model: Transformer, weights: Tensor) -> Iterator[dict[str, Tensor]]:
    """While the model runs, each LoRA module's per-token component norms [T, N] of its last forward."""
    records: dict[str, Tensor] = {}

    def hook(name: str, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        records[name] = module.component_norms(args[0], weights)

    handles = [layer.register_forward_hook(partial(hook, name)) for name, layer in lora_layers(model).items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _rows(lengths: Sequence[int]) -> Iterator[list[int]]:
    """Sequences packed into rows of about ROW_TOKENS tokens (a longer one makes a row alone)."""
    row, tokens = [], 0
    for i, n in enumerate(lengths):
        if row and tokens + n > ROW_TOKENS:
            yield row
            row, tokens = [], 0
        row.append(i)
        tokens += n
    if row:
        yield row


@torch.inference_mode()
def component_responses(model: Transformer, weights: Sequence[float],
                        sequences: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
    """a_i of every sequence (prompt, continuation), module (in lora_layers order) and segment:
    [sequences, modules, 2, N]. The model holds the merge's components as experts 0..N-1, unfolded."""
    device = model.lm_head.weight.device
    mix = torch.tensor(list(weights), dtype=torch.float32, device=device)
    out = np.zeros((len(sequences), len(lora_layers(model)), len(Segment), len(weights)))
    lengths = [len(p) + len(c) for p, c in sequences]
    for row in _rows(lengths):
        ids = torch.tensor([[t for i in row for t in sequences[i][0] + sequences[i][1]]], device=device)
        positions = torch.cat([torch.arange(lengths[i], device=device) for i in row])[None]
        with recorded_norms(model, mix) as records:
            model(ids, positions=positions, attn_mask=Documents(tuple(lengths[i] for i in row)), logits_at=slice(0, 0))
        norms = torch.stack(list(records.values())).float().cpu().numpy()  # [modules, T, N]
        start = 0
        for i in row:
            prompt, end = start + len(sequences[i][0]), start + lengths[i]
            out[i, :, 0] = norms[:, start:prompt].sum(1)
            out[i, :, 1] = norms[:, prompt:end].sum(1)
            start = end
    return out


def implicit_routing(config: Config, adapters: Sequence[Path], weights: Sequence[float], tasks: Sequence[Task],
                     frames: Mapping[str, pd.DataFrame],
                     generated: Mapping[str, Sequence[Generation]]) -> dict[str, pd.DataFrame]:
    """An exact merge's component responses on every evaluated sequence, per task: the merge's task `adapters` as
    experts of an unfolded copy of the base model, `weights` as merged. A task in `generated` is measured on its
    prompts and generated tokens, any other (scored) on its prompts and reference targets."""
    model, tokenizer = base_model(config)
    attach_experts(model, list(adapters))
    model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval()
    chat, tables = config["data"]["chat_template"], {}
    for task in tasks:
        frame = frames[task.name]
        if task.name in generated:
            prompts = encode_prompts(frame.prompt.tolist(), tokenizer, chat)
            sequences = [(p, g.tokens) for p, g in zip(prompts, generated[task.name])]
        else:
            examples = encode_examples(frame.prompt.tolist(), frame.target.tolist(), tokenizer, chat)
            sequences = [(e.prompt_ids, e.target_ids) for e in examples]
        responses = component_responses(model, weights, sequences)
        tables[task.name] = responses_table(frame["id"].tolist(), list(lora_layers(model)), responses)
    return tables


def responses_table(ids: Sequence[str], modules: Sequence[str], responses: np.ndarray) -> pd.DataFrame:
    """eval/{method}/{task}/implicit_routing.parquet: id, layer, module, segment and `response`, the N a_i
    in expert order."""
    rows = [{"id": ident, "layer": layer, "module": kind, "segment": str(segment), "response": responses[s, m, g]}
            for s, ident in enumerate(ids) for m, (layer, kind) in enumerate(map(split_name, modules))
            for g, segment in enumerate(Segment)]
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, method: str, task: str, experts: Sequence[str]) -> pd.DataFrame:
    """report/implicit_routing.parquet's rows of one evaluation: per segment, for every layer x module, every
    layer's modules together (module "all") and all of them (layer -1): the mean share of the true task's
    component over the sequences (share_true), how often it is the largest (accuracy), the task with the
    largest mean share (top_task) and the number of sequences (n)."""
    truth = list(experts).index(task)
    layers, kinds = sorted(table["layer"].unique()), list(dict.fromkeys(table["module"]))
    ordered = table.assign(layer=pd.Categorical(table["layer"], layers), module=pd.Categorical(table["module"], kinds),
                           segment=pd.Categorical(table["segment"], list(map(str, Segment))))
    ordered = ordered.sort_values(["id", "layer", "module", "segment"])
    r = np.stack(ordered["response"].to_numpy()).reshape(-1, len(layers), len(kinds), len(Segment), len(experts))
    pooled = [((layer, kind), r[:, i, j]) for i, layer in enumerate(layers) for j, kind in enumerate(kinds)]
    pooled += [((layer, ALL), r[:, i].sum(1)) for i, layer in enumerate(layers)]
    pooled.append(((EVERY_LAYER, ALL), r.sum((1, 2))))
    rows = []
    for (layer, kind), values in pooled:  # values [sequences, segments, N]
        total = values.sum(-1, keepdims=True)
        shares = np.divide(values, total, out=np.zeros_like(values), where=total > 0)
        for g, segment in enumerate(Segment):
            rows.append({"method": method, "task": task, "layer": int(layer), "module": kind, "segment": str(segment),
                         "share_true": float(shares[:, g, truth].mean()),
                         "accuracy": float((shares[:, g].argmax(-1) == truth).mean()),
                         "top_task": experts[int(shares[:, g].mean(0).argmax())], "n": len(values)})
    return pd.DataFrame(rows)
