"""Every strategy's aggregate of one fixed set of client updates, as SHA-256 digests.

Run as a script (`python tests/aggregate_digest.py`) it prints them as JSON, so a test can
compare them between processes started with different instruction sets enabled.
"""

from __future__ import annotations

import hashlib
import json

import torch

from fedpose.config import FedConfig
from fedpose.fl.strategies import build_strategy
from fedpose.fl.strategies.base import RoundInput

CASES = {
    "fedavg": {},
    "feddyn": {},
    "fedaw": {},
    "fedgh": {},
    "fedgh-symmetric": {"gh_variant": "symmetric"},
    "fedgh-per-layer-rescale": {"gh_per_layer": True, "gh_rescale": True},
    "fedgh-direct": {"gh_method": "direct"},
    "fedgh-noaw": {},
}


def _uniform(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, 1) on a grid of 2^-20: drawn as integers, which every instruction set
    draws alike (the float samplers use vectorised log/sin/cos that do not)."""
    return torch.randint(-(2**20), 2**20, shape, generator=gen).float() * 2.0**-20


def client_updates(k: int = 6, p: int = 400_003, seed: int = 0) -> RoundInput:
    """Updates of unequal sizes around one shared direction: some pairs conflict, some agree;
    one client has a few large elements, as a layer with larger updates would give."""
    gen = torch.Generator().manual_seed(seed)
    shared = _uniform((p,), gen)
    strength = torch.tensor([-0.75, -0.25, 0.0, 0.25, 0.5, 1.0])[:k]
    scale = torch.tensor([2.0**-e for e in range(3, 3 + k)])
    deltas = (_uniform((k, p), gen) + strength[:, None] * shared) * scale[:, None]
    deltas[2, :50] *= 40.0
    counts = torch.tensor([30.0, 55.0, 12.5, 80.0, 41.0, 23.0], dtype=torch.float64)[:k]
    cut = p // 3
    return RoundInput(
        deltas=deltas,
        counts=counts,
        client_ids=[3, 5, 8, 9, 11, 12][:k],
        num_clients=12,
        slices=[("a", 0, cut), ("b", cut, p)],
    )


def start_weights(p: int = 400_003) -> torch.Tensor:
    return (torch.arange(p, dtype=torch.float32) - p // 2) * 2.0**-17


def aggregates(
    rounds: int = 2, names: tuple[str, ...] = tuple(CASES), p: int = 400_003
) -> dict[str, torch.Tensor]:
    """Each case's update after `rounds` aggregations (FedAW's running angles and FedDyn's h
    carry over) of `p` parameters, applied to the same global weights."""
    out = {}
    for name in names:
        options = CASES[name]
        method = name if name in ("fedavg", "feddyn", "fedaw", "fedgh-noaw") else "fedgh"
        strategy = build_strategy(FedConfig(method=method, **options), seed=4)
        state = strategy.initial_state()
        w = start_weights(p)
        for r in range(rounds):
            inputs = client_updates(p=p, seed=r)
            result = strategy.aggregate(inputs, state)
            state = result.state
            w = w + result.update
        out[name] = w
    return out


def digests() -> dict[str, str]:
    return {
        name: hashlib.sha256(w.numpy().tobytes()).hexdigest() for name, w in aggregates().items()
    }


if __name__ == "__main__":
    print(
        json.dumps(
            {
                "capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "digests": digests(),
            }
        )
    )
