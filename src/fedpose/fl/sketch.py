"""CountSketch of client updates, keyed by a consortium secret: the Gram matrix without the updates.

A CountSketch of width m maps a vector x of length P to y = S x (length m): coordinate i goes to
bucket h(i) ∈ {0..m−1} with sign s(i) ∈ {−1, +1}, y_j = Σ_{i: h(i)=j} s(i) x_i. The pair (h, s)
is drawn from a keyed counter-based generator (numpy's Philox) whose key is derived from a
secret the sites share and the server never sees, together with P and m. Every site uses the
same S, so for two sites' updates

    E_S[⟨S x, S z⟩] = ⟨x, z⟩,   Var = (‖x‖²‖z‖² + ⟨x, z⟩² − 2 Σ_i x_i² z_i²) / m

(Charikar et al. 2002; Woodruff 2014, §1.2): the server estimates the Gram matrix G = D Dᵀ of the
K updates as Ĝ = Y Yᵀ from the K sketches alone, unbiased, with relative error of order 1/√m.
Sketching costs one pass over the update (O(P), one `bincount`).

When m ≥ P the hash is injective (the first P entries of a keyed permutation of the m buckets):
S is then a signed coordinate embedding, ⟨S x, S z⟩ = ⟨x, z⟩ exactly, and `sketch_gram` returns
the bits `gram_matrix` gives on the updates themselves (same fixed-point grid, same integers) —
the identity check of the secure path.

Without the secret the server does not know which coordinates share a bucket, so it cannot map a
sketch back onto parameters; what it learns is what the Gram matrix says (norms and angles of the
updates) plus the m bucket sums (docs/security.md).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

from fedpose.fl.gram import gram_bits, gram_matrix

# the key derivation's domain separation: a sketch key is never any other key of the consortium
_DOMAIN = b"fedpose-countsketch-v1"


def sketch_key(secret: str, p: int, m: int) -> list[int]:
    """Philox's 128-bit key (two 64-bit words) from the secret, P and m."""
    if not secret:
        raise ValueError("the sketch needs a non-empty consortium secret")
    digest = hashlib.sha256(b"|".join([_DOMAIN, secret.encode(), b"%d" % p, b"%d" % m])).digest()
    return [int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")]


@lru_cache(maxsize=4)
def _hash(secret: str, p: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket of each coordinate, its sign as ±1.0) for this secret, P and m."""
    if m < 1:
        raise ValueError(f"sketch width must be at least 1, got {m}")
    gen = np.random.Generator(np.random.Philox(key=np.array(sketch_key(secret, p, m), np.uint64)))
    if m >= p:  # injective: a signed coordinate embedding, inner products are exact
        buckets = gen.permutation(m)[:p]
    else:
        buckets = gen.integers(0, m, size=p)
    signs = gen.integers(0, 2, size=p).astype(np.float64) * 2.0 - 1.0
    buckets.setflags(write=False)
    signs.setflags(write=False)
    return buckets, signs


def count_sketch(x: torch.Tensor | np.ndarray, m: int, secret: str) -> torch.Tensor:
    """S x: the (m,) float64 CountSketch of a flat update under the consortium secret.

    float32 inputs are widened exactly; each bucket sums its coordinates in index order
    (`bincount`), so the same update and secret give the same bits on every site."""
    flat = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    flat = flat.reshape(-1).astype(np.float64)
    buckets, signs = _hash(secret, flat.size, m)
    return torch.from_numpy(np.bincount(buckets, weights=signs * flat, minlength=m))


def sketch_gram(sketches: torch.Tensor, p: int) -> torch.Tensor:
    """Ĝ = Y Yᵀ (K x K float64) from the K sketches of updates of length P, on the fixed-point
    grid the exact Gram matrix of length-P updates uses (`gram_bits(P)`): with an injective
    sketch (m ≥ P) it is bit-equal to `gram_matrix` of the updates."""
    return gram_matrix(sketches.to(torch.float64), bits=gram_bits(p))


def sketch_bytes(m: int) -> int:
    """What one sketch costs on the wire (float64 values)."""
    return 8 * m
