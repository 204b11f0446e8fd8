"""A comparison: several methods (or config variants) on the same paired seeds, each run
through the run lifecycle, then the report (`fedpose compare`).

With `jobs` > 1 the runs go to single-thread worker processes (engine/parallel.py), each one a
call of `run_one` with its config file and overrides; otherwise they run here, one after the
other. Runs are seed-major: each seed's paired set completes before the next seed starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedpose.config import ConfigError, DataConfig, load_config
from fedpose.data import synth_arm_annotations
from fedpose.data.records import DatasetError
from fedpose.engine.parallel import Job, run_jobs
from fedpose.engine.progress import RoundProgress
from fedpose.engine.run import check_config
from fedpose.engine.runner import run_federation
from fedpose.fl.server import FederationError
from fedpose.metrics.log import read_metrics
from fedpose.report.experiment import load_arms, write_report
from fedpose.run_dir import claim, mark


@dataclass
class Comparison:
    """What `fedpose compare` was asked for."""

    config: str | None  # the TOML file every run starts from
    overrides: list[str]  # section.key=value for every run
    variants: list[tuple[str, list[str]]]  # (label, its overrides)
    seeds: list[int]
    name: str | None = None  # the report's folder under out_dir (default: the config's name)
    force: bool = False  # write into a folder another command made (fedpose.run_dir)
    resume: bool = False  # keep finished runs, resume the rest
    jobs: int = 1  # worker processes
    baselines: tuple[str, ...] = ("fedavg", "fedaw")
    command: str = ""  # the command line, for the report
    mixed_cpus: bool = False  # report runs made on different CPU models together
    figures: bool = True  # PNG curves beside the report


class ComparisonError(RuntimeError):
    """Some runs of a comparison failed (their logs say why)."""


def method_variants(methods: str) -> list[tuple[str, list[str]]]:
    """One variant per method of a comma-separated list: (method, ["fed.method=<method>"])."""
    return [(m.strip(), [f"fed.method={m.strip()}"]) for m in methods.split(",") if m.strip()]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """LABEL:key=value;key=value -> (label, overrides)."""
    label, _, sets = spec.partition(":")
    if not label or "/" in label:
        raise ConfigError(f"--variant {spec!r}: expected LABEL:key=value;key=value")
    return label, [x.strip() for x in sets.split(";") if x.strip()]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-9' (or a mix: '0-4,7')."""
    seeds: list[int] = []
    for part in (x.strip() for x in str(text).split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected e.g. 0,1,2 or 0-9") from None
    return seeds


def run_one(config: str | None, overrides: list[str], resume: bool) -> int:
    """One run of a comparison in a worker process; its exit code as `fedpose run` gives it (an
    `error:` line and 2 for bad input, 1 for a failed federation)."""
    console = Console(soft_wrap=True, emoji=False)
    try:
        run_federation(load_config(config, overrides), resume=resume, console=console)
    except (DatasetError, ConfigError, OSError, ValueError) as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        return 2
    except FederationError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        return 1
    return 0


def run_comparison(plan: Comparison, console: Console | None = None) -> Path:
    """Run (or resume) every run of the comparison, then write its report; the report's path.
    Raises ComparisonError naming the runs that failed."""
    console = console or Console(emoji=False)
    base = load_config(plan.config, plan.overrides)
    name = plan.name or base.name
    runs = [
        (label, seed, plan.overrides + sets + [f"seed={seed}", f"name={name}/{label}-s{seed}"])
        for seed in plan.seeds
        for label, sets in plan.variants
    ]
    # every run's config checked before the first one starts (and before the folder is
    # claimed): a typo in the last variant does not wait for the others to finish
    configs = [check_config(load_config(plan.config, run_sets)) for _, _, run_sets in runs]
    folder = Path(base.out_dir) / name
    # the comparison's folder is its own: locked, and never one a `run` or `train` made
    with claim(folder, base.out_dir, "compare", force=plan.force):
        mark(folder, "compare")
        return _run_claimed(plan, base, runs, configs, console)


def _run_claimed(plan: Comparison, base, runs: list, configs: list, console: Console) -> Path:
    name = plan.name or base.name
    run_dirs: list[Path] = []
    jobs: list[Job] = []
    watched: dict[str, tuple[Path, int]] = {}  # job name -> (run folder, rounds), for progress
    synth_data: dict[str, DataConfig] = {}  # by root: each synth-arm set its parallel runs read
    for (label, seed, run_sets), cfg in zip(runs, configs, strict=True):
        run_dirs.append(cfg.run_dir)
        rows = read_metrics(cfg.run_dir)
        if plan.resume and rows and rows[-1].get("round", 0) >= cfg.fed.rounds:
            console.print(f"{cfg.name}: finished earlier, kept")
            continue
        # a run killed before its first checkpoint resumes by starting over
        if plan.jobs > 1:
            if cfg.data.dataset == "synth-arm":
                synth_data[cfg.data.root] = cfg.data
            log = cfg.run_dir.parent / f"{label}-s{seed}.log"
            jobs.append(Job(cfg.name, run_one, (plan.config, run_sets, plan.resume), log))
            watched[cfg.name] = (cfg.run_dir, cfg.fed.rounds)
        else:
            run_federation(cfg, resume=plan.resume, console=console)
    if jobs:
        for data in synth_data.values():
            # generated here, once: parallel runs would each render the same set into one folder
            synth_arm_annotations(data, workers=plan.jobs)
        console.print(
            f"{len(jobs)} runs in {min(plan.jobs, len(jobs))} processes, one thread "
            "each; logs beside the run directories"
        )

        with RoundProgress(console, watched) as progress:

            def done(job: Job, code: int, seconds: float) -> None:
                state = "done" if code == 0 else f"FAILED (exit {code}, see {job.log})"
                progress.finished(job.name, f"{state} in {seconds:.0f} s")

            def tick(running: list[Job]) -> None:
                progress.poll(job.name for job in running)

            codes = run_jobs(jobs, plan.jobs, done, tick)
        failed = [n for n, c in codes.items() if c != 0]
        if failed:
            raise ComparisonError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return write_report(
        load_arms(run_dirs),
        base.run_dir.parent / name,
        f"fedpose compare: {name}",
        baselines=plan.baselines,
        command=plan.command,
        produced_by=plan.command,
        target_pck=base.fed.target_pck,
        mixed_cpus=plan.mixed_cpus,
        figures=plan.figures,
    )
