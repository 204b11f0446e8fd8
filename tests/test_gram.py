"""Aggregation adds no machine dependence: the same client updates give the same bits whatever the
Gram path, block size, thread count or instruction set."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from aggregate_digest import aggregates, start_weights

import fedpose
from fedpose.fl import gram as gram_module
from fedpose.fl import harmonize as harmonize_module
from fedpose.fl.gram import (
    MAX_BLOCK,
    det_acos,
    det_exp,
    exact_dot,
    gram_bits,
    gram_matrix,
    ordered_sum,
    weighted_sum,
)
from fedpose.fl.strategies import fedaw as fedaw_module
from fedpose.fl.strategies import fedgh as fedgh_module


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _updates(k: int = 7, p: int = 200_003, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(k, p, generator=gen) * torch.logspace(-4, 1, k)[:, None]
    d[1] = 0  # a client that did not move
    d[3, :10] *= 1e3  # a few outliers set this client's grid
    d[k - 1] = -d[0] + 1e-3 * d[k - 1]  # nearly opposite to client 0
    return d


@pytest.mark.parametrize("p", [1, 2, 257, 65_536, 65_537, 34_000_000, 2**31])
def test_grid_keeps_every_partial_sum_exact(p):
    b = gram_bits(p)
    # |q| ≤ 2^b: a block's sum of products must stay an exact float64 integer, the total an int64
    assert 2 * b + math.ceil(math.log2(min(max(p, 2), MAX_BLOCK))) <= 53
    assert 2 * b + math.ceil(math.log2(max(p, 2))) <= 62
    assert b >= 15


def test_gram_is_the_exact_gram_of_the_rounded_updates():
    d = _updates(k=4, p=300)
    b = gram_bits(300)
    rows = []
    for row in d.tolist():
        top = max(abs(x) for x in row)
        e = math.frexp(top)[1] if top > 0 else 0
        # exact rationals; round() of a Fraction rounds half to even, like the IEEE default
        rows.append(([round(Fraction(x) * Fraction(2) ** (b - e)) for x in row], e))
    expected = [
        [
            float(
                sum(x * y for x, y in zip(qi, qj, strict=True)) * Fraction(2) ** (ei + ej - 2 * b)
            )
            for qj, ej in rows
        ]
        for qi, ei in rows
    ]
    for path in ("gemm", "pairwise"):
        assert gram_matrix(d, path=path).tolist() == expected


def test_gram_same_bits_for_every_block_path_and_thread_count(threads):
    d = _updates()
    results = []
    for n in (1, 2):
        threads(n)
        for block in (1000, 4096, 16_384, MAX_BLOCK):
            results.append(gram_matrix(d, block=block))
        for tile in (1, 3):  # 7 tiles, 3 tiles: only the pairs on or above the diagonal
            results.append(gram_matrix(d, block=5000, tile=tile))
        results.append(gram_matrix(d, block=5000, path="pairwise"))
    for g in results[1:]:
        assert torch.equal(g, results[0])
    assert torch.equal(results[0], results[0].T)
    ref = d.double() @ d.double().T
    scale = ref.diagonal().sqrt()
    assert (
        float(
            ((results[0] - ref) / (scale[:, None] * scale[None, :]).clamp_min(1e-300)).abs().max()
        )
        < 1e-6
    )


def test_accelerator_sizes_give_the_cpu_bits():
    # an accelerator takes the largest block, one tile and one sum block (gram.py); the CPU's
    # defaults split 40 rows into tiles of 32 and 70 001 columns into blocks
    d = _updates(k=40, p=70_001)
    assert torch.equal(gram_matrix(d, block=MAX_BLOCK, tile=40), gram_matrix(d))
    c = torch.linspace(-0.5, 1.0, 40, dtype=torch.float64)
    start = torch.randn(70_001, generator=torch.Generator().manual_seed(1))
    whole = weighted_sum(d, c, start.clone(), block=70_001)
    assert torch.equal(whole, weighted_sum(d, c, start.clone()))
    assert torch.equal(whole, weighted_sum(d, c, start.clone(), block=999))
    with pytest.raises(ValueError, match="tile"):
        gram_matrix(d, tile=0)


def test_gram_of_a_strided_view_equals_the_gram_of_its_copy():
    d = _updates(k=5, p=100_000)
    view = d[:, 1234:-567]
    assert torch.equal(gram_matrix(view), gram_matrix(view.contiguous()))


def test_exact_dot_is_the_gram_entry():
    d = _updates(k=4, p=70_001)
    g = gram_matrix(d)
    for i in range(4):
        for j in range(4):
            assert exact_dot(d[i], d[j]) == float(g[i, j])


def test_non_finite_update_is_refused():
    d = torch.ones(3, 10)
    d[1, 4] = float("inf")
    with pytest.raises(ValueError, match="client update 1 is not finite"):
        gram_matrix(d)


def test_weighted_sum_is_the_float32_sum_in_client_order(threads):
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(5, 150_001, generator=gen)
    c = torch.rand(5, generator=gen, dtype=torch.float64) - 0.3
    w = torch.randn(150_001, generator=gen)
    expected = w.numpy().copy()
    for ck, row in zip(c.tolist(), d.numpy(), strict=True):
        expected = expected + np.float32(ck) * row  # numpy float32: one rounding per operation
    for n in (1, 2):
        threads(n)
        out = weighted_sum(d, c, w.clone())
        assert np.array_equal(out.numpy(), expected)


def test_ordered_sum_is_left_to_right():
    x = np.array([[1e16, 1.0, -1e16, 1.0]])
    assert ordered_sum(x)[0] == ((1e16 + 1.0) - 1e16) + 1.0


def test_exact_acos_and_exp_agree_with_libm_to_an_ulp():
    for x in np.linspace(-1.0, 1.0, 201):
        assert det_acos(x) == pytest.approx(math.acos(x), rel=3e-16, abs=1e-300)
    for x in np.linspace(-30.0, 30.0, 201):
        assert det_exp(x) == pytest.approx(math.exp(x), rel=3e-16)


@pytest.mark.slow  # seconds: every strategy at 150 001 parameters; make test-slow
def test_every_strategy_same_bits_across_gram_paths_blocks_and_threads(threads, monkeypatch):
    # 150 001 parameters: layers of 50 000 and 100 001, three blocks of the GEMM path, eight of
    # the pairwise one, and enough per block for torch to split it over two threads
    run = functools.partial(aggregates, p=150_001)
    threads(1)
    reference = run()
    threads(2)
    assert {n: torch.equal(w, reference[n]) for n, w in run().items()} == dict.fromkeys(
        reference, True
    )
    pairwise = functools.partial(gram_module.gram_matrix, path="pairwise", block=20_000)
    for module in (fedaw_module, fedgh_module, harmonize_module):
        monkeypatch.setattr(module, "gram_matrix", pairwise)
    # the direct loop computes no Gram matrix
    uses_gram = tuple(n for n in reference if n not in ("fedavg", "feddyn", "fedgh-direct"))
    assert {
        n: torch.equal(w, reference[n]) for n, w in run(names=uses_gram).items()
    } == dict.fromkeys(uses_gram, True)


def test_gram_fedgh_equals_direct_fedgh_within_rounding():
    ref = aggregates(names=("fedgh", "fedgh-direct"))
    diff = ref["fedgh"] - ref["fedgh-direct"]
    start = start_weights()
    assert float(diff.norm()) <= 1e-5 * float((ref["fedgh-direct"] - start).norm())


def _digests_in_child(env: dict[str, str]) -> dict:
    src = str(Path(fedpose.__file__).resolve().parents[1])
    tests = str(Path(__file__).resolve().parent)
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([src, tests])}
    out = subprocess.run(
        [sys.executable, str(Path(tests) / "aggregate_digest.py")],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


# The portable code paths of every library in the aggregation: torch's kernels without
# AVX2/AVX-512, MKL restricted to SSE4.2, numpy's dispatch without AVX2/FMA, glibc's libm
# without its FMA variants. Names a library does not know are ignored by it.
_PORTABLE = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "NPY_DISABLE_CPU_FEATURES": "AVX512_SKX AVX512F AVX2 FMA3",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F",
    "OMP_NUM_THREADS": "1",
}


@pytest.mark.slow  # starts fresh interpreters
def test_every_strategy_same_bits_on_other_instruction_sets():
    here = {
        name: __import__("hashlib").sha256(w.numpy().tobytes()).hexdigest()
        for name, w in aggregates().items()
    }
    portable = _digests_in_child(_PORTABLE)
    assert portable["capability"] == "DEFAULT"
    native = _digests_in_child({"OMP_NUM_THREADS": "2"})
    assert portable["digests"] == here
    assert native["digests"] == here


# whole runs, seconds each: make test-slow (the fast suite checks the paths' bits on their own)
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedaw", "fedgh"])
def test_tiny_run_same_final_weights_whatever_the_aggregation_path(
    tmp_path, synth_dir, monkeypatch, threads, method
):
    """Clients train on one thread in both runs (training itself is not reproducible across
    thread counts); the server aggregates on 1 thread with the GEMM in one run, on 2 threads
    with the pairwise path and small blocks in the other."""
    from fedtiny import tiny_config

    from fedpose.engine.runner import run_federation
    from fedpose.fl.server import FederatedServer

    threads(1)
    real = FederatedServer.aggregate

    def aggregate_with(n: int):
        def aggregate(self, replies, staleness):
            torch.set_num_threads(n)
            try:
                return real(self, replies, staleness)
            finally:
                torch.set_num_threads(1)

        return aggregate

    first = run_federation(
        tiny_config(tmp_path, synth_dir, "name=gemm", f"fed.method={method}", "fed.rounds=2")
    )
    monkeypatch.setattr(FederatedServer, "aggregate", aggregate_with(2))
    pairwise = functools.partial(gram_module.gram_matrix, path="pairwise", block=1000)
    for module in (fedaw_module, fedgh_module, harmonize_module):
        monkeypatch.setattr(module, "gram_matrix", pairwise)
    second = run_federation(
        tiny_config(tmp_path, synth_dir, "name=pairwise", f"fed.method={method}", "fed.rounds=2")
    )
    assert first.weights.keys() == second.weights.keys()
    assert all(torch.equal(first.weights[n], second.weights[n]) for n in first.weights)
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs" / "gemm" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["gram"]["path"] == "fixed-point int64" and rows[-1]["gram"]["bits"] >= 15
