"""`fedpose bench ...`: the benchmarks of tools/; each handler beside its arguments."""

from __future__ import annotations

import argparse

from fedpose.cli.common import (
    FLOWER_INTERRUPTED,
    add_config,
    add_flower_run,
    add_force,
    console,
    own_name,
)
from fedpose.config import load_config
from fedpose.data import DATASETS


def cmd_bench_aggregate(args) -> int:
    from fedpose.tools.bench_aggregate import aggregate_tables, bench_aggregate

    res = bench_aggregate(args.clients, args.params, args.repeats)
    table, notes = aggregate_tables(res)
    console.print(table)
    console.print(notes)
    print(f"fedgh/fedavg: {res['ratio']['fedgh']:.2f}")
    return 0


def add_bench_aggregate(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("aggregate", help="time one server aggregation step")
    b.add_argument("--clients", type=int, default=16)
    b.add_argument("--params", type=int, default=34_000_000)
    b.add_argument("--repeats", type=int, default=3)
    b.set_defaults(func=cmd_bench_aggregate)


def cmd_bench_data(args) -> int:
    from fedpose.tools.bench_data import DataBenchOptions, bench_data, data_table

    res = bench_data(
        DataBenchOptions(
            dataset=args.dataset,
            root=args.root or _default_root(args.dataset),
            ann=args.ann,
            input_size=args.input,
            workers=args.workers,
            batch_size=args.batch,
            samples=args.samples,
            model=args.model,
            model_batch=args.model_batch,
            model_steps=args.steps,
            device=args.device,
            compile=args.compile,
            repeats=args.repeats,
        )
    )
    table, notes = data_table(res)
    console.print(table)
    console.print(notes)
    print(f"pipeline/model: {res['ratio']:.2f}")
    return 0


def add_bench_data(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("data", help="data pipeline samples/s vs model training img/s")
    _add_data_source(b)
    b.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = every core)")
    b.add_argument("--batch", type=int, default=32, help="DataLoader batch size")
    b.add_argument("--samples", type=int, default=256, help="samples per pipeline pass")
    b.add_argument("--model-batch", type=int, default=32)
    b.add_argument("--steps", type=int, default=5, help="timed training steps per pass")
    b.add_argument("--repeats", type=int, default=2)
    b.set_defaults(func=cmd_bench_data)


def cmd_bench_sim(args) -> int:
    from fedpose.run_dir import output_folder
    from fedpose.tools.bench_sim import SimBenchOptions, bench_sim, phase_table, sim_table

    output_folder(args.workdir, "bench sim", args.force)
    opts = SimBenchOptions(
        clients=args.clients,
        per_round=args.per_round,
        rounds=args.rounds,
        method=args.method,
        samples_per_client=args.samples,
        sizes=args.sizes,
        workdir=args.workdir,
    )
    res = bench_sim(
        opts,
        progress=lambda row: console.print(f"K = {row['clients']}: {row['round_s']:.2f} s a round"),
    )
    table, notes = sim_table(res, opts)
    console.print(table)
    console.print(phase_table(res))
    console.print(notes)
    print(f"overhead share: {res['overhead_share']:.4f}")
    return 0


def add_bench_sim(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("sim", help="the in-process engine's overhead and memory with many clients")
    b.add_argument("--clients", type=int, default=1000)
    b.add_argument("--per-round", type=int, default=100)
    b.add_argument("--rounds", type=int, default=3, help="rounds per size (the first warms up)")
    b.add_argument("--method", default="feddyn")
    b.add_argument("--samples", type=int, default=4, help="generated images per client")
    b.add_argument(
        "--sizes",
        default="10,100,1000",
        help="federation sizes K for the table (each at most --clients)",
    )
    b.add_argument("--workdir", default="runs/bench-sim")
    add_force(b, "a --workdir another command made")
    b.set_defaults(func=cmd_bench_sim)


def cmd_bench_train(args) -> int:
    from fedpose.tools.bench_train import TrainBenchOptions, bench_train, train_tables

    opts = TrainBenchOptions(
        model=args.model,
        input_size=args.input,
        device=args.device,
        dataset=args.dataset,
        root=args.root or _default_root(args.dataset),
        ann=args.ann,
        batch_size=args.batch,
        workers=args.workers,
        steps=args.steps,
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        fedgh_clients=args.fedgh_clients,
        fedgh_params=args.fedgh_params,
    )
    res = bench_train(opts)
    table, notes = train_tables(res, opts.dataset)
    console.print(table)
    console.print(notes)
    fedgh = res.get("fedgh")
    if fedgh and fedgh["fedavg"] and fedgh["fedgh"]:
        print(f"fedgh/fedavg: {fedgh['fedgh'] / fedgh['fedavg']:.2f}")
    print(f"img/s: {res['real_img_s']:.1f}")
    return 0


def add_bench_train(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser(
        "train",
        help="training img/s with real data loading, share of the "
        "bf16 peak, FedGH's server step on the device",
    )
    _add_data_source(b)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = cores - 1)")
    b.add_argument("--steps", type=int, default=20, help="timed training steps")
    b.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak (default: from a table of known GPUs)",
    )
    b.add_argument("--fedgh-clients", type=int, default=100)
    b.add_argument(
        "--fedgh-params", type=int, default=34_000_000, help="FedGH server step size P (0 = skip)"
    )
    b.set_defaults(func=cmd_bench_train)


def cmd_bench_flower(args) -> int:
    from fedpose.run_dir import check_output
    from fedpose.tools.flower_bench import (
        bench_command,
        run_flower_bench,
        summary_table,
        write_report,
    )
    from fedpose.tools.flower_demo import terminate_on_sigterm

    if args.out:
        check_output(args.out, "bench flower", args.force)  # before the runs, not after
    console.print(f"Flower vs in-process: {args.supernodes} SuperNodes, {args.rounds} rounds")
    with terminate_on_sigterm():
        bench = run_flower_bench(args.config, args.supernodes, args.rounds, args.overrides, console)
    console.print(summary_table(bench))
    if args.out:
        command = bench_command(args.config, args.supernodes, args.rounds, args.overrides, args.out)
        console.print(f"wrote {write_report(bench, command, args.out)}")
    print(f"flower/in-process run time: {bench.summary['ratio_run']:.2f}")
    return 0


def add_bench_flower(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser(
        "flower", help="the same federation on Flower processes and in-process, timed"
    )
    add_flower_run(b, rounds=3)
    b.add_argument("--out", default=None, help="write the figures as markdown here")
    add_force(b, "an --out file in a folder another command made")
    b.set_defaults(func=cmd_bench_flower, interrupted=FLOWER_INTERRUPTED)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    add_bench_aggregate(bsub)
    add_bench_data(bsub)
    add_bench_sim(bsub)
    add_bench_train(bsub)
    add_bench_flower(bsub)


def _default_root(dataset: str) -> str:
    """$FEDPOSE_DATASETS/<dataset> (where the tests look too) when set, else data/<dataset>
    (where `fedpose data download` puts it)."""
    from fedpose.data.download import default_destination

    return str(default_destination(dataset))


def _add_data_source(b: argparse.ArgumentParser) -> None:
    b.add_argument("--dataset", default="lsp", choices=DATASETS)
    b.add_argument(
        "--root", default=None, help="dataset folder (default: $FEDPOSE_DATASETS/<dataset>)"
    )
    b.add_argument("--ann", default="", help="annotation file (mpii, coco)")
    b.add_argument("--input", type=int, default=256, help="network input side")
    b.add_argument("--model", default="pose_resnet50")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")


def cmd_sketch_study(args) -> int:
    import json

    from fedpose.run_dir import output_folder
    from fedpose.tools.secure_study import flower_cost, sketch_study, summary_table

    if args.flower_cost:
        out = output_folder(args.flower_cost, "sketch-study", args.force).resolve()
        rows = flower_cost(out, rounds=args.rounds)
        (out / "flower_cost.json").write_text(json.dumps(rows, indent=2))
        return 0
    # an in-process run: the config's folder unless another command made it
    name = own_name(args, "run", suffix="sketch-study")
    cfg = load_config(args.config, [*args.overrides, *name, "fed.method=fedgh"])
    widths = [int(w) for w in args.widths.split(",")]
    print(summary_table(sketch_study(cfg, widths, args.keys)))
    return 0


def add_sketch_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sketch-study",
        help="what sketch widths cost secure FedGH, per round, on one exact run (docs/security.md)",
    )
    add_config(p, required=False)
    p.add_argument("--widths", default="1024,4096,16384,65536")
    p.add_argument("--keys", type=int, default=3, help="consortium secrets tried per width")
    p.add_argument(
        "--flower-cost",
        metavar="DIR",
        help="instead: bytes and seconds per round of plain vs secure FedAvg/FedGH on loopback "
        "Flower processes (the tiny flower-demo federation), written to DIR",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of each --flower-cost run")
    add_force(p, "a folder another command made")
    p.set_defaults(func=cmd_sketch_study)
