"""Batched greedy decoding with a KV cache over ragged (left-padded) prompts."""

from __future__ import annotations

import torch
from torch import Tensor

from moa.model.llama import KVCache, Transformer, padding_mask


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """ids [B, P] and valid [B, P] (False on padding) with every prompt flush right."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return ids, valid


@torch.inference_mode()
def greedy(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
           pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Greedy continuation of each prompt, up to and excluding the first stop token."""
    device = model.lm_head.weight.device
    ids, valid = left_pad(prompts, pad_id)
    ids, valid = ids.to(device), valid.to(device)
    ragged = not bool(valid.all())
    B, P = ids.shape
    cache = KVCache(model.config, B, P + max_new_tokens, device, model.lm_head.weight.dtype) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    step_ids = ids
    for _ in range(max_new_tokens):
        S = valid.shape[1]
        q_len = step_ids.shape[1]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, S - q_len:]
        mask = padding_mask(valid, q_len) if ragged else None
        logits = model(step_ids, positions=positions, attn_mask=mask, cache=cache, logits_at=slice(-1, None))
        token = logits[:, -1].argmax(-1).masked_fill(done, pad_id)  # [B]
        new.append(token)
        done |= torch.isin(token, torch.tensor(sorted(stop_ids), device=device))
        if bool(done.all()):
            break
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_ids = token[:, None] if use_cache else ids
    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    return [_until_stop(row, stop_ids) for row in out]


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
