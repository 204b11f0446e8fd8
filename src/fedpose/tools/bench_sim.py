"""`fedpose bench sim`: the in-process engine with many clients.

For each federation size K the same small federation runs a few rounds (a tiny PoseResNet on
generated synth-arm images, `samples` images per client, min(per_round, K) clients a round) in a
fresh process, so that its peak memory is its own. Reported per K:

- round time, split into local training (`local_train`, summed over the clients), evaluation,
  and the runner's overhead: everything else (selection, requests, client state I/O,
  aggregation, logging, checkpoints);
- memory: the process's peak resident set, its growth over the rounds, and the client state
  that an in-memory engine would hold (here on disk, beside the checkpoint);
- where the overhead goes, per trained client: reading and writing client state, the server's
  reply checks, the aggregation, the checkpoint, and the rest (selection, requests, logging,
  the client's set-up and tear-down outside its timed training).

Memory must grow with the clients trained per round, not with K; the overhead share of round
time is the runner's cost.
"""

from __future__ import annotations

import math
import multiprocessing
import queue as queue_module
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from fedpose.config import Config, load_config
from fedpose.fl.messages import TrainReply
from fedpose.fl.observer import (
    AGGREGATION,
    CHECKPOINT,
    EVALUATION,
    REPLY_CHECKS,
    STATE_READ,
    STATE_WRITE,
    RunObserver,
)
from fedpose.tools import ToolError


@dataclass
class SimBenchOptions:
    clients: int = 1000
    per_round: int = 100
    rounds: int = 3
    method: str = "feddyn"
    samples_per_client: int = 4
    sizes: str = "10,100,1000"
    workdir: str = "runs/bench-sim"
    input_size: int = 32


def sim_config(opts: SimBenchOptions, k: int, data_dir: Path) -> Config:
    s = opts.samples_per_client
    return load_config(
        None,
        [
            f"name=k{k}",
            f"out_dir={Path(opts.workdir) / 'runs'}",
            "data.dataset=synth-arm",
            f"data.root={data_dir}",
            f"data.synth_n={_images_needed(opts)}",
            f"data.synth_size={opts.input_size}",
            f"data.input_size={opts.input_size}",
            "data.test_fraction=0.2",
            f"data.max_train={k * s}",
            "data.max_test=32",
            "model.depth=18",
            "model.width=4",
            "model.deconv_filters=8",
            f"train.batch_size={s}",
            "train.flip_test=false",
            "train.threads=1",
            f"fed.method={opts.method}",
            f"fed.rounds={opts.rounds}",
            f"fed.num_clients={k}",
            f"fed.clients_per_round={min(opts.per_round, k)}",
            "fed.partition=iid",
            "fed.local_steps=1",
            "fed.eval_every=1",
        ],
    )


def _images_needed(opts: SimBenchOptions) -> int:
    # 80 % train: every client of the largest federation gets its samples
    return math.ceil(opts.clients * opts.samples_per_client / 0.8) + 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


# the runner's phases timed separately (RunObserver.phase)
PHASES = (STATE_READ, STATE_WRITE, REPLY_CHECKS, AGGREGATION, CHECKPOINT)


class SimObserver(RunObserver):
    """Times a run through the lifecycle's hooks: the clients' training, the evaluations, the
    runner's timed phases, and a mark after every round. Round 1 pays one-time costs (lazy
    imports, allocator growth, and the run's one collection of garbage before it freezes its
    long-lived objects, engine/run.py): it only warms up, and everything is counted from its
    end."""

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.eval_seconds = 0.0
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.marks: list[tuple[float, float, float]] = []  # (wall, training, evaluation)
        self.rss_before = 0
        self.warm_clients = 0

    def phase(self, name: str, seconds: float) -> None:
        if name == EVALUATION:
            self.eval_seconds += seconds
        elif name in self.phase_seconds:
            self.phase_seconds[name] += seconds

    def trained(self, reply: TrainReply) -> None:
        self.train_seconds.append(reply.seconds)

    def round_done(self, done: int, _record: dict) -> None:
        if done == 1:
            self.rss_before = _rss_bytes()
            self.warm_clients = len(self.train_seconds)
            self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.marks.append((time.perf_counter(), sum(self.train_seconds), self.eval_seconds))


def simulate(cfg: Config) -> dict:
    """Run one federation through the run lifecycle; times and memory of its rounds. Meant for
    a fresh process."""
    from fedpose.engine.run import run_lifecycle
    from fedpose.engine.runner import InProcessEngine
    from fedpose.model.train_step import set_cpu_threads

    if cfg.fed.rounds < 2:
        raise ToolError("bench sim needs at least 2 rounds (the first one warms up)")
    set_cpu_threads(cfg.train.threads)
    watch = SimObserver()
    engine = InProcessEngine()
    server = run_lifecycle(cfg, engine, observer=watch)
    store = engine.transport.client_states
    marks = watch.marks
    rounds = len(marks) - 1
    wall, train, evaluation = (marks[-1][i] - marks[0][i] for i in range(3))
    clients = max(1, len(watch.train_seconds) - watch.warm_clients)
    overhead = wall - train - evaluation
    phases_ms = {p: 1e3 * watch.phase_seconds[p] / clients for p in PHASES}
    phases_ms["other"] = 1e3 * (overhead - sum(watch.phase_seconds.values())) / clients
    return {
        "clients": cfg.fed.num_clients,
        "per_round": cfg.fed.clients_per_round,
        "rounds": rounds,
        "round_s": wall / rounds,
        "train_s": train / rounds,
        "eval_s": evaluation / rounds,
        "trained": len(watch.train_seconds),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_growth": _rss_bytes() - watch.rss_before,
        "state_clients": len(store),
        "state_memory": store.bytes_in_memory(),
        "state_disk": store.bytes_on_disk(),
        "params": sum(t.numel() for t in server.weights.values()),
        "phases_ms": phases_ms,
    }


def _simulate_in_child(cfg: Config, queue) -> None:
    queue.put(simulate(cfg))


def _result_of(child, queue) -> dict:
    while True:
        try:
            row = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not child.is_alive():
                raise ToolError(
                    f"the simulation process died (exit code {child.exitcode})"
                ) from None
            continue
        child.join()
        return row


def bench_sim(opts: SimBenchOptions, progress=None) -> dict:
    from fedpose.data.synth_arm import generate_synth_arm

    sizes = sorted({int(x) for x in opts.sizes.split(",") if x.strip()})
    if not sizes or sizes[0] < 1 or sizes[-1] > opts.clients:
        raise ToolError(f"--sizes {opts.sizes!r}: each size must be within 1..{opts.clients}")
    data_dir = Path(opts.workdir) / f"synth-{_images_needed(opts)}-{opts.input_size}"
    if not (data_dir / "annotations.json").exists():
        generate_synth_arm(
            data_dir,
            n=_images_needed(opts),
            seed=0,
            size=opts.input_size,
            progress=False,
            workers=0,
        )
    rows = []
    context = multiprocessing.get_context("spawn")
    for k in sizes:
        queue = context.Queue()
        child = context.Process(
            target=_simulate_in_child, args=(sim_config(opts, k, data_dir), queue)
        )
        child.start()
        row = _result_of(child, queue)
        row["overhead_s"] = row["round_s"] - row["train_s"] - row["eval_s"]
        row["overhead_share"] = row["overhead_s"] / row["round_s"]
        rows.append(row)
        if progress:
            progress(row)
    # the headline: the largest federation, the one the runner must scale to
    return {"rows": rows, "overhead_share": rows[-1]["overhead_share"], "method": opts.method}


def phase_table(res: dict) -> Table:
    """Where the runner's overhead goes, in milliseconds per trained client."""
    table = Table(title="runner overhead per trained client, ms")
    table.add_column("K", justify="right")
    for name in (*PHASES, "other"):
        table.add_column(name, justify="right")
    for r in res["rows"]:
        phases = r["phases_ms"]
        table.add_row(str(r["clients"]), *(f"{phases[p]:.2f}" for p in (*PHASES, "other")))
    return table


def sim_table(res: dict, opts: SimBenchOptions) -> tuple[Table, str]:
    """The figures of `bench_sim` as a table, and a line on the model and machine."""
    from fedpose.tools.machine import cpu_name, utc_stamp

    mib = 2**20
    table = Table(
        title=f"{res['method']}: means over rounds 2..{opts.rounds} (round 1 warms "
        f"up), {opts.samples_per_client} images per client"
    )
    for name in (
        "K",
        "per round",
        "round s",
        "train s",
        "eval s",
        "overhead",
        "peak RSS MiB",
        "RSS growth MiB",
        "states",
        "in RAM MiB",
        "on disk MiB",
    ):
        table.add_column(name, justify="right")
    for r in res["rows"]:
        table.add_row(
            str(r["clients"]),
            str(r["per_round"]),
            f"{r['round_s']:.3f}",
            f"{r['train_s']:.3f}",
            f"{r['eval_s']:.3f}",
            f"{100 * r['overhead_share']:.1f} %",
            f"{r['peak_rss'] / mib:.0f}",
            f"{r['rss_growth'] / mib:.1f}",
            str(r["state_clients"]),
            f"{r['state_memory'] / mib:.2f}",
            f"{r['state_disk'] / mib:.2f}",
        )
    notes = f"{res['rows'][0]['params']:,} parameters; {cpu_name()}; {utc_stamp()}"
    return table, notes
