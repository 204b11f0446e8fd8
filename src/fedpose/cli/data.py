"""`fedpose data ...`: generate, inspect, partition and split data; each handler beside its
arguments."""

from __future__ import annotations

import argparse

from rich.table import Table

from fedpose.cli.common import (
    add_config,
    add_force,
    add_name,
    console,
    name_override,
)
from fedpose.config import load_config
from fedpose.data import DATASETS
from fedpose.run_dir import check_output


def cmd_data_synth_arm(args) -> int:
    from fedpose.data.synth_arm import generate_synth_arm

    check_output(args.out, "data synth-arm", args.force)
    ann = generate_synth_arm(args.out, n=args.n, seed=args.seed, size=args.size)
    console.print(f"wrote {ann}")
    return 0


def add_data_synth_arm(dsub: argparse._SubParsersAction) -> None:
    d = dsub.add_parser("synth-arm", help="generate the synthetic single-arm set")
    d.add_argument("out")
    d.add_argument("--n", type=int, default=2060)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=128)
    add_force(d, "a folder another command made")
    d.set_defaults(func=cmd_data_synth_arm)


def cmd_data_download(args) -> int:
    from fedpose.data.download import SOURCES, download_dataset

    source = SOURCES[args.name]
    if args.to:
        check_output(args.to, "data download", args.force)
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


def add_data_download(dsub: argparse._SubParsersAction) -> None:
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
    add_force(d, "a --to folder another command made")
    d.set_defaults(func=cmd_data_download)


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


def add_data_inspect(dsub: argparse._SubParsersAction) -> None:
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


def cmd_data_partition(args) -> int:
    from fedpose.data.partition import print_statistics, write_partition_report

    cfg = load_config(args.config, args.overrides)
    # its own folder beside the runs of the config: a preview never takes a run's name
    name = name_override(args) or [f"name={cfg.name}-partition"]
    report = write_partition_report(load_config(args.config, args.overrides + name), args.force)
    print_statistics(report.stats, console, title=report.title)
    for path in (report.json_path, report.png_path):
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return 0


def add_data_partition(dsub: argparse._SubParsersAction) -> None:
    d = dsub.add_parser(
        "partition", help="print and plot per-client statistics (runs/NAME-partition/)"
    )
    add_config(d)
    add_name(d, "the config's name + '-partition'")
    add_force(d, "a folder another command made")
    d.set_defaults(func=cmd_data_partition)


def cmd_data_split(args) -> int:
    from fedpose.data.site import TEST_FILE, TRAIN_FILE, split_into_sites

    cfg = load_config(args.config, args.overrides)
    sites = split_into_sites(cfg, args.out_dir, args.force)
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


def add_data_split(dsub: argparse._SubParsersAction) -> None:
    d = dsub.add_parser(
        "split",
        help="write one COCO-format folder per client of the "
        "partition (images, train.json, test.json)",
    )
    add_config(d)
    d.add_argument("out_dir", help="where the site folders site0, site1, ... go")
    add_force(d, "a folder another command made")
    d.set_defaults(func=cmd_data_split)


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate, inspect and partition data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    add_data_synth_arm(dsub)
    add_data_download(dsub)
    add_data_inspect(dsub)
    add_data_partition(dsub)
    add_data_split(dsub)
