"""`fedpose flower-demo`, `flower-sim`, `flower-config`, `flower-pull`: fedpose on Flower's
engines; each handler beside its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpose.cli.common import (
    FLOWER_INTERRUPTED,
    add_config,
    add_flower_run,
    console,
    err_console,
    own_name,
)
from fedpose.config import load_config


def cmd_flower_demo(args) -> int:
    from fedpose.tools.flower_demo import (
        AGREEMENT,
        compare_engines,
        demo_config,
        terminate_on_sigterm,
    )

    cfg = demo_config(args.config, args.supernodes, args.rounds, args.overrides)
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.fed.method} on {cfg.data.dataset}, "
        f"{args.supernodes} SuperNodes, {args.rounds} rounds; runs in {cfg.out_dir}"
    )
    with terminate_on_sigterm():
        result = compare_engines(cfg, args.supernodes, console)
    f = result.flower
    console.print(
        f"Flower: {f.seconds['start']:.1f} s to start, {f.seconds['run']:.1f} s run; "
        f"in-process: {result.local_seconds:.1f} s"
    )
    console.print(f"runs: {f.run_dir}  {result.local_run_dir}")
    if result.max_diff <= AGREEMENT:
        console.print(f"the engines agree (tolerance {AGREEMENT:g})")
    else:
        console.print(f"[red]the engines differ by more than {AGREEMENT:g}[/]")
    print(f"max |w_flower - w_local|: {result.max_diff:.6g}")
    return 0 if result.max_diff <= AGREEMENT else 1


def add_flower_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flower-demo", help="the federation on real Flower processes vs in-process")
    add_flower_run(p, rounds=2)
    p.set_defaults(func=cmd_flower_demo, interrupted=FLOWER_INTERRUPTED)


def cmd_flower_sim(args) -> int:
    from fedpose.tools.flower_demo import demo_config, terminate_on_sigterm
    from fedpose.tools.flower_sim import run_flower_simulation

    # with a config, its folder unless another command made it (without: runs/flower-sim)
    name = own_name(args, "run", suffix="flower-sim") if args.config else []
    cfg = demo_config(
        args.config, args.supernodes, args.rounds, args.overrides + name, default_name="flower-sim"
    )
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.fed.method} on {cfg.data.dataset}, "
        f"{args.supernodes} virtual SuperNodes, {args.rounds} rounds; runs in "
        f"{cfg.out_dir}"
    )
    with terminate_on_sigterm():
        result = run_flower_simulation(
            cfg,
            args.supernodes,
            console,
            cpus_per_client=args.cpus_per_client,
            connect_timeout=args.connect_timeout,
        )
    f = result.flower
    console.print(
        f"Flower simulation: {f.seconds['start']:.1f} s to start, "
        f"{f.seconds['run']:.1f} s run, peak memory "
        f"{result.peak_rss_bytes / 2**20:.0f} MiB (SuperLink process tree)"
    )
    console.print(f"run directory: {f.run_dir}")
    return 0


def add_flower_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flower-sim", help="the federation on Flower's Simulation Engine (virtual SuperNodes, Ray)"
    )
    add_flower_run(p, rounds=2)
    p.add_argument(
        "--cpus-per-client",
        type=int,
        default=1,
        help="CPU cores Ray reserves per ClientApp (how many train at once)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=600.0,
        help="seconds the ServerApp waits at start for every virtual SuperNode "
        "to answer (each answer is one ClientApp call)",
    )
    p.set_defaults(func=cmd_flower_sim, interrupted=FLOWER_INTERRUPTED)


def cmd_flower_config(args) -> int:
    from fedpose.engine.flower_messages import run_config_toml
    from fedpose.engine.run import check_config

    print(run_config_toml(check_config(load_config(args.config, args.overrides))), end="")
    return 0


def add_flower_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flower-config", help="print a `flwr run --run-config` file that carries a fedpose config"
    )
    add_config(p, required=False)
    p.set_defaults(func=cmd_flower_config)


def cmd_flower_pull(args) -> int:
    from fedpose.tools.flower_pull import pull_run

    result = pull_run(args.run_id, args.superlink, args.out, args.force)
    pulled = result.pulled
    files = ", ".join(sorted(pulled.files)) or "no files"
    console.print(
        f"run {args.run_id} ({result.status}): {len(pulled.records)} rounds, {files} "
        f"-> {result.out}",
        markup=False,
        highlight=False,
    )
    for problem in pulled.problems:
        err_console.print(f"warning: {problem}", markup=False, highlight=False)
    if result.status == "finished:completed" and pulled.status == "completed":
        return 0
    if result.status.startswith("finished"):
        why = pulled.error or "see flwr log"
        err_console.print(
            f"error: run {args.run_id} did not complete ({result.status}): {why}",
            markup=False,
            highlight=False,
        )
        return 1
    console.print(f"run {args.run_id} is still going: pull again for the rest")
    return 0


def add_flower_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flower-pull",
        help="a Flower run's metrics, config and model from its log stream into a run folder",
    )
    p.add_argument("run_id", type=int, metavar="RUN_ID", help="as `flwr run` printed it")
    p.add_argument("superlink", nargs="?", default=None, help="SuperLink connection name")
    p.add_argument("--out", type=Path, default=None, help="run folder (runs/flower-RUN_ID)")
    p.add_argument("--force", action="store_true", help="write over a pulled run in --out")
    p.set_defaults(func=cmd_flower_pull)
