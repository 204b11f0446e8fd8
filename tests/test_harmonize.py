"""Gradient harmonization: the Gram-matrix method must equal the plain vector loop."""

from __future__ import annotations

import math

import pytest
import torch

from fedpose.fl.gram import conflict_share, cosine_from_gram, gram_matrix
from fedpose.fl.harmonize import harmonize, pair_order, projection_coefficients, visit_orders

P = 257


def _deltas(case: str, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(k, 1, generator=gen) * 3 + 0.1
    if case == "random":
        return torch.randn(k, P, generator=gen) * scales
    if case == "no_conflict":  # positive entries: every inner product is positive
        return torch.rand(k, P, generator=gen) * scales
    if case == "all_conflict":  # centred simplex: <Δ_i, Δ_j> < 0 for every pair
        q, _ = torch.linalg.qr(torch.randn(P, k, generator=gen, dtype=torch.float64))
        simplex = torch.eye(k, dtype=torch.float64) - 1.0 / k
        d = (simplex @ q.T).float() * scales
        return d + 1e-3 * torch.randn(k, P, generator=gen) / P**0.5
    if case == "zero":
        d = torch.randn(k, P, generator=gen)
        d[0] = 0
        d[k - 1] = 0 if k > 2 else d[k - 1]
        return d
    if case == "duplicated":
        d = torch.randn(k, P, generator=gen)
        d[1] = d[0]
        if k > 2:
            d[2] = -d[0]  # an exact opposite as well
        return d
    raise AssertionError(case)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("k", [2, 3, 8, 16])
@pytest.mark.parametrize("variant", ["pcgrad", "symmetric"])
@pytest.mark.parametrize("order", ["index", "random"])
@pytest.mark.parametrize("case", ["no_conflict", "all_conflict", "zero", "duplicated", "random"])
def test_gram_equals_direct(k, variant, order, case):
    d = _deltas(case, k, seed=k)
    w = torch.rand(k, dtype=torch.float64) + 0.1
    kw = {"variant": variant, "order": order, "seed": 7}
    fast = harmonize(d, w, method="gram", **kw)
    ref = harmonize(d, w, method="direct", **kw)
    assert torch.isfinite(fast).all()
    # relative to the size of what is summed: near-opposite updates cancel to almost nothing,
    # and there float32 rounding of the inputs, not the method, sets the error
    scale = float((w * d.double().norm(dim=1)).sum())
    assert float((fast - ref).norm()) <= 1e-5 * max(float(ref.norm()), scale)


def test_all_conflict_case_really_conflicts():
    cos = cosine_from_gram(gram_matrix(_deltas("all_conflict", 8)))
    assert conflict_share(cos) == 1.0


@pytest.mark.parametrize("variant", ["pcgrad", "symmetric"])
@pytest.mark.parametrize("method", ["gram", "direct"])
def test_single_client_is_its_weighted_update(variant, method):
    d = torch.randn(1, P)
    out = harmonize(d, torch.tensor([0.7]), variant=variant, method=method)
    torch.testing.assert_close(out, 0.7 * d[0])


@pytest.mark.parametrize("method", ["gram", "direct"])
def test_pcgrad_by_hand_2d(method):
    # Δ1 = (1, 0), Δ2 = (−1, 1): <Δ1, Δ2> = −1
    # ĝ1 = Δ1 + 1/2 Δ2 = (0.5, 0.5);  ĝ2 = Δ2 + 1/1 Δ1 = (0, 1)
    d = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = harmonize(d, w, variant="pcgrad", order="index", method=method)
    torch.testing.assert_close(out, torch.tensor([0.25, 0.75]))
    # with K = 2 the symmetric rule gives the same pair of projections
    sym = harmonize(d, w, variant="symmetric", order="index", method=method)
    torch.testing.assert_close(sym, torch.tensor([0.25, 0.75]))


@pytest.mark.parametrize("method", ["gram", "direct"])
def test_pcgrad_result_is_orthogonal_to_the_conflicting_update(method):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(P, generator=gen)
    b = -a + 0.5 * torch.randn(P, generator=gen)
    d = torch.stack([a, b])
    assert float(a @ b) < 0
    g1 = harmonize(d, torch.tensor([1.0, 0.0]), variant="pcgrad", method=method)
    assert abs(float(g1 @ b)) <= 1e-5 * float(g1.norm() * b.norm())
    assert float(g1 @ a) > 0  # what is left still points along Δ1


def test_no_conflict_leaves_updates_untouched():
    d = _deltas("no_conflict", 5)
    w = torch.rand(5, dtype=torch.float64)
    for variant in ("pcgrad", "symmetric"):
        out = harmonize(d, w, variant=variant)
        torch.testing.assert_close(out, d.T @ w.float())


def _symmetric_reference(vectors, pairs):
    """The paper's loop written out on Python lists: an independent check of the symmetric rule."""
    g = [list(v) for v in vectors]

    def dot(x, y):
        return sum(a * b for a, b in zip(x, y, strict=True))

    for i, j in pairs:
        d = dot(g[i], g[j])
        if d < 0:
            gi, gj = list(g[i]), list(g[j])
            g[i] = [x - d / dot(gj, gj) * y for x, y in zip(g[i], gj, strict=True)]
            g[j] = [x - d / dot(gi, gi) * y for x, y in zip(g[j], gi, strict=True)]
    return g


@pytest.mark.parametrize("order", ["index", "random"])
def test_symmetric_rule_matches_hand_loop(order):
    vectors = [[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.3, -0.9, 0.5]]
    ref = _symmetric_reference(vectors, pair_order(3, order, seed=5))
    d = torch.tensor(vectors)
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = 1
        for method in ("gram", "direct"):
            got = harmonize(d, e, variant="symmetric", order=order, seed=5, method=method)
            torch.testing.assert_close(got, torch.tensor(ref[k]), atol=1e-6, rtol=1e-5)


def test_variants_differ_when_projections_chain():
    d = torch.tensor([[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.3, -0.9, 0.5]])
    w = torch.ones(3, dtype=torch.float64) / 3
    a = harmonize(d, w, variant="pcgrad", order="index")
    b = harmonize(d, w, variant="symmetric", order="index")
    assert _rel(a, b) > 1e-3


def test_orders_are_seeded_permutations():
    orders = visit_orders(6, "random", seed=3)
    assert orders == visit_orders(6, "random", seed=3)
    assert orders != visit_orders(6, "random", seed=4)
    for k, visits in enumerate(orders):
        assert sorted(visits) == [j for j in range(6) if j != k]
    assert visit_orders(3, "index") == [[1, 2], [0, 2], [0, 1]]
    pairs = pair_order(5, "random", seed=1)
    assert sorted(pairs) == pair_order(5, "index")


def test_batched_coefficients_equal_one_at_a_time():
    grams = torch.stack([gram_matrix(_deltas("random", 6, seed=s)) for s in range(3)])
    for variant in ("pcgrad", "symmetric"):
        batch = projection_coefficients(grams, variant=variant, order="random", seed=2)
        for g, c in zip(grams, batch, strict=True):
            one = projection_coefficients(g, variant=variant, order="random", seed=2)
            torch.testing.assert_close(c, one)


@pytest.mark.parametrize("path", ["gemm", "pairwise"])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_large_gram_is_accurate(path, k):
    gen = torch.Generator().manual_seed(k)
    d = torch.randn(k, (1 << 18) + 4321, generator=gen)  # several blocks and a ragged tail
    d[k - 1] = -d[0] + 1e-2 * d[k - 1]
    for x in (d, d[:, 1001:-77]):  # also a strided view of some columns
        r = x.double() @ x.double().T
        g = gram_matrix(x, path=path)
        assert torch.equal(g, g.T)
        assert float((g - r).abs().max() / r.abs().max()) < 5e-6


@pytest.mark.slow  # a second of large products: make test-slow
def test_gram_equals_direct_at_scale():
    # both paths on a few million columns: the direct loop's dot products must not drift either
    d = _deltas("random", 6).repeat(1, 8000) + 0.3 * _deltas("no_conflict", 6).repeat(1, 8000)
    w = torch.rand(6, dtype=torch.float64)
    fast = harmonize(d, w, order="index")
    ref = harmonize(d, w, order="index", method="direct")
    assert _rel(fast, ref) < 1e-5


def test_cosine_handles_zero_vectors():
    d = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    cos = cosine_from_gram(gram_matrix(d))
    assert not torch.isnan(cos).any()
    assert cos[0, 1] == 0 and cos[0, 2] == -1
    assert math.isclose(conflict_share(cos), 1 / 3)
    assert conflict_share(cosine_from_gram(gram_matrix(d[:1]))) == 0.0


def test_bad_options_are_rejected():
    d = torch.randn(2, 3)
    with pytest.raises(ValueError, match="variant"):
        harmonize(d, torch.ones(2), variant="mgda")
    with pytest.raises(ValueError, match="order"):
        harmonize(d, torch.ones(2), order="sorted")
    with pytest.raises(ValueError, match="method"):
        harmonize(d, torch.ones(2), method="fast")
