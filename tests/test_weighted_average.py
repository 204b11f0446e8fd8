"""The server's n-weighted average of BatchNorm statistics, flat or tensor by tensor: the same
bits."""

from __future__ import annotations

import torch

from fedpose.fl.params import dtype_groups, pack_float64, weighted_average


def _per_tensor(tensors, names, counts):
    total = float(sum(counts))
    out = {}
    for name in names:
        acc = sum(float(c) / total * t[name].double() for c, t in zip(counts, tensors, strict=True))
        ref = tensors[0][name]
        out[name] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out


def test_flat_average_equals_the_per_tensor_sum_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    names = ("bn.running_mean", "bn.num_batches_tracked", "bn2.running_var")
    tensors = [
        {
            "bn.running_mean": torch.randn(7, 3, generator=gen),
            "bn.num_batches_tracked": torch.randint(0, 100, (), generator=gen),
            "bn2.running_var": torch.rand(5, generator=gen, dtype=torch.float64),
        }
        for _ in range(13)
    ]
    counts = [float(x) for x in torch.randint(1, 50, (13,), generator=gen)]
    flat = weighted_average(tensors, names, counts)
    reference = _per_tensor(tensors, names, counts)
    for name in names:
        assert flat[name].dtype == reference[name].dtype
        assert flat[name].shape == reference[name].shape
        assert torch.equal(flat[name], reference[name])
    groups = dtype_groups({n: tensors[0][n].dtype for n in names}, names)
    packed = [pack_float64(t, groups) for t in tensors]
    given = weighted_average(tensors, names, counts, packed=packed)
    assert all(torch.equal(given[name], reference[name]) for name in names)
    assert weighted_average(tensors, (), counts) == {}
