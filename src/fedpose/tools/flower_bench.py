"""`fedpose bench flower`: wall time of the same federation on both engines, and where the
Flower overhead goes.

Sources of the figures:
- run directories: each engine's metrics.jsonl (`wall_seconds` per round, evaluation included);
- `flower_timing.jsonl`, written by FlowerTransport, one row per reply: `push_s` (server:
  serialize + push), `roundtrip_s` (push to reply pulled), `handler_s` (inside the ClientApp's
  train handler), `train_s` (local_train alone), `decode_s` (server: deserialize), and the
  wall-clock split `queue_s`, `startup_s`, `return_s` (see flower_server._client_timing);
- `flwr ls --format json`: the SuperLink's own compute time and traffic counters.
Derived per reply: delivery = roundtrip − handler, split by wall-clock times into queue (push
until the ClientApp process exists), startup (process start until the handler runs) and return
(handler done until the ServerApp has the reply); client setup = handler − train (building the
federation in the fresh ClientApp process, (de)serialization on the client).
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedpose.config import Config
from fedpose.engine.federation import Federation
from fedpose.engine.flower_server import TIMING_FILE
from fedpose.engine.local import LocalTransport
from fedpose.fl.messages import TrainReply
from fedpose.metrics.log import read_jsonl, read_metrics
from fedpose.tools.flower_demo import Comparison, compare_engines, demo_config


class TimedLocalTransport(LocalTransport):
    """The in-process transport, noting each reply's client training time in `sink`."""

    def __init__(self, federation: Federation, sink: list[float]):
        super().__init__(federation)
        self.sink = sink

    def receive(self, client_id: int) -> TrainReply:
        reply = super().receive(client_id)
        self.sink.append(reply.seconds)
        return reply


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarize(result: Comparison, local_train_seconds: list[float]) -> dict:
    """The benchmark's figures from a finished comparison."""
    f = result.flower
    flower_rounds = [r["wall_seconds"] for r in read_metrics(f.run_dir)]
    local_rounds = [r["wall_seconds"] for r in read_metrics(result.local_run_dir)]
    replies = read_jsonl(f.run_dir / TIMING_FILE)
    flower_total = f.seconds["start"] + f.seconds["run"]
    compute = f.status.get("compute-time", {})
    traffic = f.status.get("network-traffic", {})
    return {
        "local_s": result.local_seconds,
        "flower_start_s": f.seconds["start"],
        "flower_run_s": f.seconds["run"],
        "flower_total_s": flower_total,
        "ratio_run": f.seconds["run"] / result.local_seconds,
        "ratio_total": flower_total / result.local_seconds,
        "rounds": len(flower_rounds),
        "local_round_s": _mean(local_rounds),
        "flower_round_s": _mean(flower_rounds),
        # ServerApp start, federation build, node discovery, final checkpoint, status polling
        "flower_outside_rounds_s": f.seconds["run"] - sum(flower_rounds),
        "replies": len(replies),
        "local_train_s": _mean(local_train_seconds),
        "train_s": _mean([r["train_s"] for r in replies]),
        "client_setup_s": _mean([r["handler_s"] - r["train_s"] for r in replies]),
        "delivery_s": _mean([r["roundtrip_s"] - r["handler_s"] for r in replies]),
        "queue_s": _mean([r["queue_s"] for r in replies]),
        "startup_s": _mean([r["startup_s"] for r in replies]),
        "return_s": _mean([r["return_s"] for r in replies]),
        "roundtrip_s": _mean([r["roundtrip_s"] for r in replies]),
        "push_s": _mean([r["push_s"] for r in replies]),
        "decode_s": _mean([r["decode_s"] for r in replies]),
        "request_mb": _mean([r["request_bytes"] / 1e6 for r in replies]),
        "reply_mb": _mean([r["reply_bytes"] / 1e6 for r in replies]),
        "serverapp_s": compute.get("serverapp-seconds"),
        "clientapp_s": compute.get("clientapp-seconds"),
        "traffic_mb": (traffic.get("total-bytes") or 0) / 1e6,
        "max_diff": result.max_diff,
    }


def report_markdown(s: dict, command: str, cfg_line: str, load: tuple[float, float]) -> str:
    cpu = os.cpu_count()
    return "\n".join(
        [
            "# Flower vs in-process engine",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {cpu} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), flwr "
            f"{package_version('flwr')}, loopback SuperLink + SuperNodes (insecure). 1-minute load "
            f"average {load[0]:.2f} before and {load[1]:.2f} after the run (the whole machine's).",
            "",
            f"Experiment: {cfg_line}",
            "",
            "| | seconds |",
            "|---|---:|",
            f"| in-process engine, whole run | {s['local_s']:.2f} |",
            "| Flower: start SuperLink + SuperNodes until all connected | "
            f"{s['flower_start_s']:.2f} |",
            f"| Flower: `flwr run` submit until the run is finished | {s['flower_run_s']:.2f} |",
            f"| Flower: total | {s['flower_total_s']:.2f} |",
            f"| **ratio Flower run / in-process** | **{s['ratio_run']:.2f}** |",
            f"| ratio Flower total / in-process | {s['ratio_total']:.2f} |",
            "",
            "Where the Flower time goes (means over rounds or replies):",
            "",
            "| | seconds |",
            "|---|---:|",
            "| round wall time, in-process (clients one after another) | "
            f"{s['local_round_s']:.2f} |",
            f"| round wall time, Flower (clients concurrently) | {s['flower_round_s']:.2f} |",
            f"| Flower run time outside rounds (ServerApp start, data/model build, node "
            f"discovery, run status) | {s['flower_outside_rounds_s']:.2f} |",
            f"| per reply: round trip, push to reply pulled | {s['roundtrip_s']:.2f} |",
            f"| per reply: local training in-process (`local_train`, warm process) | "
            f"{s['local_train_s']:.2f} |",
            f"| per reply: local training in a ClientApp (`local_train`, fresh process, clients "
            f"concurrently) | {s['train_s']:.2f} |",
            f"| per reply: ClientApp setup (build federation, (de)serialize) | "
            f"{s['client_setup_s']:.2f} |",
            f"| per reply: delivery = round trip − handler | {s['delivery_s']:.2f} |",
            "| … push until the ClientApp process starts (SuperNode poll, SuperExec poll, "
            "launch) | "
            f"{s['queue_s']:.2f} |",
            f"| … ClientApp process start until the handler runs (interpreter, imports, message) | "
            f"{s['startup_s']:.2f} |",
            f"| … handler done until the ServerApp has the reply (upload, polling) | "
            f"{s['return_s']:.2f} |",
            f"| per request: server serialize + push | {s['push_s']:.4f} |",
            f"| per reply: server deserialize | {s['decode_s']:.4f} |",
            "",
            f"Payload: {s['request_mb']:.2f} MB per request, {s['reply_mb']:.2f} MB per reply; "
            f"SuperLink traffic counter {s['traffic_mb']:.2f} MB for {s['replies']} replies. "
            f"SuperLink compute time: ServerApp {_fmt(s['serverapp_s'])} s, ClientApps "
            f"{_fmt(s['clientapp_s'])} s.",
            "",
            "Largest absolute weight difference between the two final models: "
            f"{s['max_diff']:.6g}.",
            "",
        ]
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


@dataclass
class FlowerBench:
    summary: dict  # the figures, see `summarize`
    config: Config  # the config both engines ran
    load: tuple[float, float]  # 1-minute load average before and after


def run_flower_bench(
    config_path: str | None, supernodes: int, rounds: int, overrides: list[str], console: Console
) -> FlowerBench:
    """Run the experiment on both engines (run names flower-bench-flower / -local) and time it."""
    local_train_seconds: list[float] = []
    load_before = os.getloadavg()[0]
    cfg = demo_config(config_path, supernodes, rounds, ["name=flower-bench", *overrides])
    result = compare_engines(
        cfg,
        supernodes,
        console,
        local_transport=lambda federation: TimedLocalTransport(federation, local_train_seconds),
    )
    return FlowerBench(
        summarize(result, local_train_seconds), result.config, (load_before, os.getloadavg()[0])
    )


def summary_table(bench: FlowerBench) -> Table:
    table = Table(title="Flower vs in-process")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in bench.summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def bench_command(
    config_path: str | None, supernodes: int, rounds: int, overrides: list[str], out: str
) -> str:
    """The command line that reproduces a run, for the report."""
    threads = os.environ.get("OMP_NUM_THREADS")
    args = [
        *([config_path] if config_path else []),
        f"--supernodes {supernodes}",
        f"--rounds {rounds}",
        *(f"-c {shlex.quote(o)}" for o in overrides),
        f"--out {out}",
    ]
    return (
        (f"OMP_NUM_THREADS={threads} " if threads else "")
        + "fedpose bench flower "
        + " ".join(args)
    )


def write_report(bench: FlowerBench, command: str, out: str | Path) -> Path:
    """The figures as markdown, with the command, the machine and the experiment."""
    cfg = bench.config
    d, m, fed = cfg.data, cfg.model, cfg.fed
    cfg_line = (
        f"{d.dataset} ({d.synth_n if d.dataset == 'synth-arm' else 'all'} images, "
        f"input {d.input_size}), PoseResNet-{m.depth} width {m.width} deconv "
        f"{m.deconv_filters}, {fed.method} {fed.mode}, {fed.num_clients} clients, "
        f"{fed.rounds} rounds, {fed.local_steps or fed.local_epochs} local "
        f"{'steps' if fed.local_steps else 'epochs'} of batch {cfg.train.batch_size}, "
        f"device {cfg.train.device}."
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report_markdown(bench.summary, command, cfg_line, bench.load))
    return out
