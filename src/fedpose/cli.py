"""fedpose command line: train, run, compare, report, eval, predict, export, score, data,
bench, flower-demo, flower-sim, flower-config.

Argument parsing and printing live here; the library raises exceptions and returns values.
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import sys
import warnings
from pathlib import Path

from rich.table import Table

# Only light modules at the top: `--help`, `--version` and argument errors must not wait for
# torch (2-11 s); each command imports what it needs. tests/test_cli_light.py checks it.
from fedpose.config import ConfigError, load_config
from fedpose.data import DATASETS
from fedpose.data.records import DatasetError
from fedpose.tools import ToolError
from fedpose.version import plain_console, version_line

console = plain_console()
err_console = plain_console(stderr=True, soft_wrap=True)

METHODS = "fedavg,fedprox,fedbn,feddyn,fedaw,fedgh"
METHOD_CHOICES = (
    "fedavg",
    "fedprox",
    "fedbn",
    "feddyn",
    "fedaw",
    "fedgh",
    "fedgh-noproj",
    "fedgh-noaw",
    "fedavg-clip",
    "median",
    "trimmed-mean",
    "scaffold",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
)
RUN_INTERRUPTED = "the last checkpoint is kept; rerun with --resume"
FLOWER_INTERRUPTED = "every Flower process was stopped"


def _add_overrides(
    p: argparse.ArgumentParser, help_text: str = "override a config value, e.g. -c fed.rounds=5"
) -> None:
    p.add_argument(
        "-c",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="TOML config file")
    _add_overrides(p)
    p.add_argument(
        "--pretrained",
        type=_pretrained,
        dest="overrides",
        action="append",
        metavar="PATH",
        help="start the backbone from a torchvision-format ResNet "
        "state dict (same as -c model.pretrained=PATH)",
    )


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (start over when there is none)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept a checkpoint of another method, seed or config; "
        "write into a run folder another command made",
    )


def _add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name", default=None, help="run folder name under out_dir (default: the config's name)"
    )


def _pretrained(path: str) -> str:
    return f"model.pretrained={path}"


def cmd_train(args) -> int:
    from fedpose.model.io import MODEL_FILE
    from fedpose.train import train_centralized

    cfg = load_config(args.config, args.overrides + _name(args))
    record = train_centralized(cfg, resume=args.resume, console=console, force=args.force)
    console.print(f"model: {cfg.run_dir / MODEL_FILE}")
    console.print(f"mean PCK: {record.get('pck_mean', float('nan')):.2f}")
    return 0


def cmd_run(args) -> int:
    from fedpose.engine.runner import run_federation
    from fedpose.metrics.log import read_metrics
    from fedpose.report.compare import final_eval

    cfg = load_config(args.config, args.overrides + _name(args))
    run_federation(cfg, resume=args.resume, console=console, force=args.force)
    last = final_eval(read_metrics(cfg.run_dir)) or {}  # the last round is always evaluated
    console.print(f"run directory: {cfg.run_dir}")
    console.print(f"mean PCK: {last.get('pck_mean', float('nan')):.2f}")
    return 0


def _name(args) -> list[str]:
    """--name NAME as the override it stands for."""
    return [f"name={args.name}"] if args.name else []


def _variants(args) -> list[tuple[str, list[str]]]:
    """(label, overrides) per compared variant: --variant LABEL:key=value;key=value, or one
    variant per --methods entry."""
    from fedpose.engine.experiment import method_variants, parse_variant

    if not args.variant:
        return method_variants(args.methods)
    return [parse_variant(spec) for spec in args.variant]


def cmd_compare(args) -> int:
    from fedpose.engine.experiment import Comparison, ComparisonError, run_comparison

    plan = Comparison(
        args.config,
        args.overrides,
        _variants(args),
        _seeds(args.seeds),
        name=args.name,
        resume=args.resume,
        jobs=args.jobs,
        force=args.force,
        baselines=tuple(_split(args.baselines)),
        command=args.command_line,
        mixed_cpus=args.mixed_cpus,
    )
    try:
        report = run_comparison(plan, console)
    except ComparisonError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False)
        return 1
    console.print(report.read_text().split("## Curves")[0], markup=False, highlight=False)
    console.print(f"report: {report}")
    return 0


def cmd_report(args) -> int:
    from fedpose.report.experiment import load_arms, write_report

    arms = load_arms([Path(p) for p in args.runs])
    notes = Path(args.notes).read_text() if args.notes else ""
    report = write_report(
        arms,
        Path(args.out),
        args.title,
        baselines=tuple(_split(args.baselines)),
        command=args.command_line,
        produced_by=args.produced_by or "",
        notes=notes,
        commit=args.commit,
        target_pck=args.target_pck,
        mixed_cpus=args.mixed_cpus,
    )
    console.print(report.read_text().split("## Curves")[0], markup=False, highlight=False)
    console.print(f"report: {report}")
    return 0


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _seeds(text: str) -> list[int]:
    """'0,1,2' or '0-9' (or a mix: '0-4,7')."""
    from fedpose.engine.experiment import parse_seeds

    return parse_seeds(text)


def cmd_eval(args) -> int:
    from fedpose.config import data_from_user
    from fedpose.data import load_split
    from fedpose.engine.evaluate import evaluate_model
    from fedpose.metrics.coco_ap import has_keypoint_ap, split_ap
    from fedpose.metrics.pck import grouped_table
    from fedpose.model.inference import resolve_device
    from fedpose.model.io import load_model

    model, cfg, skeleton = load_model(args.checkpoint)
    cfg = data_from_user(cfg, args.overrides)  # the model file's own paths are never used
    if args.dump and cfg.data.dataset != "coco":
        raise ConfigError(f"--dump writes COCO results; the model's data is {cfg.data.dataset}")
    records, _ = load_split(cfg.data, args.split)
    ev = evaluate_model(
        model,
        records,
        skeleton,
        resolve_device(cfg.train.device),
        input_size=cfg.data.input_size,
        flip_test=cfg.train.flip_test,
    )
    result = ev["result"]
    table = Table(title=f"{skeleton.name}: {len(records)} {args.split} records")
    table.add_column("joint")
    table.add_column("PCK (%)", justify="right")
    table.add_column("count", justify="right")
    for joint, value in result.per_joint.items():
        table.add_row(joint, f"{value:.2f}", str(result.counts[joint]))
    console.print(table)
    rows = grouped_table(result, skeleton)
    if rows:
        console.print("  ".join(f"{part} {value:.2f}" for part, value in rows))
    side = cfg.data.input_size // 4
    print(
        f"heatmap accuracy: {ev['heatmap_acc']:.2f} % (SimpleBaseline's: argmax within "
        f"{side / 20:g} px of the target's on the {side}x{side} heatmaps)"
    )
    ap = {}
    if cfg.data.dataset == "coco" and has_keypoint_ap(skeleton):
        ap = split_ap(records, ev["preds"], ev["confidence"], cfg.data, args.split)
    _print_keypoint_ap(ap, cfg.data.dataset)
    if args.dump:
        from fedpose.metrics.coco_ap import write_split_results

        out = write_split_results(
            args.dump, records, ev["preds"], ev["confidence"], cfg.data, args.split
        )
        console.print(f"wrote {out}", markup=False, highlight=False)
    print(f"mean PCK: {result.mean:.2f}")
    return 0


def cmd_predict(args) -> int:
    from fedpose.files import check_not_an_input
    from fedpose.model.inference import predict_image
    from fedpose.model.io import load_model
    from fedpose.report.draw import draw_skeleton

    check_not_an_input(args.out, args.checkpoint, args.image)
    model, cfg, skeleton = load_model(args.checkpoint)
    joints, confidence = predict_image(model, args.image, cfg.data.input_size, skeleton)
    draw_skeleton(args.image, joints, confidence, skeleton, args.out)
    for name, (x, y), c in zip(skeleton.joints, joints.tolist(), confidence.tolist(), strict=True):
        console.print(f"{name:>12}: ({x:7.1f}, {y:7.1f})  confidence {c:.2f}")
    console.print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from fedpose.files import check_not_an_input
    from fedpose.model.conventions import describe_model
    from fedpose.model.export import ONNX_OPSET, export_onnx
    from fedpose.model.io import load_any_model

    check_not_an_input(args.onnx, args.checkpoint)
    model, cfg, skeleton = load_any_model(args.checkpoint)
    size = cfg.data.input_size
    conventions = describe_model(cfg, skeleton)
    out = export_onnx(model, size, args.onnx, skeleton, conventions=conventions)
    console.print(
        f"image: batch x 3 x {size} x {size} -> heatmaps: batch x "
        f"{skeleton.num_joints} x {size // 4} x {size // 4}, ONNX opset {ONNX_OPSET}"
    )
    print(f"wrote {out}")
    return 0


def cmd_model_from_checkpoint(args) -> int:
    from fedpose.model.io import model_from_checkpoint, save_model

    weights, cfg, skeleton = model_from_checkpoint(args.checkpoint, args.config)
    save_model(args.out, weights, cfg, skeleton)
    print(f"wrote {args.out}")
    return 0


def cmd_score(args) -> int:
    from fedpose.data import FileOptions
    from fedpose.metrics.score_file import score_file, score_table

    if args.alpha is not None and not (math.isfinite(args.alpha) and 0 < args.alpha <= 1):
        raise ValueError(f"--alpha {args.alpha!r} is out of range; allowed: (0, 1]")
    options = FileOptions(split=args.split, labels=args.labels, headboxes=args.headboxes)
    scored = score_file(args.dataset, args.root, args.pred, args.ann, options, args.alpha)
    console.print(score_table(scored.result, scored.skeleton, scored.num_records, args.alpha))
    _print_keypoint_ap(scored.ap, args.dataset)
    print(f"mean PCK: {scored.result.mean:.2f}")
    return 0


def _print_keypoint_ap(ap: dict[str, float], dataset: str) -> None:
    """COCO keypoint AP one value a line (`AP: 0.712`); for synth-arm, also COCO-format, why
    there is none."""
    for name, value in ap.items():
        print(f"{name}: {value:.3f}")
    if not ap and dataset == "synth-arm":
        console.print(
            "keypoint AP: not reported for synth-arm (COCO's OKS constants exist for "
            "its 17 keypoints only)"
        )


def cmd_data_synth_arm(args) -> int:
    from fedpose.data.synth_arm import generate_synth_arm

    ann = generate_synth_arm(args.out, n=args.n, seed=args.seed, size=args.size)
    console.print(f"wrote {ann}")
    return 0


def cmd_data_download(args) -> int:
    from fedpose.data.download import SOURCES, download_dataset

    source = SOURCES[args.name]
    origin = args.from_file or args.url or source.url
    console.print(f"{args.name}: from {origin} (licence and citation: {source.page})", markup=False)
    reported = [0]

    def progress(done: int, total: int | None) -> None:
        if done - reported[0] >= 5 * 2**20 or (total and done == total):
            reported[0] = done
            of = f" of {total / 2**20:.1f}" if total else ""
            console.print(f"  {done / 2**20:.1f}{of} MiB", markup=False)

    dest, fetched = download_dataset(
        args.name, args.to, url=args.url, from_file=args.from_file, progress=progress
    )
    state = "unpacked and checked" if fetched else "already there and complete"
    console.print(f"{args.name}: {state} in {dest}", markup=False, highlight=False)
    return 0


def cmd_data_inspect(args) -> int:
    from fedpose.data.inspect import inspect_dataset, summary_tables

    summary = inspect_dataset(
        args.dataset,
        args.root,
        args.ann,
        labels=args.labels,
        headboxes=args.headboxes,
        decode=not args.quick,
    )
    for table in summary_tables(summary):
        console.print(table)
    return 0


def cmd_data_partition(args) -> int:
    from fedpose.data.partition import print_statistics, write_partition_report

    report = write_partition_report(load_config(args.config, args.overrides))
    print_statistics(report.stats, console, title=report.title)
    for path in (report.json_path, report.png_path):
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_data_split(args) -> int:
    from fedpose.data.site import TEST_FILE, TRAIN_FILE, split_into_sites

    cfg = load_config(args.config, args.overrides)
    sites = split_into_sites(cfg, args.out_dir)
    table = Table(title=f"{len(sites)} site folders ({cfg.fed.partition} partition)")
    for column in ("site folder", "train", "test"):
        table.add_column(column, justify="left" if column == "site folder" else "right")
    for site in sites:
        table.add_row(str(site.folder), str(site.train), str(site.test))
    console.print(table)
    first = sites[0].folder
    console.print(
        f"check one: fedpose data inspect --dataset coco --root {first} --ann {first / TRAIN_FILE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f'serve one: flower-supernode ... --node-config \'data-root="{first}" '
        f'dataset="coco" ann="{TRAIN_FILE}" test-ann="{TEST_FILE}"\'',
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_bench_aggregate(args) -> int:
    from fedpose.tools.bench_aggregate import aggregate_tables, bench_aggregate

    res = bench_aggregate(args.clients, args.params, args.repeats)
    table, notes = aggregate_tables(res)
    console.print(table)
    console.print(notes)
    print(f"fedgh/fedavg: {res['ratio']['fedgh']:.2f}")
    return 0


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


def cmd_bench_sim(args) -> int:
    from fedpose.tools.bench_sim import SimBenchOptions, bench_sim, phase_table, sim_table

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


def _default_root(dataset: str) -> str:
    """$FEDPOSE_DATASETS/<dataset> (where the tests look too) when set, else data/<dataset>
    (where `fedpose data download` puts it)."""
    from fedpose.data.download import default_destination

    return str(default_destination(dataset))


def cmd_bench_flower(args) -> int:
    from fedpose.tools.flower_bench import (
        bench_command,
        run_flower_bench,
        summary_table,
        write_report,
    )
    from fedpose.tools.flower_demo import terminate_on_sigterm

    console.print(f"Flower vs in-process: {args.supernodes} SuperNodes, {args.rounds} rounds")
    with terminate_on_sigterm():
        bench = run_flower_bench(args.config, args.supernodes, args.rounds, args.overrides, console)
    console.print(summary_table(bench))
    if args.out:
        command = bench_command(args.config, args.supernodes, args.rounds, args.overrides, args.out)
        console.print(f"wrote {write_report(bench, command, args.out)}")
    print(f"flower/in-process run time: {bench.summary['ratio_run']:.2f}")
    return 0


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


def cmd_flower_sim(args) -> int:
    from fedpose.tools.flower_demo import demo_config, terminate_on_sigterm
    from fedpose.tools.flower_sim import run_flower_simulation

    cfg = demo_config(
        args.config, args.supernodes, args.rounds, args.overrides, default_name="flower-sim"
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


def cmd_flower_config(args) -> int:
    from fedpose.engine.flower_messages import run_config_toml
    from fedpose.engine.run import check_config

    print(run_config_toml(check_config(load_config(args.config, args.overrides))), end="")
    return 0


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


def cmd_watch(args) -> int:
    from fedpose.report.watch import watch

    finished = watch(args.run_dir, args.every, args.timeout, say=console.print)
    if not finished:
        console.print(f"stopped watching after {args.timeout:g} s; the run has not finished")
    return 0


# Built once per process: its 22 subcommands take ~12 ms to build, and main() is also called
# many times in one process (the tests, a notebook); parsing leaves the parser unchanged.
@functools.cache
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpose", description=__doc__)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="centralized training and evaluation")
    _add_config(p)
    _add_resume(p)
    _add_name(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="one federated run on the in-process engine")
    _add_config(p)
    _add_resume(p)
    _add_name(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="several methods and seeds, then a report")
    _add_config(p)
    p.add_argument(
        "--methods",
        default=METHODS,
        metavar="M1,M2,...",
        help=f"comma-separated aggregation methods (default: {METHODS}); choices: "
        f"{', '.join(_method_names())}",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE;...",
        help="compare named config variants instead of --methods (repeatable)",
    )
    p.add_argument("--seeds", default="0", help="paired seeds: 0,1,2 or 0-9")
    p.add_argument("--name", default=None, help="report name (default: the config's name)")
    p.add_argument("--resume", action="store_true", help="keep finished runs, resume the rest")
    p.add_argument("--force", action="store_true", help="write into a folder another command made")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N seeds/methods at once in worker processes (OMP_NUM_THREADS=1)",
    )
    p.add_argument(
        "--baselines",
        default="fedavg,fedaw",
        help="labels that paired differences are taken against",
    )
    _add_mixed_cpus(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="regenerate a comparison report from run directories")
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS_DIR",
        help="run directories, or folders of LABEL-s<seed> run directories",
    )
    p.add_argument("--out", required=True, help="output folder, or a .md file name")
    p.add_argument("--title", default="fedpose comparison")
    p.add_argument(
        "--baselines",
        default="fedavg,fedaw",
        help="labels that paired differences are taken against",
    )
    p.add_argument("--produced-by", default="", help="the command that made the runs")
    p.add_argument("--notes", default=None, help="a markdown file inserted after the setting")
    p.add_argument(
        "--commit",
        default=None,
        help="the code version, for runs whose config.json does not record it",
    )
    p.add_argument(
        "--target-pck",
        type=float,
        default=0.0,
        help="add time-to-target-PCK columns (simulated seconds)",
    )
    _add_mixed_cpus(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--dump",
        default=None,
        metavar="RESULTS.json",
        help="coco: also write the predictions as a COCO keypoint results file",
    )
    _add_overrides(p, "e.g. -c data.root=/path/to/lsp")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict the keypoints of one image and draw them")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a model file (or a run's checkpoint) as ONNX")
    p.add_argument(
        "checkpoint",
        help="model.safetensors, or RUN/checkpoints/last.safetensors (with RUN/config.json)",
    )
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "model-from-checkpoint",
        help="write a run's checkpoint as a model file that eval, predict and export read",
    )
    p.add_argument("checkpoint", help="RUN/checkpoints/last.safetensors (or previous)")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors")
    p.add_argument(
        "--config",
        default=None,
        metavar="CONFIG.json",
        help="the run's config.json (default: two folders above the checkpoint)",
    )
    p.set_defaults(func=cmd_model_from_checkpoint)

    p = sub.add_parser("score", help="score a predictions file with the dataset's metric")
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--root", required=True, help="dataset folder (images)")
    p.add_argument("--ann", default=None, help="annotation file (mpii, coco)")
    p.add_argument(
        "--pred",
        required=True,
        help="JSON: image file name -> [[x, y], ...]; coco: or a COCO keypoint results list",
    )
    p.add_argument("--headboxes", default=None, help="mpii: gt_valid.mat")
    p.add_argument("--split", default="test", choices=["train", "test", "all"], help="lsp's split")
    p.add_argument("--labels", default="pc", choices=["pc", "oc"], help="lsp labels")
    p.add_argument("--alpha", type=float, default=None, help="threshold (default: standard)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("data", help="generate, inspect and partition data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("synth-arm", help="generate the synthetic single-arm set")
    d.add_argument("out")
    d.add_argument("--n", type=int, default=2060)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=128)
    d.set_defaults(func=cmd_data_synth_arm)
    d = dsub.add_parser(
        "download", help="fetch a public dataset from its source, check it and unpack it"
    )
    d.add_argument("name", choices=["lsp"], help="the dataset (MPII and COCO: docs/datasets.md)")
    d.add_argument(
        "--to",
        default=None,
        metavar="DIR",
        help="destination folder (default: $FEDPOSE_DATASETS/NAME if set, else data/NAME)",
    )
    d.add_argument("--url", default=None, help="another address of the same archive")
    d.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="ARCHIVE",
        help="unpack a local copy of the archive instead of downloading it",
    )
    d.set_defaults(func=cmd_data_download)
    d = dsub.add_parser("inspect", help="load a dataset and summarise it")
    d.add_argument("--dataset", required=True, choices=list(DATASETS))
    d.add_argument("--root", required=True)
    d.add_argument("--ann", default=None)
    d.add_argument("--labels", default="pc", choices=["pc", "oc"], help="lsp labels")
    d.add_argument("--headboxes", default=None, help="mpii: gt_valid.mat, checked against --ann")
    d.add_argument(
        "--quick",
        action="store_true",
        help="read image headers only instead of decoding every image",
    )
    d.set_defaults(func=cmd_data_inspect)
    d = dsub.add_parser("partition", help="print and plot per-client statistics")
    _add_config(d)
    d.set_defaults(func=cmd_data_partition)
    d = dsub.add_parser(
        "split",
        help="write one COCO-format folder per client of the "
        "partition (images, train.json, test.json)",
    )
    _add_config(d)
    d.add_argument("out_dir", help="where the site folders site0, site1, ... go")
    d.set_defaults(func=cmd_data_split)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    b = bsub.add_parser("aggregate", help="time one server aggregation step")
    b.add_argument("--clients", type=int, default=16)
    b.add_argument("--params", type=int, default=34_000_000)
    b.add_argument("--repeats", type=int, default=3)
    b.set_defaults(func=cmd_bench_aggregate)
    b = bsub.add_parser("data", help="data pipeline samples/s vs model training img/s")
    _add_data_source(b)
    b.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = every core)")
    b.add_argument("--batch", type=int, default=32, help="DataLoader batch size")
    b.add_argument("--samples", type=int, default=256, help="samples per pipeline pass")
    b.add_argument("--model-batch", type=int, default=32)
    b.add_argument("--steps", type=int, default=5, help="timed training steps per pass")
    b.add_argument("--repeats", type=int, default=2)
    b.set_defaults(func=cmd_bench_data)
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
    b.set_defaults(func=cmd_bench_sim)
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
    b = bsub.add_parser(
        "flower", help="the same federation on Flower processes and in-process, timed"
    )
    _add_flower_run(b, rounds=3)
    b.add_argument("--out", default=None, help="write the figures as markdown here")
    b.set_defaults(func=cmd_bench_flower, interrupted=FLOWER_INTERRUPTED)

    p = sub.add_parser("flower-demo", help="the federation on real Flower processes vs in-process")
    _add_flower_run(p, rounds=2)
    p.set_defaults(func=cmd_flower_demo, interrupted=FLOWER_INTERRUPTED)

    p = sub.add_parser(
        "flower-sim", help="the federation on Flower's Simulation Engine (virtual SuperNodes, Ray)"
    )
    _add_flower_run(p, rounds=2)
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

    p = sub.add_parser(
        "flower-config", help="print a `flwr run --run-config` file that carries a fedpose config"
    )
    _add_config(p, required=False)
    p.set_defaults(func=cmd_flower_config)

    p = sub.add_parser(
        "flower-pull",
        help="a Flower run's metrics, config and model from its log stream into a run folder",
    )
    p.add_argument("run_id", type=int, metavar="RUN_ID", help="as `flwr run` printed it")
    p.add_argument("superlink", nargs="?", default=None, help="SuperLink connection name")
    p.add_argument("--out", type=Path, default=None, help="run folder (runs/flower-RUN_ID)")
    p.add_argument("--force", action="store_true", help="write over a pulled run in --out")
    p.set_defaults(func=cmd_flower_pull)

    p = sub.add_parser("watch", help="redraw a run's curves (RUN_DIR/watch.png) while it goes on")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--every", type=float, default=10.0, help="seconds between redraws")
    p.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="stop after this many seconds"
    )
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "sketch-study",
        help="what sketch widths cost secure FedGH, per round, on one exact run (docs/security.md)",
    )
    _add_config(p, required=False)
    p.add_argument("--widths", default="1024,4096,16384,65536")
    p.add_argument("--keys", type=int, default=3, help="consortium secrets tried per width")
    p.add_argument(
        "--flower-cost",
        metavar="DIR",
        help="instead: bytes and seconds per round of plain vs secure FedAvg/FedGH on loopback "
        "Flower processes (the tiny flower-demo federation), written to DIR",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of each --flower-cost run")
    p.set_defaults(func=cmd_sketch_study)
    return parser


def cmd_sketch_study(args) -> int:
    import json

    from fedpose.tools.secure_study import flower_cost, sketch_study, summary_table

    if args.flower_cost:
        out = Path(args.flower_cost).resolve()
        rows = flower_cost(out, rounds=args.rounds)
        (out / "flower_cost.json").write_text(json.dumps(rows, indent=2))
        return 0
    cfg = load_config(args.config, [*args.overrides, "fed.method=fedgh"])
    widths = [int(w) for w in args.widths.split(",")]
    print(summary_table(sketch_study(cfg, widths, args.keys)))
    return 0


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


def _add_mixed_cpus(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mixed-cpus",
        action="store_true",
        help="report runs made on different CPU models (config.json runtime.cpu_model) together",
    )


def _add_flower_run(p: argparse.ArgumentParser, rounds: int) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="TOML config file (default: a tiny synth-arm federation)",
    )
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=rounds)
    _add_overrides(p)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Data warnings as one `warning:` line; others as Python prints them."""
    from fedpose.data.records import DatasetWarning

    if issubclass(category, DatasetWarning):
        err_console.print(f"warning: {message}", markup=False, highlight=False)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _method_names() -> tuple[str, ...]:
    # fl.strategies.STRATEGY_NAMES is the one list, but importing it loads torch;
    # tests/test_cli_light.py checks that this copy is the same
    return METHOD_CHOICES


def _federation_error() -> type[BaseException] | tuple:
    """fl.server's FederationError once that module is loaded (only then can it be raised);
    importing it up front would load torch for `--help`."""
    module = sys.modules.get("fedpose.fl.server")
    return getattr(module, "FederationError", ())


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    # reports name the command that wrote them
    args.command_line = shlex.join(["fedpose", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (DatasetError, ConfigError, ToolError, OSError, ValueError) as e:
        # the one error path: one line naming the file and record (DatasetError does), exit 2;
        # no markup (messages hold "[record ...]") and no wrapping
        err_console.print(f"error: {e}", markup=False, highlight=False)
        return 2
    except _federation_error() as e:  # the input was fine; the run itself failed
        err_console.print(f"error: {e}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print(f"interrupted: {getattr(args, 'interrupted', RUN_INTERRUPTED)}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
