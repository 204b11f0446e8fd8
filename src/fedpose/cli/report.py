"""`fedpose compare`, `fedpose report`, `fedpose family` and `fedpose watch`: comparisons
(engine/experiment.py), their reports, a Holm-corrected family of them (report/family.py) and
live curves; each handler beside its arguments."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedpose.cli.common import (
    METHODS,
    add_config,
    add_force,
    add_name,
    console,
    err_console,
    method_names,
    own_folder,
    own_name,
    split,
)


def _variants(args) -> list[tuple[str, list[str]]]:
    """(label, overrides) per compared variant: --variant LABEL:key=value;key=value, or one
    variant per --methods entry."""
    from fedpose.engine.experiment import method_variants, parse_variant

    if not args.variant:
        return method_variants(args.methods)
    return [parse_variant(spec) for spec in args.variant]


def _seeds(text: str) -> list[int]:
    """'0,1,2' or '0-9' (or a mix: '0-4,7')."""
    from fedpose.engine.experiment import parse_seeds

    return parse_seeds(text)


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mixed-cpus",
        action="store_true",
        help="report runs made on different CPU models (config.json runtime.cpu_model) together",
    )
    p.add_argument(
        "--no-figures",
        action="store_true",
        help="tables only: no PNG curves (about a second less per figure)",
    )


def cmd_compare(args) -> int:
    from fedpose.engine.experiment import Comparison, ComparisonError, run_comparison

    plan = Comparison(
        args.config,
        args.overrides + own_name(args, "compare"),
        _variants(args),
        _seeds(args.seeds),
        resume=args.resume,
        jobs=args.jobs,
        force=args.force,
        baselines=tuple(split(args.baselines)),
        command=args.command_line,
        mixed_cpus=args.mixed_cpus,
        figures=not args.no_figures,
    )
    try:
        report = run_comparison(plan, console)
    except ComparisonError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False)
        return 1
    console.print(report.read_text().split("## Curves")[0], markup=False, highlight=False)
    console.print(f"report: {report}")
    return 0


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="several methods and seeds, then a report")
    add_config(p)
    p.add_argument(
        "--methods",
        default=METHODS,
        metavar="M1,M2,...",
        help=f"comma-separated aggregation methods (default: {METHODS}); choices: "
        f"{', '.join(method_names())}",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE;...",
        help="compare named config variants instead of --methods (repeatable)",
    )
    p.add_argument("--seeds", default="0", help="paired seeds: 0,1,2 or 0-9")
    add_name(p, own_folder("compare"))
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
    _add_report_options(p)
    p.set_defaults(func=cmd_compare)


def cmd_report(args) -> int:
    from fedpose.report.experiment import load_arms, made_by_report, write_report
    from fedpose.run_dir import RunDirError, check_output, mark, read_regular

    out = Path(args.out)
    # a report never replaces another command's (a comparison's report.md and plots), nor a
    # page it did not write itself (a hand-written results/PLAN.md has no owner record)
    check_output(out, "report", args.force)
    page = out if out.suffix == ".md" else out / "report.md"  # the page write_report writes
    if page.is_file() and not args.force and not made_by_report(read_regular(page)):
        raise RunDirError(
            f"{page}: a page `fedpose report` did not write; it would be replaced: choose "
            f"another path (or --force to overwrite)"
        )
    new_folder = out.suffix != ".md" and not out.exists()
    arms = load_arms([Path(p) for p in args.runs])
    notes = Path(args.notes).read_text() if args.notes else ""
    report = write_report(
        arms,
        out,
        args.title,
        baselines=tuple(split(args.baselines)),
        command=args.command_line,
        produced_by=args.produced_by or "",
        notes=notes,
        commit=args.commit,
        target_pck=args.target_pck,
        mixed_cpus=args.mixed_cpus,
        figures=not args.no_figures,
    )
    if new_folder:
        mark(out, "report")  # the folder this report made is its own
    console.print(report.read_text().split("## Curves")[0], markup=False, highlight=False)
    console.print(f"report: {report}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="regenerate a comparison report from run directories")
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS_DIR",
        help="run directories, or folders of LABEL-s<seed> run directories",
    )
    p.add_argument("--out", required=True, help="output folder, or a .md file name")
    add_force(p, "a report (or folder) another command made")
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
    _add_report_options(p)
    p.set_defaults(func=cmd_report)


def _pair(text: str) -> tuple[str, str]:
    arm, _, baseline = text.partition(":")
    if not arm or not baseline or ":" in baseline:
        raise ValueError(f"--pair {text!r}: expected ARM:BASELINE, two arm labels")
    return arm, baseline


def _members(specs: list[str], pair: str | None) -> list:
    """One comparison per NAME=PATH (on --pair) or NAME=PATH:ARM:BASELINE (its own pair)."""
    from fedpose.report.family import Member

    default = _pair(pair) if pair else None
    members = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        parts = rest.rsplit(":", 2)  # labels never hold ':'; a path may
        if len(parts) == 3 and not Path(rest).is_file():
            if default and not Path(parts[0]).is_file():  # two readings, neither a file
                raise ValueError(f"{spec!r}: neither {rest!r} nor {parts[0]!r} is a file")
            path, arm, baseline = parts
        else:  # a file whose own name holds two colons is that file, on --pair
            path, arm, baseline = rest, *(default or ("", ""))
        if not (name and path and arm and baseline):
            raise ValueError(
                f"{spec!r}: expected NAME=PATH with --pair ARM:BASELINE, or NAME=PATH:ARM:BASELINE"
            )
        if arm == baseline:  # a zero row would still count in Holm's m, against the others
            raise ValueError(f"{spec!r}: {arm!r} compared with itself")
        members.append(Member(name, Path(path), arm, baseline))
    return members


def cmd_family(args) -> int:
    from fedpose.report.family import compare_family, render, write_family

    if not (math.isfinite(args.alpha) and 0 < args.alpha < 1):
        raise ValueError(f"--alpha {args.alpha!r} is out of range; allowed: (0, 1)")
    results = compare_family(_members(args.summaries, args.pair), args.alpha)
    notes = Path(args.notes).read_text() if args.notes else ""
    out = None
    if args.out:  # written (or refused) before anything is printed
        out = write_family(
            results, args.alpha, args.out, args.command_line, args.force, args.title, notes
        )
    console.print(render(results, args.alpha, title=args.title), markup=False, highlight=False)
    if out:
        console.print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def add_family(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "family",
        help="a family of comparisons across reports' summary.json: paired t, Holm's correction",
    )
    p.add_argument(
        "summaries",
        nargs="+",
        metavar="NAME=PATH[:ARM:BASELINE]",
        help="a comparison: a report's summary.json, compared on --pair or on its own pair",
    )
    p.add_argument("--pair", metavar="ARM:BASELINE", help="the arm and baseline labels compared")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise level (default 0.05)")
    p.add_argument("--title", default="A family of comparisons, Holm-corrected")
    p.add_argument("--notes", default=None, help="a markdown file added after the table")
    p.add_argument(
        "--out", type=Path, metavar="FILE.md", help="write the table here, and FILE.json beside it"
    )
    add_force(p, "an --out file that `fedpose family` did not write")
    p.set_defaults(func=cmd_family)


def cmd_watch(args) -> int:
    from fedpose.report.watch import watch

    finished = watch(args.run_dir, args.every, args.timeout, say=console.print)
    if not finished:
        console.print(f"stopped watching after {args.timeout:g} s; the run has not finished")
    return 0


def add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="redraw a run's curves (RUN_DIR/watch.png) while it goes on")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--every", type=float, default=10.0, help="seconds between redraws")
    p.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="stop after this many seconds"
    )
    p.set_defaults(func=cmd_watch)
