"""`fedpose bench aggregate`: the cost of one server step, FedGH against FedAvg.

Every method starts from the same input, the K client updates as the server receives them (a
K x P float32 buffer, one row per client) and the global weights w (P,), and ends with the new
global model w + update written into the same preallocated buffer (`RoundInput.add_to`), so
memory policy is identical for all. Times are the minimum over the repeats, interleaved across
methods so that a burst of load elsewhere on the machine does not favour one of them. The direct
FedGH loop (K² vector passes, the reference) runs once.
"""

from __future__ import annotations

import os
import platform
import time

import torch
from rich.table import Table

from fedpose.fl.fedgh import gram_matrix, native_gram_kernel
from fedpose.fl.strategies import FedAvg, FedAW, FedGH
from fedpose.fl.strategies.base import RoundInput, Strategy
from fedpose.tools import ToolError


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _client_updates(k: int, p: int, seed: int) -> torch.Tensor:
    """Updates sharing one direction with client-specific signs and strengths: some pairs agree,
    some conflict, as on non-IID clients."""
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.empty(k, p).normal_(generator=gen)
    shared = torch.empty(p).normal_(generator=gen)
    strength = torch.empty(k).uniform_(-0.6, 1.0, generator=gen)
    for row, s in zip(deltas, strength.tolist(), strict=True):
        row.add_(shared, alpha=s)
    return deltas


def bench_aggregate(clients: int, params: int, repeats: int = 3, seed: int = 0) -> dict:
    """Time one server step of FedAvg, FedAW, FedGH (gram) and FedGH (direct)."""
    k, p = clients, params
    need = (k + 4) * p * 4  # updates, w, the output, and the direct loop's ĝ and sum
    avail = _available_bytes()
    if avail is not None and need > 0.9 * avail:
        raise ToolError(f"{k} x {p} float32 updates need about {need / 2**30:.1f} GiB, "
                          f"{avail / 2**30:.1f} GiB available: lower --clients or --params")
    deltas = _client_updates(k, p, seed)
    counts = torch.linspace(50, 150, k, dtype=torch.float64)
    w = torch.empty(p).normal_(generator=torch.Generator().manual_seed(seed + 1))
    target = torch.empty(p)

    methods: dict[str, tuple[Strategy, int]] = {
        "fedavg": (FedAvg(), repeats),
        "fedaw": (FedAW(), repeats),
        "fedgh": (FedGH(method="gram"), repeats),
        "fedgh-direct": (FedGH(method="direct"), 1),
    }
    seconds = {name: float("inf") for name in methods}
    results: dict[str, torch.Tensor] = {}

    def step(strategy: Strategy) -> float:
        target.copy_(w)
        inputs = RoundInput(deltas=deltas, counts=counts, client_ids=list(range(k)),
                            num_clients=k, slices=[("all", 0, p)], add_to=target)
        t0 = time.perf_counter()
        strategy.aggregate(inputs, strategy.initial_state())
        return time.perf_counter() - t0

    for r in range(repeats + 1):  # round 0 warms up every code path (and is not counted)
        for name, (strategy, reps) in methods.items():
            if r > reps or (name == "fedgh-direct" and r == 0):
                continue
            dt = step(strategy)
            if r > 0 or name == "fedgh-direct":
                seconds[name] = min(seconds[name], dt)
            if name in ("fedgh", "fedgh-direct") and name not in results:
                results[name] = target.clone()

    # components of the FedGH step, for the record
    gram_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gram_matrix(deltas)
        gram_s = min(gram_s, time.perf_counter() - t0)

    diff = float((results["fedgh"] - results["fedgh-direct"]).norm())
    scale = float((results["fedgh-direct"] - w).norm())
    base = seconds["fedavg"]
    return {
        "clients": k,
        "params": p,
        "repeats": repeats,
        "seconds": seconds,
        "ratio": {name: s / base for name, s in seconds.items()},
        "gram_seconds": gram_s,
        "gram_backend": "native" if native_gram_kernel() is not None else "torch",
        "gram_vs_direct": diff / scale if scale > 0 else diff,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def aggregate_tables(res: dict) -> tuple[Table, str]:
    """The timings as a table, and a line on the Gram kernel and the machine."""
    table = Table(title=f"one server step, K = {res['clients']} clients, "
                        f"P = {res['params']:,} float32 parameters")
    table.add_column("method")
    table.add_column("seconds (min)", justify="right")
    table.add_column("x FedAvg", justify="right")
    table.add_column("runs", justify="right")
    notes = {"fedgh": "gram", "fedgh-direct": "direct loop, reference"}
    for name, s in res["seconds"].items():
        runs = 1 if name == "fedgh-direct" else res["repeats"]
        label = f"{name} ({notes[name]})" if name in notes else name
        table.add_row(label, f"{s:.3f}", f"{res['ratio'][name]:.2f}", str(runs))
    notes_line = (f"Gram matrix alone: {res['gram_seconds']:.3f} s ({res['gram_backend']} "
                  f"kernel); |gram - direct| / |update| = {res['gram_vs_direct']:.1e}\n"
                  f"{res['cpu']}, {res['cores']} cores, torch {res['torch']}, "
                  f"{res['threads']} threads")
    return table, notes_line
