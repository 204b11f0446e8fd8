"""Gradient harmonization of client updates: PCGrad projection and Zhang et al.'s pairwise rule.

Given client updates Δ_1..Δ_K (rows of a K x P matrix D) and weights w, `harmonize` returns
sum_k w_k ĝ_k, where ĝ_k is Δ_k with its conflicts projected away.

variant "pcgrad" (Yu et al. 2020, as this project defines it for FedGH): for each k, ĝ_k starts
at Δ_k and visits every other client j once; when ⟨ĝ_k, Δ_j⟩ < 0,
    ĝ_k ← ĝ_k − ⟨ĝ_k, Δ_j⟩ / ‖Δ_j‖² · Δ_j        (always against the ORIGINAL Δ_j).
Clients with Δ_j = 0 are skipped. Each ĝ_k only depends on the original updates, so the K
projections are independent of each other.

variant "symmetric" (Zhang et al. 2023, arXiv:2309.06692, "gradient harmonization"): the
updates are harmonized pair by pair, in place. For each pair (i, j), i < j, with current values
g_i, g_j: when ⟨g_i, g_j⟩ < 0, both are projected onto the other's normal plane, each using the
pair's values from before this projection (g̃ = copies):
    g_i ← g_i − ⟨g_i, g̃_j⟩ / ‖g̃_j‖² · g̃_j,    g_j ← g_j − ⟨g_j, g̃_i⟩ / ‖g̃_i‖² · g̃_i.
The conflict test uses the current (already harmonized) values, so later pairs see earlier
projections, as in the paper's sequential loop. Pairs with a zero member are skipped; a
harmonized vector counts as zero once its norm falls below 1e-5 of the largest ‖Δ_k‖ (two exactly
opposite updates cancel to rounding noise, whose direction must not steer later projections).

order "index": pcgrad visits j = 0..K−1 (skipping k); symmetric visits the pairs (0,1), (0,2),
..., (0,K−1), (1,2), ... . order "random": one torch.Generator seeded with `seed`; pcgrad draws
one permutation of range(K) per k, for k = 0..K−1 in turn, and visits it skipping k; symmetric
draws one permutation of the lexicographic pair list.

method "gram" (exact and fast): every ĝ_k lies in span{Δ_1..Δ_K}, ĝ_k = Σ_j C[k,j] Δ_j. The
Gram matrix G = D Dᵀ is computed once (fl/gram.py); every inner product the rules need is a
bilinear form in C and G (⟨ĝ_k, Δ_j⟩ = (C G)[k,j], ⟨ĝ_i, ĝ_j⟩ = C[i] G C[j]ᵀ), so the
projections run on K x K float64 matrices, and the result is ONE weighted sum (wᵀC) D. Cost: one
Gram matrix (a single pass over D) + O(K³) scalars + one pass over D. The K x K arithmetic uses
only correctly rounded elementwise operations and sums in a fixed order, so the coefficients,
like the Gram matrix, have the same bits on every machine.

method "direct" is the plain vector loop, the reference "gram" must equal within rounding (it
rounds every projected vector to float32, which the Gram method never forms). Its inner products
are `exact_dot` and its updates a separate multiply and subtract, so it too is reproducible
across machines, though not bit-equal to "gram".
"""

from __future__ import annotations

import numpy as np
import torch

from fedpose.fl.gram import exact_dot, gram_matrix, ordered_sum, weighted_sum

VARIANTS = ("pcgrad", "symmetric")
ORDERS = ("index", "random")
METHODS = ("gram", "direct")

# Symmetric rule: squared norm, relative to the largest ‖Δ_k‖², below which a harmonized vector
# is numerically zero.
_ZERO2 = 1e-10


def check_options(variant: str, order: str, method: str | None = None) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown harmonization variant {variant!r}; use one of {VARIANTS}")
    if order not in ORDERS:
        raise ValueError(f"unknown projection order {order!r}; use one of {ORDERS}")
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown harmonization method {method!r}; use one of {METHODS}")


# ----------------------------------------------------------------------------------- visit orders
def visit_orders(k: int, order: str = "random", seed: int = 0) -> list[list[int]]:
    """PCGrad: for each client k, the other clients in the order its projections visit them."""
    check_options("pcgrad", order)
    if order == "index":
        return [[j for j in range(k) if j != i] for i in range(k)]
    gen = torch.Generator().manual_seed(seed)
    return [[j for j in torch.randperm(k, generator=gen).tolist() if j != i] for i in range(k)]


def pair_order(k: int, order: str = "random", seed: int = 0) -> list[tuple[int, int]]:
    """Symmetric rule: the pairs (i, j), i < j, in the order they are harmonized."""
    check_options("symmetric", order)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if order == "random" and pairs:
        gen = torch.Generator().manual_seed(seed)
        pairs = [pairs[t] for t in torch.randperm(len(pairs), generator=gen).tolist()]
    return pairs


# ----------------------------------------------------------------------------------- coefficients
def projection_coefficients(
    gram: torch.Tensor, *, variant: str = "pcgrad", order: str = "random", seed: int = 0
) -> torch.Tensor:
    """C with ĝ_k = Σ_j C[k, j] Δ_j, computed from G alone (float64).

    `gram` may carry leading batch dimensions (..., K, K), e.g. one Gram matrix per layer; all of
    them are harmonized with the same visit order.
    """
    check_options(variant, order)
    g = gram.detach().to(torch.float64).cpu().numpy()
    k = g.shape[-1]
    if variant == "pcgrad":
        c = _pcgrad_coefficients(g, visit_orders(k, order, seed))
    else:
        c = _symmetric_coefficients(g, pair_order(k, order, seed))
    return torch.from_numpy(c)


def pcgrad_decisions(gram: torch.Tensor, *, order: str = "random", seed: int = 0) -> np.ndarray:
    """(K, K−1) booleans: whether PCGrad's t-th visit of client k projects (⟨ĝ_k, Δ_j⟩ < 0),
    from G alone, in the visit order `projection_coefficients` uses."""
    g = gram.detach().to(torch.float64).cpu().numpy()
    hits: list[np.ndarray] = []
    _pcgrad_coefficients(g, visit_orders(g.shape[-1], order, seed), hits)
    return np.stack(hits, axis=-1) if hits else np.zeros((g.shape[-1], 0), dtype=bool)


def _pcgrad_coefficients(
    g: np.ndarray, orders: list[list[int]], hits: list[np.ndarray] | None = None
) -> np.ndarray:
    k = g.shape[-1]
    c = np.broadcast_to(np.eye(k), g.shape).copy()
    if k < 2:
        return c
    # v[..., k, j] = <ĝ_k, Δ_j> = (C G)[k, j]; all K clients advance one step at a time
    v = g.copy()
    diag = np.diagonal(g, axis1=-2, axis2=-1)
    rows = np.arange(k)
    visits = np.asarray(orders)  # (K, K-1)
    for t in range(k - 1):
        j = visits[:, t]
        dot = v[..., rows, j]
        norm2 = diag[..., j]
        hit = (dot < 0) & (norm2 > 0)
        if hits is not None:
            hits.append(hit.copy())
        coef = np.where(hit, dot / np.where(norm2 > 0, norm2, 1.0), 0.0)
        c[..., rows, j] -= coef
        v -= coef[..., :, None] * g[..., j, :]
    return c


def _symmetric_coefficients(g: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    k = g.shape[-1]
    c = np.broadcast_to(np.eye(k), g.shape).copy()
    b = g.copy()  # b = C G, so <ĝ_i, ĝ_j> = b[i] · c[j]
    zero = _ZERO2 * np.diagonal(g, axis1=-2, axis2=-1).max(-1, initial=0.0)
    for i, j in pairs:
        dot = ordered_sum(b[..., i, :] * c[..., j, :])
        ni = ordered_sum(b[..., i, :] * c[..., i, :])
        nj = ordered_sum(b[..., j, :] * c[..., j, :])
        hit = (dot < 0) & (ni > zero) & (nj > zero)
        ai = np.where(hit, dot / np.where(nj > 0, nj, 1.0), 0.0)[..., None]
        aj = np.where(hit, dot / np.where(ni > 0, ni, 1.0), 0.0)[..., None]
        ci, bi = c[..., i, :].copy(), b[..., i, :].copy()
        c[..., i, :] -= ai * c[..., j, :]
        b[..., i, :] -= ai * b[..., j, :]
        c[..., j, :] -= aj * ci
        b[..., j, :] -= aj * bi
    return c


# ----------------------------------------------------------------------------------- harmonize
def harmonize(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    variant: str = "pcgrad",
    order: str = "random",
    seed: int = 0,
    method: str = "gram",
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k weights_k ĝ_k as a (P,) tensor.

    method "gram" reuses `gram` (= gram_matrix(deltas)) when the caller already has it.
    method "direct" keeps one ĝ at a time for pcgrad; the symmetric rule changes both members of
    a pair, so its direct loop holds a harmonized copy of all K rows (K x P extra memory).
    """
    check_options(variant, order, method)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if method == "gram":
        if gram is None:
            gram = gram_matrix(deltas)
        c = projection_coefficients(gram, variant=variant, order=order, seed=seed).numpy()
        coef = ordered_sum(weights.numpy()[:, None] * c, axis=0)  # (wᵀC)_j in a fixed order
        return weighted_sum(deltas, torch.from_numpy(coef))
    if variant == "pcgrad":
        return _direct_pcgrad(deltas, weights, visit_orders(len(deltas), order, seed))
    return _direct_symmetric(deltas, weights, pair_order(len(deltas), order, seed))


def _sub_multiple_(g: torch.Tensor, a: float, x: torch.Tensor, tmp: torch.Tensor) -> None:
    """g −= a · x as a multiply and a subtract, each rounded once (no fused multiply-add)."""
    torch.mul(x, a, out=tmp)
    g.sub_(tmp)


def _direct_pcgrad(deltas, weights, orders):
    out = torch.zeros(deltas.shape[1], dtype=deltas.dtype, device=deltas.device)
    norm2 = [exact_dot(d, d) for d in deltas]
    g, tmp = torch.empty_like(deltas[0]), torch.empty_like(deltas[0])
    for k, visits in enumerate(orders):
        g.copy_(deltas[k])
        for j in visits:
            dot = exact_dot(g, deltas[j])
            if dot < 0 and norm2[j] > 0:
                _sub_multiple_(g, dot / norm2[j], deltas[j], tmp)
        torch.mul(g, float(weights[k]), out=tmp)
        out.add_(tmp)
    return out


def _direct_symmetric(deltas, weights, pairs):
    g = deltas.clone()
    tmp = torch.empty_like(deltas[0])
    zero = _ZERO2 * max((exact_dot(d, d) for d in deltas), default=0.0)
    for i, j in pairs:
        dot = exact_dot(g[i], g[j])
        ni, nj = exact_dot(g[i], g[i]), exact_dot(g[j], g[j])
        if dot < 0 and ni > zero and nj > zero:
            gi = g[i].clone()
            _sub_multiple_(g[i], dot / nj, g[j], tmp)
            _sub_multiple_(g[j], dot / ni, gi, tmp)
    return weighted_sum(g, weights)
