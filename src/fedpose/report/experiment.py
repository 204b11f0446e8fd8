"""A comparison report regenerated from run directories: what `fedpose compare` and
`fedpose report` write.

Runs are grouped into arms by their directory name (`LABEL-s<seed>`; the seed comes from the
run's config.json). Each run is scored by the tail mean of stats.py; the report gives per-joint
tables (mean ± std over seeds), paired differences to the baseline arms with 95 % intervals, and
curves with seed bands. Runs that stopped before their configured rounds are listed, not scored.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpose.bounded import read_json
from fedpose.metrics.log import read_metrics
from fedpose.report.stats import (
    TAIL,
    mean_std,
    paired_difference,
    tail_mean,
    tail_rows,
    tail_window,
)
from fedpose.run_dir import write_file

# the line a report names its command on; `fedpose report` replaces only pages that carry it
# with its own name (a hand-written page beside the reports has none)
_MADE_BY = "Report made by: "


def made_by_report(page: bytes) -> bool:
    """Whether a page's header (before its first section) names `fedpose report` as its maker,
    on a line of its own: a page that only quotes such a line further down is not a report."""
    header = page.decode(errors="replace").split("\n## ", 1)[0]
    return any(line.startswith(f"{_MADE_BY}`fedpose report ") for line in header.splitlines())


_SEED_SUFFIX = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)$")


@dataclass
class Run:
    path: Path
    label: str
    seed: int
    config: dict
    rows: list[dict]
    # a `fedpose train` run (the upper bound, or one client alone): its epochs are read as rounds
    centralized: bool = False

    @property
    def total_rounds(self) -> int:
        section, key = ("train", "epochs") if self.centralized else ("fed", "rounds")
        return int(self.config.get(section, {}).get(key, 0)) or self.last_round

    @property
    def last_round(self) -> int:
        return max((r["round"] for r in self.rows), default=0)

    @property
    def complete(self) -> bool:
        return bool(self.rows) and self.last_round >= self.total_rounds


@dataclass
class Arm:
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def complete_runs(self) -> list[Run]:
        return sorted((r for r in self.runs if r.complete), key=lambda r: r.seed)

    def scores(self, key: str = "pck_mean") -> dict[int, float]:
        out = {}
        for run in self.complete_runs:
            value = tail_mean(run.rows, run.total_rounds, key)
            if value is not None:
                out[run.seed] = value
        return out

    def joint_scores(self, joint: str) -> list[float]:
        values = []
        for run in self.complete_runs:
            picked = [
                r["pck_per_joint"][joint]
                for r in tail_rows(run.rows, run.total_rounds)
                if joint in (r.get("pck_per_joint") or {})
            ]
            if picked:
                values.append(float(np.mean(picked)))
        return values


def _run_dirs(path: Path) -> list[Path]:
    if (path / "metrics.jsonl").exists():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())


def load_arms(paths: list[Path]) -> dict[str, Arm]:
    """Arms by label, from run directories or folders of run directories, in first-seen order."""
    arms: dict[str, Arm] = {}
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory")
        dirs = _run_dirs(path)
        if not dirs:
            raise FileNotFoundError(f"{path}: no run directories (metrics.jsonl) inside")
        for d in dirs:
            config_path = d / "config.json"
            config = read_json(config_path) if config_path.exists() else {}
            problem = _config_problem(config)
            if problem:
                raise ValueError(f"{config_path}: {problem}")
            m = _SEED_SUFFIX.match(d.name)
            label = m["label"] if m else d.name
            seed = config.get("seed", int(m["seed"]) if m else 0)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(
                    f"{config_path}: key 'seed': expected an integer, found {seed!r:.40}"
                )
            rows = read_metrics(d)
            centralized = bool(rows) and "round" not in rows[0] and "epoch" in rows[0]
            key = "epoch" if centralized else "round"
            for number, r in enumerate(rows, start=1):
                if key not in r:
                    # every row of one run counts the same way (rounds, or epochs read as rounds)
                    raise ValueError(
                        f"{d / 'metrics.jsonl'} [row {number}]: key {key!r} is missing"
                    )
            if centralized:
                rows = [{**r, "round": r["epoch"]} for r in rows]
            run = Run(d, label, seed, config, rows, centralized)
            arms.setdefault(label, Arm(label)).runs.append(run)
    return arms


# ----------------------------------------------------------------------------------- the report
def _relative(path: str | None) -> str | None:
    """A data path as the report shows it: relative to where the report is made (the
    repository), never the absolute path of the machine that made it."""
    if not path or not Path(path).is_absolute():
        return path
    return os.path.relpath(path)


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.2f}"


def _config_problem(config: object) -> str | None:
    """What a run's config.json holds of the wrong type for the report (None: sound)."""
    if not isinstance(config, dict):
        return "not a JSON object"
    for section in ("data", "model", "fed", "train", "runtime"):
        if not isinstance(config.get(section, {}), dict):
            return f"key {section!r}: expected an object"
    for section, key in (("fed", "rounds"), ("train", "epochs")):
        value = config.get(section, {}).get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"key '{section}.{key}': expected an integer >= 0, found {value!r:.40}"
    return None


def _setting(arms: dict[str, Arm]) -> list[str]:
    runs = [r for a in arms.values() for r in a.runs]
    cfg = runs[0].config if runs else {}
    if not cfg:
        return []
    d, m, f, t = (cfg.get(k, {}) for k in ("data", "model", "fed", "train"))
    work = (
        f"{f.get('local_steps')} local batches of {t.get('batch_size')}"
        if f.get("local_steps")
        else f"{f.get('local_epochs')} local epoch(s)"
    )
    partition = f.get("partition")
    if partition in ("attribute", "dirichlet"):
        partition += f" by {f.get('partition_attr')}"
    if partition == "dirichlet":
        partition += f" (α = {f.get('dirichlet_alpha')})"
    runtime = cfg.get("runtime", {})
    lines = [
        f"Setting: {d.get('dataset')} ({_relative(d.get('root'))}), {f.get('num_clients')} clients "
        f"split {partition}, {f.get('mode')} mode, PoseResNet-{m.get('depth')} width "
        f"{m.get('width')} at {d.get('input_size')}×{d.get('input_size')}, {work} per round, "
        f"{f.get('rounds')} rounds, evaluated every {f.get('eval_every')} round(s)."
    ]
    if runtime:
        lines.append(
            f"Runtime (first run's config.json): {runtime.get('torch_threads')} torch "
            f"thread(s), Gram path {runtime.get('gram_path')}, torch "
            f"{runtime.get('torch')}, {runtime.get('machine')}."
        )
    if d.get("val_fraction"):
        lines.append(
            f"Scored on a validation split: {d['val_fraction']:.0%} of every client's training "
            "records, held out of training (data.val_fraction); the test split is not used."
        )
    models = cpu_models(arms)
    if models:
        lines.append(
            "CPU model of the runs: "
            + "; ".join(f"{name} ({len(paths)} runs)" for name, paths in models.items())
            + "."
        )
    return lines


def cpu_models(arms: dict[str, Arm]) -> dict[str, list[Path]]:
    """{CPU model: runs made on it}, from each config.json's runtime (runs from before it was
    recorded are left out)."""
    out: dict[str, list[Path]] = {}
    for arm in arms.values():
        for run in arm.runs:
            name = run.config.get("runtime", {}).get("cpu_model")
            if name:
                out.setdefault(str(name), []).append(run.path)
    return out


def check_one_cpu_model(arms: dict[str, Arm]) -> None:
    """ValueError when the runs were made on more than one CPU model: the same code and seed give
    different numbers on different CPUs (results/README.md), so paired differences across CPU
    models mix the machine's effect into the method's."""
    models = cpu_models(arms)
    if len(models) > 1:
        parts = [f"{name}: {len(paths)} runs, e.g. {paths[0]}" for name, paths in models.items()]
        raise ValueError(
            f"the runs were made on {len(models)} CPU models ({'; '.join(parts)}); paired "
            "seeds are comparable only on one CPU model; pass --mixed-cpus to report them anyway"
        )


def write_report(
    arms: dict[str, Arm],
    out_dir: Path,
    title: str,
    *,
    baselines: tuple[str, ...] = ("fedavg", "fedaw"),
    command: str = "",
    produced_by: str = "",
    commit: str | None = None,
    notes: str = "",
    target_pck: float = 0.0,
    mixed_cpus: bool = False,
    figures: bool = True,
) -> Path:
    """Write report.md (or the name out_dir ends in, when it ends in .md), PNG curves beside it
    (unless not `figures`: the tables alone, without matplotlib's second a plot) and
    summary.json; returns the markdown path. Refuses (ValueError, before writing anything) runs
    made on different CPU models unless `mixed_cpus`."""
    if not mixed_cpus:
        check_one_cpu_model(arms)
    out_dir = Path(out_dir)
    md_path = out_dir if out_dir.suffix == ".md" else out_dir / "report.md"
    out_dir = md_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "" if md_path.name == "report.md" else md_path.stem + "_"
    commits = sorted(
        {r.config.get("runtime", {}).get("commit") or "" for a in arms.values() for r in a.runs}
        - {""}
    )
    commit_text = commit or (", ".join(commits) if commits else "not recorded")

    lines = [f"# {title}", ""]
    if produced_by:
        lines.append(f"Runs made by: `{produced_by}`  ")
    if command:
        lines.append(f"{_MADE_BY}`{command}`  ")
    lines.append(f"Code: commit {commit_text}")
    lines.append("")
    lines += _setting(arms)
    total = max((r.total_rounds for a in arms.values() for r in a.runs), default=0)
    first, last = tail_window(total) if total else (0, 0)
    lines += [
        "",
        "Score of a run, fixed in advance: the mean PCK over its evaluations in the "
        f"last {TAIL:.0%} of its rounds (rounds {first}–{last} of {total}), never the best "
        "round. Seeds are paired: the same seed gives every method the same partition, "
        "data order and initial model.",
        "",
        HOW_TO_READ,
        "",
    ]
    if notes:
        lines += [notes, ""]

    joints = _joints(arms)
    lines += [
        "## PCK per joint (mean ± std over seeds)",
        "",
        "| " + " | ".join(["method", "seeds", *joints, "mean PCK"]) + " |",
        "|---" * (len(joints) + 3) + "|",
    ]
    summary: dict = {
        "metric": f"mean PCK over the evaluations in rounds {first}-{last}",
        "arms": {},
        "differences": {},
    }
    for label, arm in arms.items():
        scores = arm.scores()
        mean, std = mean_std(list(scores.values()))
        per_joint = [_pm(*mean_std(arm.joint_scores(j))) for j in joints]
        lines.append(
            f"| {label} | {len(scores)} | " + " | ".join(per_joint) + f" | {_pm(mean, std)} |"
        )
        summary["arms"][label] = {
            "seeds": sorted(scores),
            "scores": scores,
            "mean": mean,
            "std": std,
        }

    lines += _differences(arms, baselines, summary)
    if target_pck > 0:
        lines += _time_to_target(arms, target_pck)
    lines += _tuning_table(arms, summary)
    lines += _site_table(arms)
    lines += _site_table(arms, "site_pck_local_bn")
    lines += _aggregation_table(arms)
    if figures:
        lines += _figures(arms, out_dir, prefix, (first, last))
    else:
        lines += ["", "## Curves", "", "Not drawn (`--no-figures`)."]
    lines += _layer_conflicts(arms, out_dir, prefix, draw=figures)

    incomplete = [r for a in arms.values() for r in a.runs if not r.complete]
    lines += ["", "## Runs", ""]
    for label, arm in arms.items():
        seeds = ", ".join(str(r.seed) for r in arm.complete_runs) or "none"
        lines.append(f"- {label}: seeds {seeds} ({arm.runs[0].path.parent})")
    for r in incomplete:
        lines.append(
            f"- not scored, stopped at round {r.last_round} of {r.total_rounds}: {r.path.name}"
        )
    lines.append("")
    # new files renamed into place: a link in the report folder is replaced, not written through
    write_file(md_path, "\n".join(lines))
    write_file(out_dir / f"{prefix}summary.json", json.dumps(summary, indent=2))
    return md_path


def _joints(arms: dict[str, Arm]) -> list[str]:
    for arm in arms.values():
        for run in arm.complete_runs:
            for row in reversed(run.rows):
                if row.get("pck_per_joint"):
                    return list(row["pck_per_joint"])
    return []


def _differences(arms: dict[str, Arm], baselines: tuple[str, ...], summary: dict) -> list[str]:
    refs = [b for b in baselines if b in arms]
    if not refs:
        return []
    lines = [
        "",
        "## Paired differences in mean PCK (points, 95 % interval, paired t over seeds)",
        "",
        "A difference is resolved when its interval excludes zero; otherwise the seeds "
        "do not tell the two methods apart.",
        "",
        "| method − baseline | seeds | mean difference | std of differences | 95 % interval "
        "| resolved |",
        "|---|---|---|---|---|---|",
    ]
    for ref in refs:
        for label, arm in arms.items():
            if label == ref:
                continue
            diff = paired_difference(arm.scores(), arms[ref].scores())
            if diff is None:
                continue
            interval = "–" if math.isnan(diff.low) else f"[{diff.low:+.2f}, {diff.high:+.2f}]"
            lines.append(
                f"| {label} − {ref} | {diff.n} | {_signed(diff.mean)} | "
                f"{'–' if math.isnan(diff.std) else f'{diff.std:.2f}'} | {interval} | "
                f"{'yes' if diff.resolved else 'no'} |"
            )
            summary["differences"][f"{label}-{ref}"] = {
                "n": diff.n,
                "mean": diff.mean,
                "std": diff.std,
                "low": diff.low,
                "high": diff.high,
                "resolved": diff.resolved,
            }
    if lines[-1].startswith("|---"):
        lines += ["", "No finished run has a baseline run of the same seed: nothing to compare."]
    return lines


def _time_to_target(arms: dict[str, Arm], target: float) -> list[str]:
    lines = [
        "",
        f"## Time to PCK ≥ {target:g} % (simulated seconds and rounds; mean ± std over "
        "the seeds that reached it)",
        "",
        "| method | reached | simulated time | rounds | simulated time at the end |",
        "|---|---|---|---|---|",
    ]
    for label, arm in arms.items():
        times, rounds, ends = [], [], []
        for run in arm.complete_runs:
            hit = next((r for r in run.rows if (r.get("pck_mean") or -1) >= target), None)
            if hit is not None:
                times.append(hit.get("sim_time", math.nan))
                rounds.append(hit["round"])
            ends.append(run.rows[-1].get("sim_time", math.nan))
        lines.append(
            f"| {label} | {len(times)}/{len(arm.complete_runs)} | "
            f"{_pm(*mean_std(times), digits=1)} | {_pm(*mean_std(rounds), digits=1)} | "
            f"{_pm(*mean_std(ends), digits=1)} |"
        )
    return lines


def _site_table(arms: dict[str, Arm], key: str = "site_pck") -> list[str]:
    """Each site's own PCK, scored like the mean PCK (tail mean per run, then mean ± std over
    seeds), with each run's worst site and its spread (best − worst site); nothing for runs
    without per-site evaluations. `site_pck_local_bn`: FedBN's sites with their own BatchNorm."""
    per_arm: dict[str, dict[str, list[float]]] = {}
    worst: dict[str, list[float]] = {}
    spread: dict[str, list[float]] = {}
    for label, arm in arms.items():
        values: dict[str, list[float]] = {}
        for run in arm.complete_runs:
            picked = [r[key] for r in tail_rows(run.rows, run.total_rounds) if r.get(key)]
            run_sites = []
            for site in sorted({k for p in picked for k in p}):
                scores = [p[site] for p in picked if p.get(site) is not None]
                if scores:
                    values.setdefault(site, []).append(float(np.mean(scores)))
                    run_sites.append(float(np.mean(scores)))
            if run_sites:
                worst.setdefault(label, []).append(min(run_sites))
                spread.setdefault(label, []).append(max(run_sites) - min(run_sites))
        per_arm[label] = values
    sites = sorted({k for v in per_arm.values() for k in v}, key=int)
    if not sites:
        return []
    title = (
        "## Per-site PCK (each site scores the global model on its own test records, the test "
        "split partitioned like the training data; the mean PCK above sums their counts)"
        if key == "site_pck"
        else "## Per-site PCK with each site's own BatchNorm (FedBN's deployed models)"
    )
    shown = sites if len(sites) <= 12 else []  # a wide federation: worst and spread only
    lines = [
        "",
        title,
        "",
        "| method | " + " | ".join([*(f"site {k}" for k in shown), "worst site", "spread"]) + " |",
        "|---" * (len(shown) + 3) + "|",
    ]
    for label, values in per_arm.items():
        if values:
            cells = [_pm(*mean_std(values.get(k, []))) for k in shown]
            cells += [_pm(*mean_std(worst.get(label, []))), _pm(*mean_std(spread.get(label, [])))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _aggregation_table(arms: dict[str, Arm]) -> list[str]:
    """What the server did, averaged over all rounds and seeds: the share of conflicting update
    pairs, the sum of the coefficients on the raw updates (1 for a weighted mean; FedGH's
    projections add to it), the length of the server's step (after any server optimiser) and
    each client's mean weight."""
    rows = []
    for label, arm in arms.items():
        conflict, coef_sum, steps, server_step, weights = [], [], [], [], {}
        for r in (r for run in arm.complete_runs for r in run.rows):
            if r.get("server_step_norm") is not None:
                server_step.append(r["server_step_norm"])
            if r.get("conflict_share") is not None:
                conflict.append(r["conflict_share"])
            if r.get("coefficients"):
                coef_sum.append(sum(r["coefficients"]))
            step = step_ratio(r)
            if step is not None:
                steps.append(step)
            for client, w in zip(r.get("aggregated") or [], r.get("weights") or []):  # noqa: B905
                weights.setdefault(client, []).append(w)
        if conflict or coef_sum or weights:
            cells = [
                f"{np.mean(conflict):.3f}" if conflict else "–",
                f"{np.mean(coef_sum):.3f}" if coef_sum else "–",
                f"{np.mean(steps):.3f}" if steps else "–",
                f"{np.mean(server_step):.3f}" if server_step else "–",
                ", ".join(f"{k}: {np.mean(weights[k]):.3f}" for k in sorted(weights)[:16]),
            ]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "## Aggregation (mean over all rounds and seeds)",
        "",
        "Conflict share: client-update pairs with negative cosine. Σ coefficients: the sum of "
        "the weights on the raw updates (1 for a weighted mean; projections add to it, so a "
        "larger sum is a longer step). Weights: each client's mean aggregation weight "
        "(ψ_k for FedAW and FedGH, n_k/n for FedAvg). Step ratio: ‖Σ c_k Δ_k‖ / ‖Σ ψ_k Δ_k‖, "
        "the length of the harmonised step over the unprojected one of the same round (from "
        "the logged cosines and norms). Step controls: the baseline at this arm's step is "
        "`fed.server_lr` = the step ratio; this arm at the baseline's step is "
        "`fed.gh_rescale=true`. A difference is read as direction only where both are run. "
        "Server step: ‖θ_{t+1} − θ_t‖, the global model's move in a round after any server "
        "optimiser (Adam and Yogi divide by a running √v, so there the step ratio does not "
        "set it); – where the runs do not log it (a plain server step, outside secure "
        "aggregation).",
        "",
        "| method | conflict share | Σ coefficients | step ratio | server step "
        "| mean weight by client |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _flat_settings(config: dict) -> dict[str, object]:
    out = {}
    for section, values in config.items():
        if isinstance(values, dict) and section != "runtime":
            out.update({f"{section}.{k}": repr(v) for k, v in values.items()})
    return out


def method_family(config: dict) -> str:
    """The method a tuning grid point belongs to: fed.method, with its server optimiser."""
    fed = config.get("fed", {})
    method = str(fed.get("method"))
    opt = fed.get("server_opt", "sgd")
    if opt != "sgd" and method not in ("fedadam", "fedyogi", "fedadagrad"):
        method += f"+{opt}"
    elif fed.get("server_momentum", 0.0) > 0 and method != "fedavgm":
        method += "+momentum"
    return method


def _tuning_table(arms: dict[str, Arm], summary: dict) -> list[str]:
    """For runs scored on a validation split: each method's grid (the settings its arms differ
    in), the runs per grid point, the validation score and the chosen point (the highest mean).
    """
    runs = [r for a in arms.values() for r in a.complete_runs]
    if not runs or not all(r.config.get("data", {}).get("val_fraction") for r in runs):
        return []
    families: dict[str, list[Arm]] = {}
    for arm in arms.values():
        if arm.complete_runs:
            families.setdefault(method_family(arm.complete_runs[0].config), []).append(arm)
    lines = [
        "",
        "## Tuning on the validation split (each method's grid; chosen: the highest mean)",
        "",
        "| method | arm | settings | runs | validation PCK | chosen |",
        "|---|---|---|---|---|---|",
    ]
    summary["tuning"] = {}
    for family, members in families.items():
        settings = [_flat_settings(a.complete_runs[0].config) for a in members]
        varying = sorted(k for k in set().union(*settings) if len({s.get(k) for s in settings}) > 1)
        varying = [k for k in varying if k not in ("name", "fed.method")]
        means = {a.label: mean_std(list(a.scores().values()))[0] for a in members}
        chosen = max(means, key=lambda k: -math.inf if math.isnan(means[k]) else means[k])
        for arm, s in zip(members, settings, strict=True):
            scores = list(arm.scores().values())
            grid = ", ".join(f"{k}={s.get(k, '–')}" for k in varying) or "defaults"
            mark = "yes" if arm.label == chosen else ""
            lines.append(
                f"| {family} | {arm.label} | {grid} | {len(scores)} | "
                f"{_pm(*mean_std(scores))} | {mark} |"
            )
        summary["tuning"][family] = {"chosen": chosen, "grid": list(means), "means": means}
    return lines


def step_ratio(row: dict) -> float | None:
    """‖Σ_k c_k Δ_k‖ / ‖Σ_k ψ_k Δ_k‖ for one FedGH round, from its metrics.jsonl record: the
    Gram matrix is G_ij = cos_ij ‖Δ_i‖ ‖Δ_j‖, the coefficients c and the weights ψ are logged.
    None where the record lacks them (other strategies, per-layer harmonisation)."""
    coef, psi = row.get("coefficients"), row.get("weights")
    cos, norms = row.get("cosine"), row.get("update_norms")
    if not (coef and psi and cos and norms) or not len(coef) == len(psi) == len(norms):
        return None
    n = np.asarray(norms, dtype=np.float64)
    gram = np.asarray(cos, dtype=np.float64) * np.outer(n, n)
    c, w = np.asarray(coef, dtype=np.float64), np.asarray(psi, dtype=np.float64)
    base = float(w @ gram @ w)
    return math.sqrt(max(float(c @ gram @ c), 0.0) / base) if base > 0 else None


HOW_TO_READ = (
    "How to read it: a method's score is one number per seed, and the tables give their mean ± "
    "std over the seeds. Only the paired differences rank methods: a difference whose 95 % "
    "interval includes zero means these seeds cannot tell the two apart, however far apart the "
    "means look; the figures also move from one machine (CPU model) to another, so compare "
    "runs made on the same one. The curves show how each method got there: the thick line is "
    "the mean over seeds, the band ± one std across seeds, and the grey span the rounds that "
    "are scored."
)
HEATMAP_ACCURACY = (
    "Heatmap accuracy is SimpleBaseline's training-time `accuracy`: the share of labelled joints "
    "whose predicted heatmap peaks within 5 % of the heatmap side of the target heatmap's peak "
    "(distance / (side / 10) < 0.5), on the test crops; unlike PCK it is measured on the "
    "heatmap grid and normalised by the crop, not by the body."
)
# the range a curve's value can take: a band of mean ± std is clipped to it
_BOUNDS = {
    "pck_mean": (0.0, 100.0),
    "heatmap_acc": (0.0, 100.0),
    "conflict_share": (0.0, 1.0),
    "train_loss": (0.0, None),
}
# arms are told apart by line style and marker too, not by colour alone: two arms with nearly
# the same curve (FedAW and FedGH's conflict share) would otherwise hide one under the other
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")

# ----------------------------------------------------------------------------------- figures
_CURVES = (
    ("pck_vs_round", "pck_mean", "PCK (%)", "PCK of the global model"),
    ("heatmap_acc_vs_round", "heatmap_acc", "heatmap accuracy (%)", "heatmap accuracy"),
    (
        "conflict_share_vs_round",
        "conflict_share",
        "share of conflicting update pairs",
        "share of client-update pairs with negative cosine",
    ),
    ("train_loss_vs_round", "train_loss", "training loss", "clients' mean training loss"),
)


def _figures(
    arms: dict[str, Arm], out_dir: Path, prefix: str, window: tuple[int, int]
) -> list[str]:
    lines = [
        "",
        "## Curves (mean over seeds, band: ± one std across seeds; thin: single seeds)",
        "",
        f"The grey span marks the scored rounds ({window[0]}–{window[1]}).",
        "",
    ]
    missing = []
    for name, key, ylabel, what in _CURVES:
        file = f"{prefix}{name}.png"
        if _band_plot(arms, key, ylabel, out_dir / file, window):
            lines += [f"{what}:", "", f"![{what}]({file})", ""]
            if key == "heatmap_acc":
                lines += [HEATMAP_ACCURACY, ""]
        else:
            missing.append(what)
    if missing:
        lines.append("Not recorded in these runs' metrics.jsonl: " + ", ".join(missing) + ".")
    return lines


def _pyplot():
    # imported when a figure is drawn: a second of start-up every report-less command would pay
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_conflicts(
    arms: dict[str, Arm], out_dir: Path, prefix: str, draw: bool = True
) -> list[str]:
    """Where in the model the clients disagree (runs with fed.gh_layer_stats): the conflict
    share by block (a tensor name's first part: conv1, layer1, ..., final_layer) averaged over
    rounds and seeds, and a tensors x rounds picture of the first such arm."""
    stats = {}
    for label, arm in arms.items():
        # {tensor: {round: [share per seed]}}
        table: dict[str, dict[int, list[float]]] = {}
        for run in arm.complete_runs:
            for row in run.rows:
                for name, entry in (row.get("layer_conflict") or {}).items():
                    table.setdefault(name, {}).setdefault(row["round"], []).append(
                        entry["conflict_share"]
                    )
        if table:
            stats[label] = (table, len(arm.complete_runs))
    if not stats:
        return []
    blocks = list(dict.fromkeys(name.split(".")[0] for t, _ in stats.values() for name in t))
    lines = [
        "",
        "## Where the updates conflict (fed.gh_layer_stats)",
        "",
        "Share of client pairs whose updates of a block's tensors have a negative cosine, "
        "averaged over the block's tensors, all rounds and seeds; the whole-model share "
        "(`conflict_share`) is in the curves above.",
        "",
        "| method | seeds | " + " | ".join(blocks) + " |",
        "|---" * (len(blocks) + 2) + "|",
    ]
    for label, (table, seeds) in stats.items():
        cells = []
        for block in blocks:
            values = [
                v
                for name, by_round in table.items()
                if name.split(".")[0] == block
                for shares in by_round.values()
                for v in shares
            ]
            cells.append(f"{np.mean(values):.2f}" if values else "–")
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    if not draw:
        return lines
    label, (table, seeds) = next(iter(stats.items()))
    names = list(table)
    rounds = sorted({r for by_round in table.values() for r in by_round})
    grid = np.array(
        [[np.mean(table[n][r]) if r in table[n] else np.nan for r in rounds] for n in names]
    )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.11 * len(names) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=4)
    ax.set_xticks(range(0, len(rounds), max(1, len(rounds) // 10)))
    ax.set_xticklabels([rounds[i] for i in range(0, len(rounds), max(1, len(rounds) // 10))])
    ax.set_xlabel("round")
    plural = "s" if seeds != 1 else ""
    ax.set_title(
        f"{label}: share of conflicting pairs per tensor ({seeds} seed{plural})", fontsize=9
    )
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    file = f"{prefix}layer_conflict.png"
    fig.savefig(out_dir / file, dpi=130)
    plt.close(fig)
    return lines + ["", f"![conflicting pairs per tensor and round]({file})", ""]


def _band_plot(
    arms: dict[str, Arm],
    key: str,
    ylabel: str,
    path: Path,
    window: tuple[int, int] | None = None,
) -> bool:
    """Draw one curve figure to `path`; False (and no file) when no run recorded `key`."""
    plt = _pyplot()
    fig = band_figure(arms, key, ylabel, window)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def band_figure(arms: dict[str, Arm], key: str, ylabel: str, window: tuple[int, int] | None = None):
    """The matplotlib figure of `key` against the round: per arm the single seeds (thin), the
    mean (thick, its own line style and marker) and a ± one std band clipped to the value's
    range; the scored window as a grey span. None when no run recorded `key`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drew = False
    low, high = _BOUNDS.get(key, (None, None))
    for i, (label, arm) in enumerate(arms.items()):
        curves = {}
        for run in arm.complete_runs:
            pts = {r["round"]: r[key] for r in run.rows if r.get(key) is not None}
            if pts:
                curves[run.seed] = pts
        if not curves:
            continue
        drew = True
        color = f"C{i % 10}"
        rounds = sorted(set.intersection(*(set(c) for c in curves.values())))
        for c in curves.values():
            xs = sorted(c)
            ax.plot(xs, [c[x] for x in xs], color=color, alpha=0.15, linewidth=0.7)
        if rounds:
            values = np.array([[c[x] for x in rounds] for c in curves.values()], dtype=float)
            mean = values.mean(0)
            seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
            ax.plot(
                rounds,
                mean,
                color=color,
                linewidth=2,
                linestyle=_STYLES[i % len(_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)],
                markersize=4,
                markevery=max(1, len(rounds) // 8),
                label=f"{label} ({seeds})",
            )
            if len(curves) > 1:
                std = values.std(0, ddof=1)
                # a share cannot leave [0, 1] (nor PCK [0, 100]): neither may its band
                lo = mean - std if low is None else np.maximum(mean - std, low)
                hi = mean + std if high is None else np.minimum(mean + std, high)
                ax.fill_between(rounds, lo, hi, color=color, alpha=0.2)
    if not drew:
        plt.close(fig)
        return None
    if window is not None and window[1] > 0:
        ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="0.5", alpha=0.15, label="scored rounds")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
