"""The passes over the client-update matrix that steer aggregation, made bit-reproducible.

Every aggregation reads the K x P matrix D of client updates (row k = Δ_k) in two ways: the Gram
matrix G = D Dᵀ, from which FedAW and FedGH take norms, cosines, angles and projection
coefficients, and one weighted sum Σ_k c_k Δ_k that becomes the new global model. Training
amplifies any last-bit change, so both are computed such that, given identical updates, they
give identical bits on every CPU instruction set (SSE, AVX2, AVX-512, ARM), any BLAS, any thread
count and any chunk size. Floating-point sums depend on their order, and the order of a BLAS or
vectorised reduction depends on all of those; so:

Gram matrix: exact integer arithmetic on a fixed-point copy of each update.
    Each client's update is rounded to a grid of 2^(e_k − b), where 2^e_k is the smallest power
    of two ≥ max_l |Δ_k[l]|:  q_k = round(Δ_k · 2^(b − e_k)), integers with |q_k| ≤ 2^b. The
    scaling is by a power of two (exact) and the rounding is IEEE round-half-even: the same on
    every machine. b = `gram_bits(P)` is chosen so that every partial sum of products is an exact
    integer: 2b + log2(block) ≤ 53 for the float64 GEMM over a block of at most 2^16 columns, and
    2b + log2(P) ≤ 62 for the int64 sum across blocks. Integer sums are exact in any order, so
    the GEMM, a pairwise loop, any block size and any thread count give the same Gq = Q Qᵀ; then
    G_ij = float64(Gq_ij) · 2^(e_i + e_j − 2b) (one rounding, then an exact scaling).
    b = 18 for P between 2^16 and 2^26 (PoseResNet-50 has P ≈ 2^25); up to 22 for small P.
Precision: each element of Δ_k moves by at most 2^(e_k − b − 1) ≤ 2^−b · max|Δ_k| (3.8e-6 of
    the client's largest element at b = 18; elements below half a grid step become 0). For
    updates whose elements are not dominated by a few outliers the relative error of a cosine is
    about 2^−b · max|Δ_k| / (√12 ‖Δ_k‖), far below float32 rounding; its worst case (one huge
    element, every other one just below the grid) is 2^−b √P.
Weighted sum: float32, c_k rounded to float32 once, then for every block of columns
    out += c_k · Δ_k for k = 0..K−1 in that order, as one multiply and one add (each rounded
    once, no fused multiply-add, whose use differs between vectorised and scalar code paths).
The K x K work in fl/harmonize.py and the strategies uses only correctly rounded float64
operations (+ − × ÷ √), sums in a fixed order (`ordered_sum`), and `acos`/`exp` from exact
integer arithmetic (`det_acos`, `det_exp`), never a BLAS product or a libm that may differ
between instruction sets.

Local training is another matter: convolutions and their gradients are not bit-reproducible
across instruction sets or thread counts, so whole runs are reproducible bit for bit only on the
same CPU family with the same thread count (docs/algorithms.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from mpmath.libmp import from_float, mpf_acos, mpf_exp, to_float

# Most columns per block of the Gram product: it bounds the float64 partial sums (see gram_bits).
MAX_BLOCK = 1 << 16
# Columns per block on the CPU: the block's float64 copy (K x 2^14 x 8 bytes, 2 MiB at K = 16,
# 13 MiB at K = 100) stays in the cache while the GEMM reads it. Any block size, any tile size
# and any sum block give the same bits, so the sizes are chosen per device for speed alone.
GEMM_BLOCK = 1 << 14
# Rows per tile of the GEMM on the CPU: from 2 tiles on, only tile pairs on or above the diagonal
# are multiplied, which saves up to half of the work at large K.
_TILE = 32
# Columns per block of the weighted sum on the CPU: the output block and one product stay in the
# L2 cache.
_SUM_BLOCK = 1 << 16
# Gram paths: one float64 GEMM per block, or int64 dot products pair by pair (the check).
GRAM_PATHS = ("gemm", "pairwise")


def gram_bits(p: int) -> int:
    """Bits b of the fixed-point grid for P columns: exact float64 blocks and int64 totals."""
    if p <= 1:
        return 26
    block_bits = math.ceil(math.log2(min(p, MAX_BLOCK)))
    total_bits = math.ceil(math.log2(p))
    return min((53 - block_bits) // 2, (62 - total_bits) // 2)


def gram_record(p: int) -> dict:
    """What metrics.jsonl records about how the Gram matrix was computed."""
    b = gram_bits(p)
    return {"path": "fixed-point int64", "bits": b, "rel_step": 2.0**-b}


def _exponents(deltas: torch.Tensor) -> list[int]:
    """e_k with max|Δ_k| ≤ 2^e_k (0 for a zero row): max is exact, whatever the order."""
    if deltas.shape[1] == 0:
        return [0] * deltas.shape[0]
    lo, hi = deltas.aminmax(dim=1)
    out = []
    for k, m in enumerate(torch.maximum(hi, -lo).tolist()):
        if not math.isfinite(m):
            raise ValueError(f"client update {k} is not finite: no Gram matrix")
        out.append(math.frexp(m)[1] if m > 0 else 0)
    return out


def _quantize(block: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """round(block · 2^shift) row by row, as float64 integers (the scaling is exact)."""
    return block.to(torch.float64).mul_(shifts).round_()


def _on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _gemm_sizes(deltas: torch.Tensor, block: int | None, tile: int | None) -> tuple[int, int]:
    """The Gram product's (block, tile), the device's defaults where not given."""
    if block is None:
        block = GEMM_BLOCK if _on_cpu(deltas) else MAX_BLOCK
    if tile is None:
        tile = _TILE if _on_cpu(deltas) else max(deltas.shape[0], 1)
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"Gram block must be between 1 and {MAX_BLOCK} columns, got {block}")
    if tile < 1:
        raise ValueError(f"Gram tile must hold at least one row, got {tile}")
    return block, tile


def gram_matrix(
    deltas: torch.Tensor,
    *,
    block: int | None = None,
    tile: int | None = None,
    path: str = "gemm",
    bits: int | None = None,
) -> torch.Tensor:
    """G = D Dᵀ (K x K, float64, on the CPU) of the fixed-point updates: the same bits for every
    `block` (≤ MAX_BLOCK columns), `tile` (rows), `path`, thread count, instruction set and
    device. Strided views (e.g. one layer's columns) are read in place; extra memory is one
    block of K x `block` float64 values.

    Defaults: on the CPU, blocks that stay in the cache and tiles of 32 rows; on an accelerator,
    the largest block and one tile, since there every small GEMM costs a kernel launch.

    `bits` overrides the grid (`gram_bits` of the columns): a sketch of updates of length P
    (fl/sketch.py) uses the grid of P, which also keeps its sums exact since it has at most P
    non-zero columns."""
    if path not in GRAM_PATHS:
        raise ValueError(f"unknown Gram path {path!r}; use one of {GRAM_PATHS}")
    k, p = deltas.shape
    block, tile = _gemm_sizes(deltas, block, tile)
    b = gram_bits(p) if bits is None else bits
    exps = _exponents(deltas)
    shifts = torch.tensor(
        [[math.ldexp(1.0, b - e)] for e in exps], dtype=torch.float64, device=deltas.device
    )
    total = torch.zeros(k, k, dtype=torch.int64, device=deltas.device)
    tiles = [(t, min(t + tile, k)) for t in range(0, k, tile)]
    for start in range(0, p, block):
        q = _quantize(deltas[:, start : start + block], shifts)
        if path == "gemm":
            # integers up to 2^53 are exact in float64, so no GEMM order can round them
            for a, (a0, a1) in enumerate(tiles):
                for b0, b1 in tiles[a:]:
                    total[a0:a1, b0:b1] += (q[a0:a1] @ q[b0:b1].T).to(torch.int64)
        else:
            qi = q.to(torch.int64)
            for i in range(k):
                for j in range(i, k):
                    total[i, j] += int((qi[i] * qi[j]).sum())
    if path == "pairwise" or len(tiles) > 1:  # only the upper triangle was summed
        total = total.triu() + total.triu(1).T
    scale = torch.tensor(
        [[math.ldexp(1.0, ei + ej - 2 * b) for ej in exps] for ei in exps], dtype=torch.float64
    )
    return total.cpu().to(torch.float64) * scale


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> of the fixed-point vectors of length P: the same value `gram_matrix` gives for
    that pair (the direct reference loop's inner product, reproducible like the Gram matrix)."""
    p = a.shape[0]
    bits = gram_bits(p)
    ea, eb = _exponents(a[None])[0], _exponents(b[None])[0]
    sa = torch.tensor(math.ldexp(1.0, bits - ea), dtype=torch.float64, device=a.device)
    sb = torch.tensor(math.ldexp(1.0, bits - eb), dtype=torch.float64, device=b.device)
    total = 0
    for start in range(0, p, MAX_BLOCK):
        qa = _quantize(a[start : start + MAX_BLOCK], sa)
        qb = _quantize(b[start : start + MAX_BLOCK], sb)
        total += int(torch.dot(qa, qb))  # exact: every partial sum is an integer below 2^53
    return float(total) * math.ldexp(1.0, ea + eb - 2 * bits)


# ----------------------------------------------------------------------------------- K x K math
def ordered_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum along `axis` strictly in index order (elementwise adds), the same bits everywhere;
    numpy's and torch's reductions pick their order by vector width."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1])
    total = x[..., 0].copy()
    for i in range(1, x.shape[-1]):
        total = total + x[..., i]
    return total


def det_acos(x: float) -> float:
    """acos rounded to the nearest float64 from exact integer arithmetic (mpmath): libm's acos
    has instruction-set variants that may differ in the last bit."""
    return to_float(mpf_acos(from_float(float(x)), 53, "n"))


def det_exp(x: float) -> float:
    """exp rounded to the nearest float64 from exact integer arithmetic (see `det_acos`)."""
    return to_float(mpf_exp(from_float(float(x)), 53, "n"))


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines (float64) from a Gram matrix; 0 wherever a vector is zero."""
    g = gram.detach().to(torch.float64).cpu().numpy()
    norms = np.sqrt(np.maximum(np.diagonal(g, axis1=-2, axis2=-1), 0.0))
    outer = norms[..., :, None] * norms[..., None, :]
    cos = np.where(outer > 0, g / np.where(outer > 0, outer, 1.0), 0.0)
    return torch.from_numpy(np.clip(cos, -1.0, 1.0))


def conflict_share(cosine: torch.Tensor, tau: float = 0.0) -> float:
    """Share of client pairs i < j with cos(Δ_i, Δ_j) < tau (0.0 with fewer than two clients)."""
    k = cosine.shape[-1]
    if k < 2:
        return 0.0
    iu = torch.triu_indices(k, k, offset=1)
    return int((cosine[iu[0], iu[1]] < tau).sum()) / (k * (k - 1) // 2)


# ----------------------------------------------------------------------------------- weighted sum
def weighted_sum(
    deltas: torch.Tensor,
    coef: torch.Tensor,
    add_to: torch.Tensor | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Σ_k coef_k Δ_k, added in place to `add_to` when given (then returned): per block of
    columns, out += c_k · Δ_k for k in order, each product and each sum rounded once. Extra
    memory: one block (by default 2^16 columns on the CPU, all P on an accelerator, where each
    block costs 2K kernel launches); every block size gives the same bits."""
    k, p = deltas.shape
    c = [float(x) for x in torch.as_tensor(coef).to(deltas.dtype).tolist()]
    if len(c) != k:
        raise ValueError(f"{len(c)} coefficients for {k} client updates")
    if block is None:
        block = _SUM_BLOCK if _on_cpu(deltas) else max(p, 1)
    if block < 1:
        raise ValueError(f"weighted-sum block must hold at least one column, got {block}")
    out = torch.zeros(p, dtype=deltas.dtype, device=deltas.device) if add_to is None else add_to
    product = torch.empty(min(p, block), dtype=deltas.dtype, device=deltas.device)
    for start in range(0, p, block):
        end = min(start + block, p)
        acc, tmp = out[start:end], product[: end - start]
        for i in range(k):
            torch.mul(deltas[i, start:end], c[i], out=tmp)
            acc.add_(tmp)
    return out
