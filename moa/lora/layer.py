"""A linear layer with N LoRA experts and several ways to apply them in one forward pass.

Expert i: A_i [r_i, in], B_i [out, r_i], scaling s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA);
y = W0 x + b + s_i B_i A_i dropout(x). The `active` attribute says which experts apply, and how:

- ``None``: base layer only;
- ``int`` i: expert i (the fast path, the same arithmetic as PEFT);
- integer tensor [B]: expert index per sequence (a mixed-task batch in one pass), or [B, T] per token
  (several documents packed into one row);
- float tensor [N], [B, N] or [B, T, N]: weighted sum of all experts' outputs (global, per sequence or per token:
  the learned token gates of moa.gates);
- ``Arrow(top_k, temperature)``: Arrow routing (Ostapenko et al. 2024, PEFT's ArrowConfig), training-free and
  per token: each token takes the top-k experts by |x . p_i|, where the prototype p_i is the top right singular
  vector of B_i A_i, weighted by a softmax of those scores over the temperature.

The LoRA path runs in the factors' dtype (fp32 factors train on bf16 weights without autocast, as in PEFT) and
its update is added to W0 x in that dtype, then rounded once to W0 x's dtype; under autocast, autocast picks the
matmuls' dtype. Dropout in training regenerates its mask in backward from the RNG state it was drawn from, so a
layer saves only x (q, k and v share theirs), not a dropped copy and a mask (see _DroppedDown).

A delta can also be folded into W0 (``fold``, summed in fp32), after which forward is a plain linear until
``unfold``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.errors import MoaError


@dataclass(frozen=True)
class Arrow:
    """Arrow routing as the active experts: every token in every layer is served by the `top_k` experts its input
    is most aligned with, weighted by softmax(|x . p_i| / temperature) over them (see LoRALinear.prototypes)."""

    top_k: int = 3  # PEFT's ArrowConfig defaults
    temperature: float = 1.0


Active = int | Tensor | Arrow | None  # see the module docstring


@dataclass(frozen=True)
class ExpertSpec:
    """Rank, alpha and scaling rule of one LoRA expert."""

    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Module):
    """nn.Linear plus LoRA experts; keeps ``weight``/``bias`` so base checkpoints load unchanged."""

    def __init__(self, base: nn.Linear, experts: Sequence[ExpertSpec] = (), dropout: float = 0.0) -> None:
        """Wrap ``base``, reusing its weight and bias Parameters (no copy, so ties survive), frozen."""
        super().__init__()
        if not 0 <= dropout < 1:
            raise MoaError(f"LoRA dropout {dropout} must be in [0, 1); fix lora.dropout in the config")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.specs: list[ExpertSpec] = []
        self.dropout = dropout  # the probability, as nn.Dropout(dropout) in training
        self._active: Active = None
        self._folded: Tensor | None = None  # expert weights [N] of the delta folded into W0
        self._cache: dict[str, tuple[tuple, tuple[Tensor, ...]]] = {}
        for spec in experts:
            self.add_expert(spec)

    @property
    def n_experts(self) -> int:
        return len(self.specs)

    @property
    def folded(self) -> bool:
        return self._folded is not None

    def add_expert(self, spec: ExpertSpec) -> int:
        """Append an expert initialised like PEFT (A kaiming-uniform, B zero); returns its index.

        The first expert becomes active, as PEFT activates its first adapter."""
        self._check_not_folded("add an expert")
        if spec.rank < 1:
            raise MoaError(f"LoRA rank must be >= 1, got {spec.rank}; fix lora.rank in the config")
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        a = torch.empty(spec.rank, self.in_features, **kw)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, spec.rank, **kw)))
        self.specs.append(spec)
        if self.n_experts == 1 and self._active is None:
            self._active = 0
        return self.n_experts - 1

    # -- the active experts ----------------------------------------------------------------------

    @property
    def active(self) -> Active:
        return self._active

    @active.setter
    def active(self, active: Active | Sequence[float]) -> None:
        self._active = check_active(active, self.n_experts)
        self._cache.pop("selected", None)  # the active experts' factors are gathered once per choice

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        active = self._active
        if active is None or self._folded is not None:
            return y
        if isinstance(active, Tensor) and active.device != x.device:
            self.active = active = active.to(x.device)  # move once, not in every forward
        dtype = self._lora_dtype(x)
        if isinstance(active, Arrow):
            return _add(y, self._arrow(x.to(dtype), active))
        if isinstance(active, int):
            # One expert for every row: [1, M, in] @ [1, in, r] @ [1, r, out]. On CPU bmm beats F.linear for
            # these thin shapes, and baddbmm adds the update to y in the same call.
            a, b = self._selected(active)
            h = self._down(x.reshape(1, -1, x.shape[-1]), a, dtype)
            return torch.baddbmm(y.view(1, -1, y.shape[-1]).to(h.dtype), h, b).view(y.shape).to(y.dtype)
        # Several experts (weights, or one expert per row or per token): all experts' A at once, each rank
        # column scaled by its expert's weight (0 for the experts not chosen), then all B at once. Routes
        # that change at every step (continuous batching) then cost no gathering of factors.
        a, b, _, _ = self._concat()
        return _add(y, F.linear(self._down(x, a.T, dtype) * self._column_weights(active, x, dtype), b))

    def _lora_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype x enters the LoRA path in: the factors' (PEFT's rule), or x's own under autocast, which
        casts the matmuls anyway (a cast copy would be saved for backward in every layer)."""
        return x.dtype if torch.is_autocast_enabled(x.device.type) else self.lora_A[0].dtype

    def _down(self, x: Tensor, a_t: Tensor, dtype: torch.dtype) -> Tensor:
        """dropout(x) in `dtype` @ a_t (x [.., in], a_t [in, r] or [1, in, r]); dropout through _DroppedDown."""
        if self.training and self.dropout > 0:
            return _DroppedDown.apply(x, a_t, self.dropout, dtype)
        return torch.matmul(x.to(dtype), a_t)

    def _arrow(self, x: Tensor, arrow: Arrow) -> Tensor:
        """Arrow's update, as PEFT computes it: scores |x . p_i| (x not normalized), the top-k kept and
        softmax(score / T) over them, the others 0; through the masked-concat path with these per-token
        weights, and dropout on the update."""
        scores = F.linear(x, self.prototypes()).abs()  # [.., N]
        kept = scores.topk(arrow.top_k, dim=-1)
        logits = torch.full_like(scores, -math.inf).scatter(-1, kept.indices, kept.values)
        weights = torch.softmax(logits / arrow.temperature, dim=-1)  # [.., N], one row per token
        a, b, _, _ = self._concat()
        update = F.linear(F.linear(x, a) * self._column_weights(weights, x, x.dtype), b)
        return F.dropout(update, self.dropout, self.training)

    def prototypes(self) -> Tensor:
        """Each expert's Arrow prototype [N, in]: the top right singular vector of its B A (unit norm, sign
        arbitrary; zero where the expert's update is zero), exact and without the dense out x in matrix: with
        B = Q R (R [r, r]), B A = Q (R A) has the right singular vectors of the small R A [r, in]."""
        def build() -> tuple[Tensor, ...]:
            a, b = (t.detach().double() for t in self._stacked())  # [N, r, in], [N, out, r] (zero-padded ranks)
            _, s, vh = torch.linalg.svd(torch.linalg.qr(b).R @ a, full_matrices=False)
            return (torch.where(s[:, :1] > 0, vh[:, 0], 0.0).to(self.lora_A[0].dtype),)

        return self._cached("prototypes", build)[0]

    def _selected(self, active: int) -> tuple[Tensor, Tensor]:
        """A^T [1, in, r] and (s B)^T [1, r, out] of the active expert."""
        def build() -> tuple[Tensor, ...]:
            a, b = self._stacked()
            return a[active:active + 1].transpose(1, 2).contiguous(), b[active:active + 1].transpose(1, 2).contiguous()

        return self._cached("selected", build)

    def _column_weights(self, active: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Each concatenated rank column's weight in `dtype`, broadcastable to x up to [.., R]: the expert weights
        [N] / [B, N] (or per token [B, T, N], Arrow's) times the scalings, or the scaling where an expert index
        [B] / [B, T] names the column's expert and 0 elsewhere."""
        _, _, scale, owner = self._concat()
        per_row = active.dim() > (1 if active.is_floating_point() else 0)
        if per_row and active.shape[0] != x.shape[0]:
            raise MoaError(f"per-row experts for {active.shape[0]} rows, but the batch has {x.shape[0]} rows")
        # Expert weights spread to their rank columns by a matmul, not a gather: a gate's per-token weights train
        # through it, and a gather's backward (an accumulating scatter) is several times slower on CPU.
        if active.is_floating_point():
            col = active.to(scale.dtype) @ self._spread()
        else:
            col = (active[..., None] == owner) * scale
        if per_row and col.dim() == 2:
            col = col.view(col.shape[0], *([1] * (x.dim() - 2)), col.shape[1])  # [B, 1.., R]
        return col.to(dtype)

    def component_norms(self, x: Tensor, weights: Tensor) -> Tensor:
        """The norm of each expert's weighted update of every token, ||w_i s_i B_i A_i x_t||: x [.., in] ->
        [T, N], from the rank-r projections A_i x_t and the r x r Gram matrices of w_i s_i B_i (no dense
        out x in matrix)."""
        a, b, scale, owner = self._concat()
        h = x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.T  # [T, R]
        scaled = b * (weights.to(scale)[owner] * scale)  # [out, R]
        gram = (scaled.T @ scaled) * (owner[:, None] == owner[None, :])  # [R, R]: one block per expert
        squares = h.new_zeros(h.shape[0], self.n_experts).index_add_(1, owner, (h @ gram) * h)
        return squares.clamp(min=0).sqrt()

    # -- stacked / concatenated factors, cached while no gradient is needed -------------------------

    def _stacked(self) -> tuple[Tensor, Tensor]:
        def build() -> tuple[Tensor, ...]:
            r_max = max(s.rank for s in self.specs)
            a = torch.stack([F.pad(p, (0, 0, 0, r_max - p.shape[0])) for p in self.lora_A])
            b = torch.stack([F.pad(p * s.scaling, (0, r_max - p.shape[1])) for p, s in zip(self.lora_B, self.specs)])
            return a, b

        return self._cached("stacked", build)

    def _concat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All experts' A [R, in] and B [out, R] side by side (R = sum of ranks), each rank column's scaling
        [R] and the expert it belongs to [R]."""
        def build() -> tuple[Tensor, ...]:
            dev, ranks = self.weight.device, torch.tensor([s.rank for s in self.specs], device=self.weight.device)
            scale = torch.tensor([s.scaling for s in self.specs], device=dev, dtype=self.lora_A[0].dtype)
            owner = torch.repeat_interleave(torch.arange(len(self.specs), device=dev), ranks)
            return torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B), dim=1), scale[owner], owner

        return self._cached("concat", build)

    def _spread(self) -> Tensor:
        """[N, R]: expert i's scaling in its rank columns, 0 elsewhere (expert weights @ it = column weights)."""
        def build() -> tuple[Tensor, ...]:
            _, _, scale, owner = self._concat()
            return (F.one_hot(owner, self.n_experts).T.to(scale.dtype) * scale,)

        return self._cached("spread", build)[0]

    def _cached(self, name: str, build: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        params = (*self.lora_A, *self.lora_B)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()  # training: the factors must be part of this step's autograd graph
        # The key changes on any in-place update (optimizer step, copy_ under no_grad) or move.
        key = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._cache[name] = (key, build())
        return hit[1]

    # -- folding -----------------------------------------------------------------------------------

    def delta(self, weights: Tensor) -> Tensor:
        """Dense update sum_i w_i s_i B_i A_i [out, in] for expert weights [N]."""
        a, b, scale, owner = self._concat()
        return (b * (weights.to(scale)[owner] * scale)) @ a

    @torch.no_grad()
    def fold(self, experts: int | Tensor | Sequence[float]) -> None:
        """Add one expert's (int) or a weighted combination's ([N]) delta into W0.

        Until ``unfold`` the forward is a plain linear whatever is active, and the factors are locked."""
        self._check_not_folded("fold again")
        weights = _expert_weights(check_active(experts, self.n_experts), self.n_experts, self.weight.device)
        self._add_to_weight(self.delta(weights))
        self._folded = weights

    @torch.no_grad()
    def unfold(self) -> None:
        """Subtract the folded delta again (exact up to float rounding)."""
        if self._folded is not None:
            self._add_to_weight(-self.delta(self._folded))
            self._folded = None

    def _add_to_weight(self, delta: Tensor) -> None:
        """W0 += delta, summed in fp32 and rounded once to W0's dtype (a bf16 W0 would round the delta first)."""
        self.weight.copy_(self.weight.float() + delta.float())

    def _check_not_folded(self, action: str) -> None:
        if self._folded is not None:
            raise MoaError(f"cannot {action} on a layer with a folded LoRA delta; unfold it first")

    def extra_repr(self) -> str:
        ranks = [s.rank for s in self.specs]
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, ranks={ranks}"


def _add(y: Tensor, update: Tensor) -> Tensor:
    """y + update in the update's dtype, rounded once to y's (PEFT's order for fp32 factors on bf16 weights)."""
    return (y.to(update.dtype) + update).to(y.dtype)


def _keep_mask(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """nn.Dropout's mask for x, from `generator` (None: the default one): True with probability 1 - p."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p, generator=generator)


def _drop(t: Tensor, keep: Tensor, p: float) -> Tensor:
    """t where kept, scaled by 1 / (1 - p), else 0: dropout's forward, and its backward on a gradient."""
    return torch.where(keep, t, 0).mul_(1 / (1 - p))  # where: t * keep would copy the mask to t's dtype


def _rng_state(device: torch.device) -> Tensor:
    """The state of the default generator of `device` (the CPU's or an accelerator's)."""
    return torch.get_rng_state() if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)


class _DroppedDown(torch.autograd.Function):
    """h = dropout(x) @ a_t, x [.., in] cast to `dtype`, a_t [in, r] or [1, in, r]; dropout as nn.Dropout's (keep
    with probability 1 - p, scale 1 / (1 - p)), its mask drawn from x's device's default generator, so
    torch.manual_seed reproduces it and torch.utils.checkpoint's recomputation (which restores that state)
    draws it again.

    Saved for backward: x itself, which q, k and v share, and the generator's state before the draw; backward
    draws the mask again from a copy of that state. nn.Dropout instead saves a dropped copy of x and its mask
    in every layer."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, a_t: Tensor, p: float,
                dtype: torch.dtype) -> Tensor:
        ctx.rng, ctx.p = _rng_state(x.device), p
        ctx.save_for_backward(x, a_t)
        return torch.matmul(_drop(x, _keep_mask(x, p, None), p).to(dtype), a_t)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        # Backward runs without autocast: each product in the forward's dtype, which is grad's
        x, a_t = ctx.saved_tensors
        generator = torch.Generator(x.device)
        generator.set_state(ctx.rng)
        keep = _keep_mask(x, ctx.p, generator)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = _drop((grad @ a_t.to(grad.dtype).transpose(-1, -2)).to(x.dtype), keep, ctx.p)
        if ctx.needs_input_grad[1]:
            dropped = _drop(x, keep, ctx.p).to(grad.dtype).reshape(-1, x.shape[-1])
            grad_a = (dropped.T @ grad.reshape(-1, grad.shape[-1])).view(a_t.shape).to(a_t.dtype)
        return grad_x, grad_a, None, None


def check_active(active: Active | Sequence[float], n_experts: int) -> Active:
    """Validate a choice of experts for ``n_experts`` experts (shape and dtype only: no device sync)."""
    if active is None:
        return None
    if isinstance(active, Arrow):
        if isinstance(active.top_k, bool) or not isinstance(active.top_k, int) or not 1 <= active.top_k <= n_experts:
            raise MoaError(f"Arrow top_k={active.top_k!r} is out of range: the model has {n_experts} LoRA experts; "
                           f"choose 1..{n_experts}")
        if not active.temperature > 0:
            raise MoaError(f"Arrow temperature={active.temperature!r} must be > 0; e.g. 1.0 (PEFT's default)")
        return active
    if isinstance(active, int) and not isinstance(active, bool):
        if not 0 <= active < n_experts:
            raise MoaError(f"expert {active} out of range: the model has {n_experts} LoRA experts")
        return active
    active = active if isinstance(active, Tensor) else torch.tensor(active, dtype=torch.float32)
    if active.is_floating_point() and active.dim() in (1, 2, 3) and active.shape[-1] == n_experts:
        return active
    if active.dtype in (torch.int64, torch.int32) and active.dim() in (1, 2):
        return active.long()
    raise MoaError(
        f"the active experts must be an expert index, indices [B] or [B, T] (int) or weights [N]/[B, N]/[B, T, N] "
        f"(float) with N={n_experts}, or Arrow(top_k, temperature); got {active.dtype} {list(active.shape)}"
    )


def _expert_weights(active: Active, n_experts: int, device: torch.device) -> Tensor:
    if isinstance(active, int):
        return F.one_hot(torch.tensor(active, device=device), n_experts).float()
    if not isinstance(active, Tensor) or not active.is_floating_point() or active.dim() != 1:
        raise MoaError("fold needs one expert index or expert weights [N]; per-sequence experts and Arrow's "
                       "per-token routing cannot be folded")
    return active.to(device)
