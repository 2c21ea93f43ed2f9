"""The LLaMA family (LLaMA 2/3, Mistral, Qwen2, SmolLM2) in one readable PyTorch file.

Module and parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so
HF checkpoints load without renaming and PEFT adapter keys map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moa.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 like the reference implementation, then cast back before the gain.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies of rotate-half RoPE, with LLaMA-3 long-context scaling when configured.

    Always computed on the CPU, also inside a meta-device context (empty_model): the real values are
    needed, and meta arithmetic would import torch._dynamo."""
    dim = config.dim_per_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, T, D] in `dtype`, the angles computed in float32 as transformers does (in bf16 an
    angle at position p would be off by up to p * 2^-9 rad); an elementwise product is not autocast."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, D]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass(frozen=True)
class Documents:
    """Documents packed back to back in the rows of [B, T], in row-major order, none crossing a row (so the
    lengths of each row's documents sum to T): each attends only to itself, causally, so no FLOP is spent
    across documents and no [B, 1, T, T] mask is built (SDPA keeps its flash kernels on GPU)."""

    lengths: tuple[int, ...]


def attend_per_document(q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int]) -> Tensor:
    """Causal attention within each document: q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, H, T, D], the documents'
    `lengths` row-major over the B rows. Rows that are one document each take a single causal call."""
    gqa = q.shape[1] != k.shape[1]
    B, T = q.shape[0], q.shape[2]
    if len(lengths) == B:  # one document per row (e.g. a padded row whose padding is its document's tail)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    rows, start = [[] for _ in range(B)], 0
    for n in lengths:
        b, s = divmod(start, T)
        rows[b].append(F.scaled_dot_product_attention(q[b:b + 1, :, s:s + n], k[b:b + 1, :, s:s + n],
                                                      v[b:b + 1, :, s:s + n], is_causal=True, enable_gqa=gqa))
        start += n
    return torch.cat([torch.cat(row, dim=2) for row in rows])


@dataclass(frozen=True)
class _Prefill:
    lengths: tuple[int, ...]  # new tokens of each document packed into the row, in order
    slots: tuple[int, ...]  # the slot of each document
    starts: tuple[int, ...]  # each document's first new position: those before it are its shared prefix
    sources: tuple[int, ...]  # the slot whose first `start` positions hold that prefix
    slot_of: Tensor  # [T]: the slot of each token
    positions: Tensor  # [T]: each token's position in its sequence
    masks: tuple[Tensor | None, ...]  # [length, start + length] causal masks of the documents with a prefix


@dataclass(frozen=True)
class _Decode:
    n: int  # one token for each of the first n slots
    bias: Tensor  # [n, 1, 1, max_len] float32: 0 at the cached positions each slot's token attends to, -inf elsewhere


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
    """One query per sequence over its cached keys: q [n, H, 1, D], keys/values [n, Hkv, S, D] (contiguous),
    bias [n, 1, 1, S] -> [n, H, 1, D]. Query heads are grouped onto their key/value head (GQA) as plain batched
    matmuls, with the softmax in float32: on CPU this beats scaled_dot_product_attention's masked kernels
    for one query (several times over in bfloat16), and contiguous keys spare the copy a sliced cache costs."""
    n, heads, _, dim = q.shape
    grouped = q.view(n, keys.shape[1], heads // keys.shape[1], dim)  # query head h reads key head h // G
    scores = (grouped @ keys.transpose(-1, -2)).float().mul_(dim ** -0.5).add_(bias)  # [n, Hkv, G, S]
    return (scores.softmax(-1).to(values.dtype) @ values).view(n, heads, 1, dim)


class SlotCache:
    """Keys and values of up to `slots` sequences for continuous batching: each slot holds one sequence at
    its own length, so a finished sequence's slot is refilled while the others keep decoding.

    Before each forward the engine plans it: `prefill(slots, lengths)` for documents packed into one row
    (each written into its slot from position 0, or after a prefix it shares with another slot's sequence,
    which is then read from that slot instead of computed again), or `decode(n)` for one new token of each
    of the first n slots; the forward then calls `attend` in every layer and `advance` at the end. The slots
    in use are kept at the front: `move` fills a finished sequence's slot with the last one. A decode step
    attends over all `max_len` positions of its slots (masked), which keeps the keys contiguous; `truncate`
    shortens the cache when the sequences still to come are shorter."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, passes: int = 1) -> None:
        """`passes`: forward passes per step that keep keys and values (X-LoRA's scaling pass is a second one,
        in cache layers L..2L-1, see pass_view)."""
        self.n_layers = config.num_hidden_layers
        shape = (passes * self.n_layers, slots, config.num_key_value_heads, max_len, config.dim_per_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self._plan: _Prefill | _Decode | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def prefill(self, slots: Sequence[int], lengths: Sequence[int], starts: Sequence[int] | None = None,
                sources: Sequence[int] | None = None) -> Tensor:
        """Plan a packed prefill of documents of `lengths` new tokens into `slots`; document d starts at
        position starts[d] (default 0), after the prefix held by slot sources[d]: a slot whose sequence has
        it (its own tokens are written before any layer reads them, so that may be a document of this
        prefill that starts at 0). Returns the new tokens' positions [1, T]."""
        device = self.lengths.device
        starts = tuple(starts or [0] * len(lengths))
        sources = tuple(slots if sources is None else sources)
        positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)])
        slot_of = torch.repeat_interleave(torch.tensor(slots, device=device), torch.tensor(lengths, device=device))
        masks = tuple(torch.ones(n, s + n, dtype=torch.bool, device=device).tril(s) if s else None
                      for s, n in zip(starts, lengths))
        self._plan = _Prefill(tuple(lengths), tuple(slots), starts, sources, slot_of, positions, masks)
        return positions[None]

    def decode(self, n: int) -> Tensor:
        """Plan one token for each of the first n slots; returns their positions [n, 1]."""
        positions = self.lengths[:n]
        visible = torch.arange(self.max_len, device=positions.device) <= positions[:, None]  # [n, max_len]
        bias = torch.zeros(visible.shape, device=positions.device).masked_fill_(~visible, float("-inf"))
        self._plan = _Decode(n, bias[:, None, None, :])
        return positions[:, None].clone()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this forward's keys and values, then attend: within each document and its prefix (prefill),
        or over each slot's sequence so far (decode)."""
        plan = self._plan
        if isinstance(plan, _Prefill):
            self.k[layer, plan.slot_of, :, plan.positions] = k[0].transpose(0, 1)  # [T, Hkv, D]
            self.v[layer, plan.slot_of, :, plan.positions] = v[0].transpose(0, 1)
            if not any(plan.starts):
                return attend_per_document(q, k, v, plan.lengths)
            return self._attend_after_prefixes(layer, q, k, v, plan)
        if isinstance(plan, _Decode):
            rows, positions = torch.arange(plan.n, device=q.device), self.lengths[:plan.n]
            self.k[layer, rows, :, positions] = k[:, :, 0]
            self.v[layer, rows, :, positions] = v[:, :, 0]
            return decode_attention(q, self.k[layer, :plan.n], self.v[layer, :plan.n], plan.bias)
        raise RuntimeError("SlotCache: plan a prefill or a decode step before the forward")

    def _attend_after_prefixes(self, layer: int, q: Tensor, k: Tensor, v: Tensor, plan: _Prefill) -> Tensor:
        """Per document: causal within it, and over its prefix, copied from its source slot."""
        gqa, out = q.shape[1] != k.shape[1], []
        for qd, kd, vd, slot, start, source, mask in zip(q.split(plan.lengths, 2), k.split(plan.lengths, 2),
                                                         v.split(plan.lengths, 2), plan.slots, plan.starts,
                                                         plan.sources, plan.masks):
            if mask is None:
                out.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa))
                continue
            if source != slot:
                self.k[layer, slot, :, :start] = self.k[layer, source, :, :start]
                self.v[layer, slot, :, :start] = self.v[layer, source, :, :start]
            end = start + qd.shape[2]
            keys, values = self.k[layer, slot, None, :, :end], self.v[layer, slot, None, :, :end]
            out.append(F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask, enable_gqa=gqa))
        return torch.cat(out, dim=2)

    def pass_view(self, index: int) -> _PassView:
        """The cache as pass `index` of each step sees it: its own keys and values, the same plan."""
        return _PassView(self, index * self.n_layers)

    def advance(self) -> None:
        """After the forward: the planned tokens are part of their slots' sequences."""
        plan = self._plan
        if isinstance(plan, _Prefill):
            ends = [s + n for s, n in zip(plan.starts, plan.lengths)]
            self.lengths[list(plan.slots)] = torch.tensor(ends, device=self.lengths.device)
        elif isinstance(plan, _Decode):
            self.lengths[:plan.n] += 1
        self._plan = None

    def move(self, source: int, target: int) -> None:
        """Put slot `source`'s sequence into slot `target` (whose sequence is done)."""
        n = int(self.lengths[source])
        self.k[:, target, :, :n] = self.k[:, source, :, :n]
        self.v[:, target, :, :n] = self.v[:, source, :, :n]
        self.lengths[target] = n

    def truncate(self, max_len: int) -> None:
        """Keep only the first `max_len` positions of every slot (the caller's sequences in flight all fit).
        Keys first, then values: the old keys are freed before the new values are allocated."""
        self.k = self.k[..., :max_len, :].clone()
        self.v = self.v[..., :max_len, :].clone()


@dataclass(frozen=True)
class _PassView:
    """A SlotCache for another pass of the same step: layer i attends in cache layer offset + i; the step's main
    forward advances the cache."""

    cache: SlotCache
    offset: int

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.cache.attend(self.offset + layer, q, k, v)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.dim_per_head
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | Documents | None,
                cache: SlotCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v)
        elif isinstance(attn_mask, Documents):
            y = attend_per_document(q, k, v, attn_mask.lengths)
        else:  # without a mask, plain causal attention (queries and keys start together)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | Documents | None,
                cache: SlotCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Everything under HF's `model.` prefix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Weights come from a checkpoint or random_model's own init. Passing them skips nn.Embedding's
        # normal_ init, whose first call imports torch._dynamo (~1 s in every process that loads a model).
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False  # training: recompute each block in backward (see block_input)
        # Called with the embeddings before the blocks run (x, cos, sin, attn_mask, cache): X-LoRA's scaling pass,
        # which sets every LoRA layer's per-token expert weights (moa.gates); cache_passes: the passes per step
        # that keep keys and values in a SlotCache.
        self.before_blocks: Callable[..., None] | None = None
        self.cache_passes = 1
        self.tie_weights()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Transformer:
        """Cast and move as nn.Module does, but `inv_freq` only moves: it stays float32 whatever the
        weights' dtype (model.to(bfloat16)), as in transformers."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                attn_mask: Tensor | Documents | None = None, cache: SlotCache | None = None,
                logits_at: Tensor | slice | None = None) -> Tensor:
        """Next-token logits.

        input_ids [B, T]; positions [B, T] (default: 0..T-1); attn_mask `Documents` for packed rows, or a bool
        mask broadcastable to [B, 1, T, T], True = attend (default: causal); cache: a SlotCache
        with a planned prefill or decode step (its plan gives the positions); logits_at selects where the
        LM head runs: a bool mask [B, T] -> [N, V], or a slice of T -> [B, T', V].
        """
        x = self.block_input(input_ids, positions, attn_mask, len(self.model.layers), cache)
        if cache is not None:
            cache.advance()
        if logits_at is not None:
            x = x[logits_at] if isinstance(logits_at, Tensor) else x[:, logits_at]
        return self.lm_head(self.model.norm(x))

    def block_input(self, input_ids: Tensor, positions: Tensor | None = None,
                    attn_mask: Tensor | Documents | None = None, layer: int = 0,
                    cache: SlotCache | None = None) -> Tensor:
        """The hidden states [B, T, H] that enter block `layer` (0: the embeddings; the number of layers:
        the final norm's input)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        if self.before_blocks is not None:
            self.before_blocks(x, cos, sin, attn_mask, cache)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.model.layers[:layer]:
            if recompute:  # keep only each block's input; backward recomputes the block (dropout masks included)
                x = checkpoint(block, x, cos, sin, attn_mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache)
        return x


def causal_mask(q_len: int, k_len: int, device: torch.device | str = "cpu") -> Tensor:
    """[1, 1, q_len, k_len]: query i (the last q_len of k_len positions) sees keys up to itself."""
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return (torch.arange(k_len, device=device)[None, :] <= q)[None, None]


def document_mask(doc_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask for packed sequences: doc_ids [B, T] -> [B, 1, T, T]."""
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return same_doc[:, None] & causal_mask(doc_ids.shape[1], doc_ids.shape[1], doc_ids.device)
