"""Which tensors of a model are aggregated how, and the flat-vector views strategies work on.

Trainable floating-point parameters are "updates" (Δ = w_client − w_base) that strategies may
weight and project. BatchNorm running statistics and counters are not gradients: the server
averages them by sample count. Under FedBN every tensor of a BatchNorm module (selected by module
type, not by name) stays on its client; the server only keeps an n-weighted average of them so the
global model can be evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn


@dataclass(frozen=True)
class ModelLayout:
    agg_names: tuple[str, ...]  # trainable float tensors the strategy aggregates, in model order
    avg_names: tuple[str, ...]  # tensors averaged by sample count (BN statistics; FedBN: all BN)
    local_names: tuple[str, ...]  # tensors a client keeps for itself (FedBN: all BN tensors)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @cached_property  # asked for once per reply: computed once per layout
    def slices(self) -> list[tuple[str, int, int]]:
        out, start = [], 0
        for name in self.agg_names:
            size = 1
            for d in self.shapes[name]:
                size *= d
            out.append((name, start, start + size))
            start += size
        return out

    @cached_property
    def agg_set(self) -> frozenset[str]:
        return frozenset(self.agg_names)

    @cached_property
    def avg_groups(self) -> list[list[str]]:
        """avg_names grouped by dtype, the order `pack_float64` packs them in."""
        return dtype_groups(self.dtypes, self.avg_names)


def batchnorm_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
            names.update(prefix + n for n, _ in module.named_buffers(recurse=False))
    return names


def model_layout(model: nn.Module, keep_bn_local: bool = False) -> ModelLayout:
    bn = batchnorm_names(model)
    state = model.state_dict()
    trainable = [
        n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()
    ]
    if keep_bn_local:
        agg = tuple(n for n in trainable if n not in bn)
        local = tuple(n for n in state if n in bn)
        avg = local
    else:
        agg = tuple(trainable)
        local = ()
        avg = tuple(n for n in state if n not in set(trainable))
    return ModelLayout(
        agg,
        avg,
        local,
        {n: tuple(t.shape) for n, t in state.items()},
        {n: t.dtype for n, t in state.items()},
    )


def flatten(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    if not names:
        return torch.zeros(0)
    return torch.cat([state[n].detach().reshape(-1).float() for n in names])


def unflatten_add_(state: dict[str, torch.Tensor], layout: ModelLayout, flat: torch.Tensor) -> None:
    """state[name] += the matching slice of flat, in place, for every aggregated tensor."""
    for name, start, end in layout.slices:
        state[name].add_(flat[start:end].view_as(state[name]).to(state[name].dtype))


def rows_of_one_matrix(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The (K, P) matrix whose consecutive rows the K vectors `rows` already are, in order, or
    None. The in-process transport writes a round's updates so: the server aggregates that
    matrix as it is instead of copying every update into a new one."""
    first = rows[0]
    p = first.numel()
    storage = first.untyped_storage().data_ptr()
    for i, row in enumerate(rows):
        if (
            row.dim() != 1
            or row.numel() != p
            or row.stride() != (1,)
            or row.dtype != first.dtype
            or row.untyped_storage().data_ptr() != storage
            or row.storage_offset() != first.storage_offset() + i * p
        ):
            return None
    return first.as_strided((len(rows), p), (p, 1))


def dtype_groups(dtypes: dict[str, torch.dtype], names: tuple[str, ...]) -> list[list[str]]:
    """The names grouped by dtype, groups in order of first appearance."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in names:
        by_dtype.setdefault(dtypes[name], []).append(name)
    return list(by_dtype.values())


def pack_float64(tensors: dict[str, torch.Tensor], groups: list[list[str]]) -> torch.Tensor:
    """The tensors named in `groups` (see dtype_groups) as one float64 vector, group by group:
    a few ops per client instead of one per tensor. Exact: float32 and the BatchNorm counters
    are representable in float64, before or after the cat."""
    if not groups:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([_cat_flat([tensors[n] for n in group]).double() for group in groups]).detach()


def _cat_flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # a reshape costs as much as the copy of a BatchNorm vector: only the ones that need it
    if all(t.ndim == 0 for t in tensors):  # the counters
        return torch.stack(tensors)
    return torch.cat([t if t.ndim == 1 else t.reshape(-1) for t in tensors])


def weighted_average(
    tensors: list[dict[str, torch.Tensor]],
    names: tuple[str, ...],
    counts: list[float],
    packed: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """n-weighted mean of each named tensor; integer tensors (BN counters) are rounded back.

    Each client's tensors are summed as one flat float64 vector (`pack_float64`, grouped by the
    first client's dtypes; pass `packed` when the caller has them already): per element the
    same operations in the same order as tensor by tensor, with a few ops per client instead of
    a few per client and tensor (100 clients x 60 BatchNorm tensors: hundreds of ops, not
    18 000).
    """
    if not names or not tensors:
        return {}
    groups = dtype_groups({n: tensors[0][n].dtype for n in names}, names)
    if packed is None:
        packed = [pack_float64(t, groups) for t in tensors]
    total = float(sum(counts))
    acc: torch.Tensor | int = 0
    for c, flat in zip(counts, packed, strict=True):
        acc = acc + float(c) / total * flat
    out = {}
    start = 0
    for name in [name for group in groups for name in group]:
        ref = tensors[0][name]
        part = acc[start : start + ref.numel()].view(ref.shape)
        start += ref.numel()
        out[name] = (
            part.to(ref.dtype, copy=True) if ref.is_floating_point() else part.round().to(ref.dtype)
        )
    return {name: out[name] for name in names}
