"""Merge PEFT-format LoRA adapters into one adapter; pure functions over states.

Adapter i on a module has A_i [r_i, in], B_i [out, r_i] and scaling s_i, so dW_i = s_i B_i A_i; the
target of every method is the weighted sum dW = sum_i w_i dW_i. With Bcat = cat_i(B_i) [out, R] and
Acat = cat_i(w_i s_i A_i) [R, in] (R = sum_i r_i), dW = Bcat Acat exactly.

- concat / task_arithmetic store (Bcat, Acat) with scaling 1: exact, rank R. They differ only in the
  default weights (1 vs 1/N).
- linear / avg sum the factors, A = sum w_i A_i and B = sum w_i B_i, keeping s: cheap but not dW (cross
  terms B_i A_j), and only defined for equal ranks and scalings.
- svd: the best rank-k approximation of dW (Eckart-Young) without forming the dense out x in matrix.
  With Bcat = Qb Rb and Acat^T = Qa Ra, dW = Qb (Rb Ra^T) Qa^T, so the SVD U S V^T of the R x R core gives
  dW's singular values S and vectors Qb U, Qa V; ||dW - dW_k||_F^2 = sum S[k:]^2.
- ties / dare_linear / dare_ties / magnitude_prune: PEFT's element-wise primitives (peft.utils.merge_utils,
  reimplemented here so that moa does not depend on peft) on the dense dW_i of one module at a time.
  breadcrumbs (Model Breadcrumbs, Davari & Belilovsky 2023) prunes each dW_i as mergekit's `breadcrumbs` does:
  the largest `gamma` fraction and the smallest entries dropped, the middle `density` fraction kept, then the
  weighted sum. As the methods are defined, the result is a dense update of full rank (`dense_updates`), folded
  into the weights; with `k` it is truncated to its best rank-k approximation, an adapter (its distance to the
  untruncated merge is the report's truncation_error).

The SVD-based methods split sqrt(S) between B and A and have scaling 1 (lora_alpha = r, no rsLoRA).
MERGES is the table of the methods: how each forms the update, its default weights and its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moa.errors import MoaError
from moa.lora.inject import PEFT_PREFIX, peft_key
from moa.lora.peft_io import AdapterConfig


class MergeMethod(StrEnum):
    CONCAT = "concat"
    LINEAR = "linear"
    AVG = "avg"
    TASK_ARITHMETIC = "task_arithmetic"
    SVD = "svd"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    MAGNITUDE_PRUNE = "magnitude_prune"
    BREADCRUMBS = "breadcrumbs"


class SignMethod(StrEnum):
    """TIES / DARE-TIES sign election, as PEFT's majority_sign_method."""

    TOTAL = "total"
    FREQUENCY = "frequency"


class Update(StrEnum):
    """How a merge forms the merged update from the task updates dW_i."""

    EXACT = "exact"  # the factors stacked: the weighted sum itself, rank R
    FACTORS = "factors"  # the factors summed: cheap, not the sum of the updates
    SVD = "svd"  # the best rank-k approximation of the weighted sum
    DENSE = "dense"  # an element-wise merge of the dense updates: full rank, or its rank-k SVD where k is given


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: the method and its parameters (validated on construction)."""

    method: MergeMethod
    weights: tuple[float, ...] | None = None  # None = the method's default
    k: int | None = None  # merged rank; None: svd the largest input rank, the element-wise merges untruncated
    density: float = 0.5  # element-wise merges: the fraction of each update's entries kept
    majority_sign_method: SignMethod = SignMethod.TOTAL  # ties / dare_ties
    seed: int = 0  # dare
    gamma: float = 0.01  # breadcrumbs: the fraction of each update's largest entries dropped (mergekit's default)
    scale: float = 1.0  # lambda: every weight multiplied by it (what tuning scans)

    def __post_init__(self) -> None:
        if self.method not in set(MergeMethod):
            raise MoaError(f"unknown merge method {self.method!r}; use one of: {', '.join(MergeMethod)}")
        object.__setattr__(self, "method", MergeMethod(self.method))
        if not 0 < self.density <= 1:
            raise MoaError(f"merge density={self.density} is outside (0, 1]; it is the fraction of entries kept")
        if not 0 <= self.gamma < 1:
            raise MoaError(f"merge gamma={self.gamma} is outside [0, 1); it is the fraction of largest entries dropped")
        if self.majority_sign_method not in set(SignMethod):
            raise MoaError(f"majority_sign_method={self.majority_sign_method!r} is unknown; use 'total' or 'frequency'")
        object.__setattr__(self, "majority_sign_method", SignMethod(self.majority_sign_method))
        if not self.scale > 0:
            raise MoaError(f"merge scale={self.scale} must be > 0; it multiplies every task's weight")
        if self.k is not None and self.k < 1:
            raise MoaError(f"merge rank k={self.k} must be at least 1")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))  # a list stays hashable


Prune = Callable[[Tensor, MergeSpec, torch.Generator], Tensor]  # one dense update, sparsified


@dataclass(frozen=True)
class Merge:
    """A merge method's row of MERGES."""

    update: Update
    mean: bool = False  # default weights 1/N (else 1 each)
    params: tuple[str, ...] = ()  # the MergeSpec fields it reads besides the weights
    prune: Prune | None = None  # DENSE: how each update is sparsified
    elect: bool = False  # DENSE: TIES' sign election, then the mean of the agreeing entries (else the weighted sum)
    # The default tuning grid (see default_grid): the mean task weight lambda it scans, and the densities where
    # it prunes.
    lambdas: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()


@dataclass
class Factors:
    """One adapter's factors on one module: A [r, in], B [out, r], update scaling * B @ A."""

    A: Tensor
    B: Tensor
    scaling: float


@dataclass
class Quality:
    """A merged module's update against the exact weighted sum dW = sum_i w_i dW_i."""

    error: float  # ||merged - dW||_F / ||dW||_F
    norm: float  # ||dW||_F
    energy: float | None = None  # rank-k truncations: sum(S[:k]^2) / sum(S^2) of the matrix truncated
    truncation: float | None = None  # rank-k truncations: ||merged - M||_F / ||M||_F, M the matrix truncated
    truncated_norm: float | None = None  # ||M||_F


@dataclass
class Merged:
    """A merged module: update scaling * B @ A."""

    A: Tensor
    B: Tensor
    scaling: float
    quality: Quality


def merge_parameters(method: MergeMethod) -> dict[str, Any]:
    """The keys a `methods` entry of a merge may set, each with its default (weights None: the method's; k None:
    the largest input rank)."""
    defaults = {field.name: field.default for field in fields(MergeSpec)}
    return {"weights": None, "scale": defaults["scale"]} | {name: defaults[name] for name in MERGES[method].params}


def resolved_weights(spec: MergeSpec, n: int) -> list[float]:
    """The weights of ``n`` adapters, times `scale`: the explicit ones, else the method's default (1/N or 1 each)."""
    if spec.weights is None:
        return [spec.scale * (1.0 / n if MERGES[spec.method].mean else 1.0)] * n
    if len(spec.weights) != n:
        raise MoaError(f"{spec.method} merge got {len(spec.weights)} weights for {n} adapters; give one per adapter")
    return [spec.scale * w for w in spec.weights]


def tunable(method: MergeMethod) -> tuple[str, ...]:
    """The parameters a `tune` grid of `method` may scan: the scale of every merge; density and k where it has them."""
    return ("scale", *(name for name in ("density", "k") if name in MERGES[method].params))


def default_grid(spec: MergeSpec, n: int) -> dict[str, tuple[float, ...]]:
    """The family's grid: the scales at which the mean task weight takes each of its `lambdas`, and its
    `densities` where it prunes (k is scanned only where given)."""
    mean_weight = sum(resolved_weights(replace(spec, scale=1.0), n)) / n
    grid = {"scale": tuple(round(lam / mean_weight, 6) for lam in MERGES[spec.method].lambdas)}
    return grid | ({"density": MERGES[spec.method].densities} if MERGES[spec.method].densities else {})


def scale_linear(method: MergeMethod) -> bool:
    """Whether the merged update is linear in the weights, so a merge at scale 1 times lambda is the merge at
    scale lambda (every method but the factor sums, whose update is quadratic in them)."""
    return MERGES[method].update != Update.FACTORS


def is_dense(spec: MergeSpec) -> bool:
    """Whether the merge is an element-wise merge left untruncated: a dense update of full rank, folded into the
    weights (dense_updates), not an adapter."""
    return MERGES[spec.method].update == Update.DENSE and spec.k is None


def target_rank(spec: MergeSpec, ranks: Sequence[int]) -> int:
    """The rank k of an SVD-based merge, or of an element-wise merge truncated, of adapters of ``ranks``."""
    if is_dense(spec):
        raise MoaError(f"{spec.method} without k is a dense update, not an adapter; give k to truncate it to rank k")
    k = spec.k or max(ranks)
    if MERGES[spec.method].update == Update.SVD and k > sum(ranks):
        raise MoaError(f"svd: k={k} exceeds the sum of the adapters' ranks ({sum(ranks)}); use k <= {sum(ranks)}")
    return k


def merge_module(spec: MergeSpec, factors: Sequence[Factors], module_index: int) -> Merged:
    """Merge the adapters' factors on one module; ``module_index`` seeds DARE's random pruning."""
    if not factors:
        raise MoaError("a merge needs at least one adapter")
    weights, update = resolved_weights(spec, len(factors)), MERGES[spec.method].update
    if update == Update.EXACT:
        return _concat(factors, weights)
    if update == Update.FACTORS:
        return _linear(spec.method, factors, weights)
    k = target_rank(spec, [f.A.shape[0] for f in factors])
    if update == Update.SVD:
        return _svd(factors, weights, k)
    updates = [delta_weight(f) for f in factors]
    return _truncate_dense(dense_merge(spec, updates, weights, module_index), _weighted_sum(updates, weights), k)


def dense_updates(spec: MergeSpec, adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]],
                  names: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
    """Each module's element-wise merge of the adapters, untruncated (float32), one module at a time: what an
    exact ties / dare / magnitude_prune / breadcrumbs merge adds to the module's weight."""
    weights = resolved_weights(spec, len(adapters))
    for index, module, factors in _modules(adapters, names):
        yield module, dense_merge(spec, [delta_weight(f) for f in factors], weights, index)


def dense_report(spec: MergeSpec, adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]],
                 names: Sequence[str]) -> dict[str, Any]:
    """merge_report.json of an untruncated element-wise merge: how far pruning and sign election moved it from the
    weighted sum of the updates (its rank: full, no truncation)."""
    weights = resolved_weights(spec, len(adapters))
    quality = []
    for index, _, factors in _modules(adapters, names):
        updates = [delta_weight(f) for f in factors]
        exact = sum(w * t for t, w in zip(updates, weights))  # float32: a report's precision, 4x faster than float64
        norm = float(torch.linalg.matrix_norm(exact))
        diff = float(torch.linalg.matrix_norm(dense_merge(spec, updates, weights, index) - exact))
        quality.append(Quality(_relative(diff, norm), norm))
    return _report(spec, names, [config for config, _ in adapters], quality, None)


def delta_weight(f: Factors) -> Tensor:
    """The dense update in float32, computed as PEFT's get_delta_weight does (same rounding)."""
    return (f.B.float() @ f.A.float()) * f.scaling


def dense_merge(spec: MergeSpec, updates: Sequence[Tensor], weights: Sequence[float], module_index: int) -> Tensor:
    """An element-wise merge of dense updates: each pruned by its method's primitive, then their weighted sum or,
    with sign election, their mean over the entries that agree. ties / dare_linear / dare_ties / magnitude_prune
    are PEFT's, op for op.

    DARE draws one Bernoulli mask per update, in order, from a generator seeded with seed + module_index
    (PEFT uses the global generator, so ``torch.manual_seed(seed + module_index)`` reproduces it there).
    """
    merge = MERGES[spec.method]
    if merge.prune is None:
        dense = ", ".join(m for m, row in MERGES.items() if row.prune is not None)
        raise MoaError(f"{spec.method} is not an element-wise merge; use one of: {dense}")
    gen = torch.Generator().manual_seed(spec.seed + module_index)
    stacked = torch.stack([merge.prune(t, spec, gen) for t in updates], dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(w.shape + (1,) * (stacked.dim() - 1))
    if not merge.elect:
        return weighted.sum(dim=0)
    # Sign election on the unweighted pruned updates, then the mean of the weighted entries that agree.
    mask = _majority_sign_mask(stacked, spec.majority_sign_method)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def merge_adapters(
    spec: MergeSpec, adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]], names: Sequence[str],
    module_weights: Mapping[str, Sequence[float]] | None = None,
) -> tuple[AdapterConfig, dict[str, Tensor], dict[str, Any]]:
    """Merge loaded adapters (``moa.lora.load_adapter`` results) module by module; `module_weights` (module name ->
    one weight per adapter: a learned merge's) replace the spec's weights on each module.

    Returns the merged adapter's config and state (PEFT keys, float32) and a JSON-serializable report.
    """
    state: dict[str, Tensor] = {}
    results: list[Merged] = []
    for index, module, factors in _modules(adapters, names):
        merged = merge_module(spec if module_weights is None else replace(spec, weights=tuple(module_weights[module])),
                              factors, index)
        state[peft_key(module, "A")] = merged.A.float().contiguous()
        state[peft_key(module, "B")] = merged.B.float().contiguous()
        results.append(merged)
    configs = [config for config, _ in adapters]
    rank = results[0].A.shape[0]
    return _merged_config(spec, configs, rank), state, _report(spec, names, configs, [m.quality for m in results], rank)


def _modules(adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]],
             names: Sequence[str]) -> Iterator[tuple[int, str, list[Factors]]]:
    """Each module's index (it seeds DARE), name and factors of every adapter, the adapters checked to fit."""
    if not adapters:
        raise MoaError("a merge needs at least one adapter; pass one or more adapter directories")
    if len(names) != len(adapters):
        raise MoaError(f"merge got {len(names)} names for {len(adapters)} adapters; name each adapter once")
    _check_compatible(adapters, names)
    for index, module in enumerate(_module_names(adapters[0][1])):
        factors = [_factors(config, st, module, name) for (config, st), name in zip(adapters, names)]
        _check_shapes(factors, module, names)
        yield index, module, factors


# -- the methods ------------------------------------------------------------------------------------


def _stacked(factors: Sequence[Factors], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(Bcat, Acat) with Bcat @ Acat = sum_i w_i s_i B_i A_i; A scaled as PEFT's "cat" does."""
    B = torch.cat([f.B.float() for f in factors], dim=1)
    A = torch.cat([f.A.float() * w * f.scaling for f, w in zip(factors, weights)], dim=0)
    return B, A


def _concat(factors: Sequence[Factors], weights: Sequence[float]) -> Merged:
    B, A = _stacked(factors, weights)
    return Merged(A.contiguous(), B.contiguous(), 1.0, Quality(0.0, _lowrank_norm(B, A)))


def _linear(method: str, factors: Sequence[Factors], weights: Sequence[float]) -> Merged:
    ranks = [f.A.shape[0] for f in factors]
    scalings = [f.scaling for f in factors]
    if len(set(ranks)) > 1 or not all(math.isclose(s, scalings[0], rel_tol=1e-9) for s in scalings):
        raise MoaError(
            f"{method} merge needs adapters of equal rank and scaling (got ranks {ranks}, scalings {scalings}): "
            "summing factors of different shapes is undefined; use concat (exact) or svd (rank k)"
        )
    A = sum(w * f.A.float() for f, w in zip(factors, weights))
    B = sum(w * f.B.float() for f, w in zip(factors, weights))
    B_exact, A_exact = _stacked(factors, weights)
    # merged - exact = [B | Bcat] @ [s A ; -Acat], a rank <= r + R product: no dense matrix needed.
    diff = _lowrank_norm(torch.cat([B, B_exact], dim=1), torch.cat([scalings[0] * A, -A_exact], dim=0))
    norm = _lowrank_norm(B_exact, A_exact)
    return Merged(A, B, scalings[0], Quality(_relative(diff, norm), norm))


def _svd(factors: Sequence[Factors], weights: Sequence[float], k: int) -> Merged:
    B, A = _stacked(factors, weights)
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    B_k, A_k = _rank_k(qb @ u, s, vh @ qa.T, k)
    norm, error = float(s.norm()), _relative(float(s[k:].norm()), float(s.norm()))
    return Merged(A_k, B_k, 1.0, Quality(error, norm, _energy(s, k), truncation=error, truncated_norm=norm))


def _truncate_dense(merged: Tensor, exact: Tensor, k: int) -> Merged:
    """Rank-k SVD of a dense merge; the error is against the exact weighted sum, the truncation against the merge.

    The singular pairs come from the eigendecomposition of the smaller Gram matrix in float64: a few
    times faster than a full SVD of the out x in matrix, and accurate to ~1e-8 of the largest singular
    value, far below the float32 the factors are stored in."""
    m = merged.double()
    wide = m.shape[0] < m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    s = eigenvalues.flip(0).clamp(min=0).sqrt()
    vectors = vectors.flip(1)[:, :k]
    other = (m.T if wide else m) @ vectors / s[:k].clamp(min=torch.finfo(torch.float64).tiny)
    u, vh = (vectors, other.T) if wide else (other, vectors.T)
    B, A = _rank_k(u, s, vh, k)
    product = B.double() @ A.double()
    norm, merged_norm = float(torch.linalg.matrix_norm(exact)), float(s.norm())
    error = _relative(float(torch.linalg.matrix_norm(product - exact)), norm)
    truncation = _relative(float(torch.linalg.matrix_norm(product - m)), merged_norm)
    return Merged(A, B, 1.0, Quality(error, norm, _energy(s, k), truncation, merged_norm))


def _rank_k(u: Tensor, s: Tensor, vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k in float32; zero directions pad to rank k where there are fewer."""
    root = s[:k].sqrt()
    B, A = u[:, :k] * root, root[:, None] * vh[:k]
    pad = k - root.numel()
    return F.pad(B, (0, pad)).float().contiguous(), F.pad(A, (0, 0, 0, pad)).float().contiguous()


# -- the element-wise primitives: PEFT's (peft.utils.merge_utils) and mergekit's magnitude_outliers ----------


def _magnitude_prune(t: Tensor, spec: MergeSpec, gen: torch.Generator) -> Tensor:
    """The `density` fraction of largest magnitudes kept."""
    density = spec.density
    if density >= 1:  # PEFT returns the tensor unchanged
        return t
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    # PEFT keeps the k largest magnitudes (topk); the k-th largest as a threshold keeps the same entries
    # (barring exact ties) with a linear-time selection instead of a sort.
    magnitude = t.abs()
    threshold = magnitude.reshape(-1).kthvalue(t.numel() - k + 1).values
    return t * (magnitude >= threshold)


def _random_prune(t: Tensor, spec: MergeSpec, gen: torch.Generator) -> Tensor:
    """DARE: each entry kept with probability `density`, rescaled by 1 / density."""
    density = spec.density
    if density >= 1:  # PEFT returns the tensor unchanged, without a random draw
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density


def _magnitude_outliers(t: Tensor, spec: MergeSpec, gen: torch.Generator) -> Tensor:
    """Model Breadcrumbs: by magnitude, the largest `gamma` fraction dropped, then the smallest, so that the
    `density` fraction in between is kept (fewer of the largest are dropped where density leaves no room), no
    rescaling: mergekit's magnitude_outliers. Its slice keeps nothing when gamma * numel < 1; here no entry of
    the top is dropped then."""
    if spec.density >= 1:  # mergekit returns the tensor unchanged
        return t
    n = t.numel()
    kept = int(spec.density * n)
    if kept == 0:
        return torch.zeros_like(t)
    top = min(int(spec.gamma * n), n - kept)
    # The magnitudes of ascending ranks n - top - kept .. n - top - 1, selected by thresholds (linear time, no
    # sort): the entries mergekit's sort keeps, barring exact ties.
    magnitude = t.abs()
    flat = magnitude.reshape(-1)
    low, high = flat.kthvalue(n - top - kept + 1).values, flat.kthvalue(n - top).values
    return t * ((magnitude >= low) & (magnitude <= high))


def _majority_sign_mask(stacked: Tensor, method: SignMethod) -> Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == SignMethod.TOTAL else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


# -- the table ---------------------------------------------------------------------------------------

_PRUNED = ("k", "density")
# The default grids. A sum of task updates scans the task-arithmetic paper's lambda on validation (Ilharco et al.
# 2023; FusionBench's 0.1..1.0); TIES' disjoint mean its lambda 0.8..1.8 and its top-k of 10, 20, 30% (Yadav et
# al. 2023); DARE its drop rates 0.5..0.9 (Yu et al. 2024); Breadcrumbs mergekit's density 0.9 and below.
_SUM = tuple(round(0.1 * i, 1) for i in range(1, 11))
_DISJOINT_MEAN = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8)
_TOP_K = (0.1, 0.2, 0.3)
_DARE = (0.1, 0.3, 0.5)

MERGES: dict[MergeMethod, Merge] = {
    MergeMethod.CONCAT: Merge(Update.EXACT, lambdas=_SUM),
    MergeMethod.LINEAR: Merge(Update.FACTORS, lambdas=_SUM),
    MergeMethod.AVG: Merge(Update.FACTORS, mean=True, lambdas=_SUM),
    MergeMethod.TASK_ARITHMETIC: Merge(Update.EXACT, mean=True, lambdas=_SUM),
    MergeMethod.SVD: Merge(Update.SVD, mean=True, params=("k",), lambdas=_SUM),
    MergeMethod.TIES: Merge(Update.DENSE, params=(*_PRUNED, "majority_sign_method"), prune=_magnitude_prune,
                            elect=True, lambdas=_DISJOINT_MEAN, densities=_TOP_K),
    MergeMethod.DARE_LINEAR: Merge(Update.DENSE, params=(*_PRUNED, "seed"), prune=_random_prune, lambdas=_SUM,
                                   densities=_DARE),
    MergeMethod.DARE_TIES: Merge(Update.DENSE, params=(*_PRUNED, "majority_sign_method", "seed"),
                                 prune=_random_prune, elect=True, lambdas=_DISJOINT_MEAN, densities=_DARE),
    MergeMethod.MAGNITUDE_PRUNE: Merge(Update.DENSE, params=_PRUNED, prune=_magnitude_prune, lambdas=_SUM,
                                       densities=_TOP_K),
    MergeMethod.BREADCRUMBS: Merge(Update.DENSE, params=(*_PRUNED, "gamma"), prune=_magnitude_outliers,
                                   lambdas=_SUM, densities=(0.7, 0.8, 0.9)),
}


# -- norms and errors --------------------------------------------------------------------------------


def _weighted_sum(updates: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    return sum(w * t.double() for t, w in zip(updates, weights))


def _lowrank_norm(B: Tensor, A: Tensor) -> float:
    """||B @ A||_F from the R factors of B and A^T (float64), without forming B @ A."""
    rb = torch.linalg.qr(B.double(), mode="r")[1]
    ra = torch.linalg.qr(A.double().T, mode="r")[1]
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def _energy(s: Tensor, k: int) -> float:
    total = float((s**2).sum())
    return float((s[:k] ** 2).sum()) / total if total > 0 else 1.0


def _overall(errors: Sequence[tuple[float, float]]) -> float:
    """The relative error over every module, from each module's (relative error, norm)."""
    absolute = [error * norm if norm > 0 else error for error, norm in errors]  # error is 0 or inf at norm 0
    return _relative(math.sqrt(sum(a**2 for a in absolute)), math.sqrt(sum(norm**2 for _, norm in errors)))


def _relative(diff: float, norm: float) -> float:
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


# -- adapters ----------------------------------------------------------------------------------------


def _module_names(state: dict[str, Tensor]) -> list[str]:
    """Module names of a PEFT state, sorted (the module index that seeds DARE follows this order)."""
    return sorted({key[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for key in state})


def _targets(config: AdapterConfig) -> str | list[str]:
    t = config.target_modules
    return t if isinstance(t, str) else sorted(t)


def _check_compatible(adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]], names: Sequence[str]) -> None:
    (c0, s0), n0 = adapters[0], names[0]
    modules0 = set(_module_names(s0))
    if not modules0:
        raise MoaError(f"adapter {n0!r} has no LoRA tensors; re-save it")
    for (c, s), n in zip(adapters[1:], names[1:]):
        pair = f"adapters {n0!r} and {n!r}"
        if c.base_model_name_or_path != c0.base_model_name_or_path:
            raise MoaError(f"{pair} have different base models ({c0.base_model_name_or_path!r} vs "
                           f"{c.base_model_name_or_path!r}); merge only adapters of one base model")
        if c0.arch_fingerprint is not None and c.arch_fingerprint is not None:
            keys = sorted(k for k in c0.arch_fingerprint.keys() | c.arch_fingerprint.keys()
                          if c0.arch_fingerprint.get(k) != c.arch_fingerprint.get(k))
            if keys:
                key = keys[0]
                raise MoaError(f"{pair} were saved for different architectures ({key}={c0.arch_fingerprint.get(key)!r}"
                               f" vs {c.arch_fingerprint.get(key)!r}); merge only adapters of one base model")
        differ = sorted(modules0 ^ set(_module_names(s)))
        if differ:
            more = ", ..." if len(differ) > 3 else ""
            raise MoaError(f"{pair} adapt different modules ({', '.join(differ[:3])}{more}); "
                           "merge only adapters with the same target_modules")
        if _targets(c) != _targets(c0):
            raise MoaError(f"{pair} have different target_modules ({_targets(c0)!r} vs {_targets(c)!r}); "
                           "merge only adapters with the same target_modules")


def _factors(config: AdapterConfig, state: dict[str, Tensor], module: str, name: str) -> Factors:
    keys = peft_key(module, "A"), peft_key(module, "B")
    missing = [key for key in keys if key not in state]
    if missing:
        raise MoaError(f"adapter {name!r} has no tensor {missing[0]}; re-save it with both LoRA factors")
    return Factors(state[keys[0]], state[keys[1]], config.spec.scaling)


def _check_shapes(factors: Sequence[Factors], module: str, names: Sequence[str]) -> None:
    shapes = [(f.B.shape[0], f.A.shape[1]) for f in factors]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{n}: {o}x{i}" for n, (o, i) in zip(names, shapes))
        raise MoaError(f"module {module} has different shapes (out x in) across adapters ({listed}); "
                       "merge only adapters of one base model")


def _merged_config(spec: MergeSpec, configs: Sequence[AdapterConfig], rank: int) -> AdapterConfig:
    """A sum of factors keeps the inputs' scaling; every other method writes scaling 1 (lora_alpha = r)."""
    c0 = configs[0]
    keep = MERGES[spec.method].update == Update.FACTORS
    return AdapterConfig(
        r=rank,
        lora_alpha=c0.lora_alpha if keep else rank,
        target_modules=_targets(c0),
        lora_dropout=c0.lora_dropout,
        use_rslora=c0.use_rslora if keep else False,
        base_model_name_or_path=c0.base_model_name_or_path,
        arch_fingerprint=next((c.arch_fingerprint for c in configs if c.arch_fingerprint is not None), None),
    )


def _report(spec: MergeSpec, names: Sequence[str], configs: Sequence[AdapterConfig], results: Sequence[Quality],
            rank: int | None) -> dict[str, Any]:
    """The merge's report; rank None: a dense update of full rank (an untruncated element-wise merge)."""
    params = MERGES[spec.method].params
    energies = [q.energy for q in results if q.energy is not None]
    truncated = [q for q in results if q.truncation is not None]
    report: dict[str, Any] = {
        "method": spec.method,
        "adapters": list(names),
        "weights": resolved_weights(spec, len(configs)),
        "scale": spec.scale,
        "k": rank if "k" in params else None,
        "rank": rank,
        "input_ranks": [c.r for c in configs],
        "relative_error": _overall([(q.error, q.norm) for q in results]),
        "max_module_relative_error": max(q.error for q in results),
        "truncation_error": _overall([(q.truncation, q.truncated_norm) for q in truncated]) if truncated else None,
        "retained_energy": sum(energies) / len(energies) if energies else None,
        "modules": len(results),
    }
    return report | {name: getattr(spec, name) for name in params if name != "k"}
