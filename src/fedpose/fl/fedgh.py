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
Gram matrix G = D Dᵀ is computed once; every inner product the rules need is a bilinear form
in C and G (⟨ĝ_k, Δ_j⟩ = (C G)[k,j], ⟨ĝ_i, ĝ_j⟩ = C[i] G C[j]ᵀ), so the projections run on
K x K float64 matrices, and the result is ONE weighted sum (wᵀC) D. Cost: one Gram matrix
(a single pass over D) + O(K³) scalars + one pass over D. method "direct" is the plain vector
loop, the reference "gram" must equal.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpose.fl.gram_native import native_gram, native_gram_kernel

VARIANTS = ("pcgrad", "symmetric")
ORDERS = ("index", "random")
METHODS = ("gram", "direct")

# Below this many elements the Gram matrix is computed in float64 (exact enough to serve as a
# reference, and cheap); above it in float32 blocks summed in float64.
_SMALL = 1 << 21
# Columns per block of the batched-GEMM Gram product: enough blocks to share between the cores,
# each long enough to keep the GEMM efficient.
_BLOCK = 1 << 16
# The direct loop's dot products: float32 within blocks of this many terms, float64 across.
_DOT_BLOCK = 1 << 14
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


# ----------------------------------------------------------------------------------- Gram matrix
def gram_matrix(deltas: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """G = D Dᵀ as a (K, K) float64 tensor, in one pass over the (K, P) matrix D.

    backend "torch": the columns are cut into blocks viewed as a batch, (B, K, L), and multiplied
    with one batched GEMM. backend "native": a small C kernel that computes only the upper
    triangle (see `native_gram_kernel`), about 1.5x faster at K = 16 on a 2-core AVX-512 CPU.
    "auto" (the default) takes the native kernel when it is available and the input is a large
    float32 CPU tensor, the exact float64 product for small inputs, and "torch" otherwise.
    Either way: float32 products within a block of columns, float64 sums across blocks; strided
    row views (e.g. the columns of one layer) are read in place, without a copy.
    """
    if backend not in ("auto", "torch", "native"):
        raise ValueError(f"unknown Gram backend {backend!r}; use auto, torch or native")
    k, p = deltas.shape
    plain = deltas.stride(1) == 1 and deltas.dtype == torch.float32
    if backend == "auto" and (k * p <= _SMALL or not plain):
        d = deltas.to(torch.float64)
        return d @ d.T
    if backend != "torch" and plain and deltas.device.type == "cpu":
        kernel = native_gram_kernel()
        if kernel is not None:
            return native_gram(kernel, deltas)
    if backend == "native":
        raise RuntimeError("the native Gram kernel needs a float32 CPU tensor with unit column "
                           "stride and a C compiler (see native_gram_kernel)")
    return _batched_gram(deltas)


def _batched_gram(deltas: torch.Tensor) -> torch.Tensor:
    p = deltas.shape[1]
    blocks = p // _BLOCK
    body = blocks * _BLOCK
    gram = torch.zeros(deltas.shape[0], deltas.shape[0], dtype=torch.float64)
    if blocks:
        x = deltas[:, :body].unflatten(1, (blocks, _BLOCK)).transpose(0, 1)  # (B, K, L), a view
        gram += torch.bmm(x, x.transpose(1, 2)).sum(0, dtype=torch.float64)
    if body < p:
        tail = deltas[:, body:]
        gram += (tail @ tail.T).to(torch.float64)
    return (gram + gram.T) / 2  # the GEMM may round G_ij and G_ji differently


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines from a Gram matrix; 0 wherever a vector is zero."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    outer = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    cos = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0)
    return cos.clamp(-1.0, 1.0)


def conflict_share(cosine: torch.Tensor, tau: float = 0.0) -> float:
    """Share of client pairs i < j with cos(Δ_i, Δ_j) < tau (0.0 with fewer than two clients)."""
    k = cosine.shape[-1]
    if k < 2:
        return 0.0
    iu = torch.triu_indices(k, k, offset=1)
    return float((cosine[iu[0], iu[1]] < tau).double().mean())


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


def _pcgrad_coefficients(g: np.ndarray, orders: list[list[int]]) -> np.ndarray:
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
        dot = (b[..., i, :] * c[..., j, :]).sum(-1)
        ni = (b[..., i, :] * c[..., i, :]).sum(-1)
        nj = (b[..., j, :] * c[..., j, :]).sum(-1)
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
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k weights_k ĝ_k as a (P,) tensor (added in place to `add_to` when given).

    method "gram" reuses `gram` (= gram_matrix(deltas)) when the caller already has it.
    method "direct" keeps one ĝ at a time for pcgrad; the symmetric rule changes both members of
    a pair, so its direct loop holds a harmonized copy of all K rows (K x P extra memory).
    """
    check_options(variant, order, method)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if method == "gram":
        if gram is None:
            gram = gram_matrix(deltas)
        c = projection_coefficients(gram, variant=variant, order=order, seed=seed)
        coef = (weights @ c).to(deltas.dtype)
        if add_to is None:
            return torch.mv(deltas.T, coef)
        return torch.addmv(add_to, deltas.T, coef, out=add_to)
    if variant == "pcgrad":
        return _direct_pcgrad(deltas, weights, visit_orders(len(deltas), order, seed), add_to)
    return _direct_symmetric(deltas, weights, pair_order(len(deltas), order, seed), add_to)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> with float64 sums across blocks of 16384 terms: a single float32 sum over tens of
    millions of terms (e.g. a squared norm) drifts by ~1e-5, which the reference must not."""
    n = a.numel()
    blocks = n // _DOT_BLOCK
    if blocks < 2 or not (a.is_contiguous() and b.is_contiguous()):
        return float(torch.dot(a.double(), b.double()))
    body = blocks * _DOT_BLOCK
    total = torch.bmm(a[:body].view(blocks, 1, -1), b[:body].view(blocks, -1, 1)).sum(
        dtype=torch.float64)
    if body < n:
        total += torch.dot(a[body:].double(), b[body:].double())
    return float(total)


def _direct_pcgrad(deltas, weights, orders, add_to):
    out = torch.zeros(deltas.shape[1], dtype=deltas.dtype) if add_to is None else add_to
    norm2 = [_dot(d, d) for d in deltas]
    g = torch.empty_like(deltas[0])
    for k, visits in enumerate(orders):
        g.copy_(deltas[k])
        for j in visits:
            dot = _dot(g, deltas[j])
            if dot < 0 and norm2[j] > 0:
                g.add_(deltas[j], alpha=-dot / norm2[j])
        out.add_(g, alpha=float(weights[k]))
    return out


def _direct_symmetric(deltas, weights, pairs, add_to):
    g = deltas.clone()
    zero = _ZERO2 * max((_dot(d, d) for d in deltas), default=0.0)
    for i, j in pairs:
        dot = _dot(g[i], g[j])
        ni, nj = _dot(g[i], g[i]), _dot(g[j], g[j])
        if dot < 0 and ni > zero and nj > zero:
            gi = g[i].clone()
            g[i].add_(g[j], alpha=-dot / nj)
            g[j].add_(gi, alpha=-dot / ni)
    coef = weights.to(deltas.dtype)
    if add_to is None:
        return torch.mv(g.T, coef)
    return torch.addmv(add_to, g.T, coef, out=add_to)
