"""`fedpose bench aggregate`: the cost of one server step, FedGH against FedAvg.

Every method starts from the same input, the K client updates as the server receives them (a
K x P float32 buffer, one row per client) and the global weights w (P,), and ends with the new
global model: the strategy's update added to w, as the server adds it, so memory policy is
identical for all. Times are the minimum over the repeats, interleaved across
methods so that a burst of load elsewhere on the machine does not favour one of them. The direct
FedGH loop (K² vector passes, the reference) runs once. Peak memory is measured separately, one
fresh process per method (the peak resident set size of a process never goes down): the growth
of the peak over the process's size after importing torch, in model sizes (4P bytes); it
includes the K updates, w and the update, K + 2 model sizes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import time

import torch
from rich.table import Table

from fedpose.fl.gram import gram_matrix, gram_record
from fedpose.fl.strategies import FedAvg, FedAW, FedGH
from fedpose.fl.strategies.base import RoundInput, Strategy
from fedpose.tools import ToolError
from fedpose.tools.machine import cpu_name


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


def _strategy(name: str) -> Strategy:
    return {
        "fedavg": FedAvg,
        "fedaw": FedAW,
        "fedgh": lambda: FedGH(method="gram"),
        "fedgh-direct": lambda: FedGH(method="direct"),
    }[name]()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_in_child(name: str, k: int, p: int, seed: int) -> float:
    """Runs in a fresh process: one step of `name`; the growth of the peak RSS in model sizes."""
    try:
        # Linux: "5" resets the peak RSS to the current RSS, so importing torch does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _status_kib("VmRSS")
    except OSError:
        start = None
    if start is None:  # the peak of the imports then counts as the baseline
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    deltas = _client_updates(k, p, seed)
    w = torch.empty(p).normal_(generator=torch.Generator().manual_seed(seed + 1))
    target = w.clone()
    strategy = _strategy(name)
    inputs = RoundInput(
        deltas=deltas,
        counts=torch.linspace(50, 150, k, dtype=torch.float64),
        client_ids=list(range(k)),
        num_clients=k,
        slices=[("all", 0, p)],
    )
    target.add_(strategy.aggregate(inputs, strategy.initial_state()).update)
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - start) * 1024 / (4 * p)


def peak_memory(name: str, k: int, p: int, seed: int = 0) -> float:
    """Peak memory of one server step of `name` in model sizes, from a fresh process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_in_child, (name, k, p, seed))


# The direct loop takes K² exact inner products over P columns; beyond this many multiply-adds
# (K = 16 at P = 4 M) it would run for many minutes and is left out.
_DIRECT_LIMIT = 1e9


def bench_aggregate(clients: int, params: int, repeats: int = 3, seed: int = 0) -> dict:
    """Time one server step of FedAvg, FedAW, FedGH (gram) and FedGH (direct, when K²P is at
    most _DIRECT_LIMIT), then measure each method's peak memory in a fresh process."""
    k, p = clients, params
    # FedGH's conflicts need two updates; a step of no parameters or no repeat times nothing
    for name, value, low in (("--clients", k, 2), ("--params", p, 1), ("--repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ToolError(f"{name} {value!r} is out of range; allowed: an integer >= {low}")
    need = (k + 4) * p * 4  # updates, w, the output, and the direct loop's ĝ and sum
    avail = _available_bytes()
    if avail is not None and need > 0.9 * avail:
        raise ToolError(
            f"{k} x {p} float32 updates need about {need / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB available: lower --clients or --params"
        )
    seconds, gram_s, gram_vs_direct = _time_steps(k, p, repeats, seed)
    # after _time_steps has returned its buffers: the children need the room
    memory = {name: peak_memory(name, k, p, seed) for name in ("fedavg", "fedaw", "fedgh")}
    base = seconds["fedavg"]
    return {
        "clients": k,
        "params": p,
        "repeats": repeats,
        "seconds": seconds,
        "ratio": {name: s / base for name, s in seconds.items()},
        "peak_model_sizes": memory,
        "gram_seconds": gram_s,
        "gram": gram_record(p),
        "gram_vs_direct": gram_vs_direct,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def _time_steps(k: int, p: int, repeats: int, seed: int) -> tuple[dict, float, float]:
    """Seconds per method (minimum over the repeats), the Gram matrix's seconds, and
    |gram − direct| / |update| (nan when the direct loop is left out)."""
    direct = k * k * p <= _DIRECT_LIMIT
    deltas = _client_updates(k, p, seed)
    counts = torch.linspace(50, 150, k, dtype=torch.float64)
    w = torch.empty(p).normal_(generator=torch.Generator().manual_seed(seed + 1))
    target = torch.empty(p)

    methods: dict[str, tuple[Strategy, int]] = {
        "fedavg": (_strategy("fedavg"), repeats),
        "fedaw": (_strategy("fedaw"), repeats),
        "fedgh": (_strategy("fedgh"), repeats),
    }
    if direct:
        methods["fedgh-direct"] = (_strategy("fedgh-direct"), 1)
    seconds = {name: float("inf") for name in methods}
    results: dict[str, torch.Tensor] = {}

    def step(strategy: Strategy) -> float:
        target.copy_(w)
        inputs = RoundInput(
            deltas=deltas,
            counts=counts,
            client_ids=list(range(k)),
            num_clients=k,
            slices=[("all", 0, p)],
        )
        t0 = time.perf_counter()
        target.add_(strategy.aggregate(inputs, strategy.initial_state()).update)
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

    if not direct:
        return seconds, gram_s, math.nan
    diff = float((results["fedgh"] - results["fedgh-direct"]).norm())
    scale = float((results["fedgh-direct"] - w).norm())
    return seconds, gram_s, diff / scale if scale > 0 else diff


def aggregate_tables(res: dict) -> tuple[Table, str]:
    """The timings and peak memory as a table, and lines on the Gram matrix and the machine."""
    table = Table(
        title=f"one server step, K = {res['clients']} clients, "
        f"P = {res['params']:,} float32 parameters"
    )
    table.add_column("method")
    table.add_column("seconds (min)", justify="right")
    table.add_column("x FedAvg", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("peak memory (model sizes)", justify="right")
    notes = {"fedgh": "gram", "fedgh-direct": "direct loop, reference"}
    for name, s in res["seconds"].items():
        runs = 1 if name == "fedgh-direct" else res["repeats"]
        label = f"{name} ({notes[name]})" if name in notes else name
        peak = res["peak_model_sizes"].get(name)
        table.add_row(
            label,
            f"{s:.3f}",
            f"{res['ratio'][name]:.2f}",
            str(runs),
            "-" if peak is None else f"{peak:.1f}",
        )
    gram = res["gram"]
    versus = (
        f"|gram - direct| / |update| = {res['gram_vs_direct']:.1e}"
        if "fedgh-direct" in res["seconds"]
        else "direct loop skipped (K²P > 1e9)"
    )
    notes_line = (
        f"Gram matrix alone: {res['gram_seconds']:.3f} s ({gram['path']}, "
        f"{gram['bits']}-bit grid); {versus}\n"
        f"peak memory: growth of the peak RSS of a fresh process per method, in model "
        f"sizes (4P bytes); the K updates, w and the output are K + 2 = "
        f"{res['clients'] + 2}\n"
        f"{res['cpu']}, {res['cores']} cores, torch {res['torch']}, "
        f"{res['threads']} threads"
    )
    return table, notes_line
