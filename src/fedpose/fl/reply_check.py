"""What the server checks before it lets a client's reply touch the global model.

A reply comes from a machine the server does not control: it may be empty, non-finite, of the
wrong length, shape or dtype, or finite but absurdly large (one update of norm 1e30 ruins every
later round). Each check returns the reason a reply is refused, or None when it is sound.

The norm check compares an update's L2 norm with a reference: the median norm of recently
accepted updates, or, before any was accepted, the smallest norm among the candidates at hand,
and never more than the scale of the model the federation started from (the initial model's
norm). So the candidates can never set their own reference: even a round in which every update
is huge, or a history grown by small steps, meets the initial model's scale. An update more
than `max_norm_ratio` times the reference is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedpose.fl.messages import TrainReply
from fedpose.fl.params import ModelLayout, pack_float64

NORM_HISTORY = 32  # accepted update norms the reference is taken over


def check_reply(
    reply: TrainReply, layout: ModelLayout, weights: dict[str, torch.Tensor]
) -> tuple[str | None, float]:
    """(why the reply cannot be used at all, or None; its update's L2 norm).

    Refused: a failure, a wrong length, shape or dtype, a bad sample count, non-finite values.
    A sound reply keeps its averaged tensors packed in `reply.averaged_flat` for the server's
    weighted average.
    """
    if reply.error:
        return reply.error, math.nan
    delta = reply.delta
    if not isinstance(delta, torch.Tensor):
        return "no update", math.nan
    expected = layout.slices[-1][2] if layout.agg_names else 0
    if delta.dtype != torch.float32:
        return f"update of dtype {delta.dtype}, expected torch.float32", math.nan
    if delta.dim() != 1 or delta.numel() != expected:
        return f"update of shape {tuple(delta.shape)}, expected ({expected},)", math.nan
    problem = _averaged_problem(reply.averaged, layout.avg_names, weights)
    if problem:
        return problem, math.nan
    if isinstance(reply.num_samples, bool) or not isinstance(reply.num_samples, int):
        return f"sample count {reply.num_samples!r} is not an integer", math.nan
    if reply.num_samples <= 0:
        return "no training samples", math.nan
    # the norm doubles as the finiteness check, a pass cheaper than isfinite: float32 values
    # squared and summed in float64 cannot overflow, so the norm is finite iff every value is
    norm = update_norm(reply)
    if not math.isfinite(norm):
        return "non-finite values in the update", norm
    flat = pack_float64(reply.averaged, layout.avg_groups)
    if not bool(torch.isfinite(flat).all()):
        bad = next(n for n, t in reply.averaged.items() if not bool(torch.isfinite(t).all()))
        return f"non-finite values in {bad}", norm
    reply.averaged_flat = flat
    return _control_problem(reply.control_delta, expected), norm


def _averaged_problem(
    averaged: dict, names: tuple[str, ...], weights: dict[str, torch.Tensor]
) -> str | None:
    """Why a reply's averaged tensors do not fit the model (names, types, shapes, dtypes)."""
    if averaged.keys() != set(names):
        missing = sorted(set(names) - set(averaged))
        extra = sorted(set(averaged) - set(names))
        return f"averaged tensors differ from the model's: missing {missing[:3]}, extra {extra[:3]}"
    # all shapes and dtypes compared as two lists (dozens of BatchNorm tensors per reply); the
    # loop below only names the first that differs
    found = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else None for t in averaged.values()]
    if found == [(weights[n].shape, weights[n].dtype) for n in averaged]:
        return None
    for name, t in averaged.items():
        ref = weights[name]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{name}: {got}, expected {tuple(ref.shape)} {ref.dtype}"
    return None


def _control_problem(control: torch.Tensor | None, expected: int) -> str | None:
    """What is wrong with a reply's SCAFFOLD control change (absent is fine)."""
    if control is None:
        return None
    if (
        not isinstance(control, torch.Tensor)
        or control.dtype != torch.float32
        or tuple(control.shape) != (expected,)
    ):
        return f"control variate change is not a ({expected},) float32 vector"
    if not bool(torch.isfinite(control).all()):
        return "non-finite values in the control variate change"
    return None


def update_norm(reply: TrainReply) -> float:
    return float(torch.linalg.vector_norm(reply.delta.double()))


def norm_reference(
    history: Sequence[float], candidate_norms: Sequence[float], scale: float | None = None
) -> float | None:
    """The norm an update is compared with: the (lower) median of the accepted history, else
    the smallest candidate, capped by `scale` (the initial model's norm); None when there is
    nothing to compare with."""
    if history:
        values = sorted(history)
        found: float | None = values[(len(values) - 1) // 2]
    else:
        # a client that did not move (norm 0) is no yardstick for the others
        found = min((n for n in candidate_norms if n > 0), default=None)
    if scale is not None and scale > 0 and math.isfinite(scale):
        return scale if found is None else min(found, scale)
    return found


def model_norm(weights: dict[str, torch.Tensor], names: Sequence[str]) -> float:
    """The L2 norm of the named tensors (the aggregated ones: BatchNorm statistics left out)."""
    total = sum(float(torch.linalg.vector_norm(weights[n].double())) ** 2 for n in names)
    return math.sqrt(total)


def norm_problem(norm: float, reference: float | None, max_ratio: float) -> str | None:
    """Why an update's norm is an outlier, or None (also when the check is off: ratio 0)."""
    if max_ratio <= 0 or reference is None or not math.isfinite(norm):
        return None
    # a zero reference (clients that did not move) would make any movement an outlier
    if reference > 0 and norm > max_ratio * reference:
        return (
            f"update norm {norm:.3g} is more than {max_ratio:g} times the reference "
            f"{reference:.3g} (fed.max_norm_ratio)"
        )
    return None
