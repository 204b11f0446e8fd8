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


# the runner's phases timed separately (see simulate)
PHASES = ("state read", "state write", "reply checks", "aggregation", "checkpoint")


def _timed(fn, seconds: dict[str, float], phase: str):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[phase] += time.perf_counter() - t0

    return call


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def simulate(cfg: Config) -> dict:
    """Run one federation; times and memory of its rounds. Meant for a fresh process."""
    from fedpose.engine.federation import build_federation
    from fedpose.engine.local import LocalTransport
    from fedpose.engine.runner import prepare_run_dir
    from fedpose.fl.messages import TrainReply
    from fedpose.fl.server import FederatedServer
    from fedpose.model.train_step import set_cpu_threads

    set_cpu_threads(cfg.train.threads)
    train_seconds: list[float] = []
    eval_seconds: list[float] = []

    class TimedTransport(LocalTransport):
        def receive(self, client_id: int) -> TrainReply:
            reply = super().receive(client_id)
            train_seconds.append(reply.seconds)
            return reply

    run_dir = prepare_run_dir(cfg, resume=False)
    federation = build_federation(cfg)
    transport = TimedTransport(federation)

    def evaluate(weights: dict) -> dict:
        t0 = time.perf_counter()
        out = federation.evaluate(weights)
        eval_seconds.append(time.perf_counter() - t0)
        return out

    server = FederatedServer(
        cfg,
        federation.initial_weights(),
        federation.layout,
        federation.strategy,
        transport,
        federation.client_sizes,
        evaluate=evaluate,
        run_dir=run_dir,
    )
    phase_seconds = dict.fromkeys(PHASES, 0.0)
    store = transport.client_states
    store.get = _timed(store.get, phase_seconds, "state read")
    store.put = _timed(store.put, phase_seconds, "state write")
    server._accept = _timed(server._accept, phase_seconds, "reply checks")
    server.aggregate = _timed(server.aggregate, phase_seconds, "aggregation")
    server.save_checkpoint = _timed(server.save_checkpoint, phase_seconds, "checkpoint")
    marks: list[tuple[float, float, float]] = []  # (wall, training, evaluation) after each round

    def mark(*_) -> None:
        marks.append((time.perf_counter(), sum(train_seconds), sum(eval_seconds)))

    # the first round pays one-time costs (lazy imports, allocator growth): it only warms up
    total_rounds = cfg.fed.rounds
    cfg.fed.rounds = 1
    server.run()
    rss_before = _rss_bytes()
    warm_clients = len(train_seconds)
    phase_seconds.update(dict.fromkeys(PHASES, 0.0))
    mark()
    cfg.fed.rounds = total_rounds
    server.run(progress=mark)
    rounds = len(marks) - 1
    if rounds < 1:
        raise ToolError("bench sim needs at least 2 rounds (the first one warms up)")
    wall, train, evaluation = (marks[-1][i] - marks[0][i] for i in range(3))
    clients = max(1, len(train_seconds) - warm_clients)
    overhead = wall - train - evaluation
    phases_ms = {p: 1e3 * phase_seconds[p] / clients for p in PHASES}
    phases_ms["other"] = 1e3 * (overhead - sum(phase_seconds.values())) / clients
    return {
        "clients": cfg.fed.num_clients,
        "per_round": cfg.fed.clients_per_round,
        "rounds": rounds,
        "round_s": wall / rounds,
        "train_s": train / rounds,
        "eval_s": evaluation / rounds,
        "trained": len(train_seconds),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_growth": _rss_bytes() - rss_before,
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
