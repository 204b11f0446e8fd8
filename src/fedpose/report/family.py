"""A family of primary comparisons across comparison reports, corrected with Holm's step-down
procedure (S. Holm, A simple sequentially rejective multiple test procedure, Scand. J.
Statistics 6, 1979).

The family is the set of comparisons read together, typically one per setting: in each report's
`summary.json`, one arm against one baseline, paired by seed. Each gets the paired t-test
p-value and Holm's adjusted p-value over the whole family; it is resolved only when the adjusted
p-value is below the family-wise α. Its Bonferroni interval (confidence 1 − α/m for m
comparisons) is given alongside: it excludes zero only for a comparison that Holm resolves too.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedpose.bounded import loads_json, read_json
from fedpose.report.stats import holm, paired_difference, paired_p_value
from fedpose.run_dir import check_output, read_regular, write_file

MADE_BY = "fedpose family"  # recorded in the JSON: the mark of an output this command may replace


class FamilyError(ValueError):
    """A summary that cannot be compared: unreadable, the wrong shape, an arm missing, too few
    paired seeds. The message names the file and the record."""


@dataclass(frozen=True)
class Member:
    """One comparison of the family: `arm` − `baseline` in the summary at `summary`."""

    name: str
    summary: Path
    arm: str
    baseline: str


@dataclass(frozen=True)
class Result(Member):
    """A comparison with its figures."""

    n: int  # paired seeds
    mean: float  # mean of arm − baseline over the seeds
    interval: tuple[float, float]  # 95 % paired t-interval
    bonferroni: tuple[float, float]  # the paired t-interval at confidence 1 − α/m
    p: float  # paired t-test, two-sided
    p_holm: float
    resolved: bool  # p_holm < α


def arm_scores(summary: object, path: Path, label: str) -> dict[int, float]:
    """{seed: score} of one arm of a parsed summary.json, or FamilyError naming the record."""
    arms = summary.get("arms") if isinstance(summary, dict) else None
    if not isinstance(arms, dict):
        raise FamilyError(f'{path}: not a comparison summary (no "arms" object)')
    if label not in arms:
        raise FamilyError(f"{path}: no arm {label!r} (arms: {', '.join(arms) or 'none'})")
    scores = arms[label].get("scores") if isinstance(arms[label], dict) else None
    if not isinstance(scores, dict):
        raise FamilyError(f'{path} [arms.{label}]: no "scores" object')
    out = {}
    for seed, score in scores.items():
        if not (seed.isascii() and seed.isdigit() and str(int(seed)) == seed and _is_number(score)):
            raise FamilyError(
                f"{path} [arms.{label}.scores.{seed}]: {score!r} is not a seed's score"
            )
        out[int(seed)] = float(score)
    return out


def _is_number(value: object) -> bool:
    """A JSON number (not true/false) that a float holds: not nan, ±inf or beyond 1.8e308."""
    return type(value) in (int, float) and abs(value) <= sys.float_info.max


def compare_family(members: list[Member], alpha: float = 0.05) -> list[Result]:
    """Every member's paired difference, p-value and Holm-adjusted p-value at family-wise α."""
    names = [m.name for m in members]
    if not members or len(set(names)) < len(names):
        raise FamilyError(f"comparison names must be given, each once: {', '.join(names)}")
    pairs = {}
    for m in members:
        summary = read_json(m.summary)
        a, b = arm_scores(summary, m.summary, m.arm), arm_scores(summary, m.summary, m.baseline)
        shared = sorted(set(a) & set(b))
        if len(shared) < 2:
            raise FamilyError(
                f"{m.summary} [arms.{m.arm}, arms.{m.baseline}]: {len(shared)} paired seed(s) "
                f"{shared}; a paired test needs at least 2"
            )
        pairs[m.name] = (a, b)
    with np.errstate(all="ignore"):  # an overflow is refused below, in one line, not warned
        p = {name: paired_p_value(a, b) for name, (a, b) in pairs.items()}
    for m in members:  # scores near ±1e308 overflow their difference; Holm cannot order a nan
        if not math.isfinite(p[m.name]):
            raise FamilyError(
                f"{m.summary} [arms.{m.arm}, arms.{m.baseline}]: the paired test is not finite "
                "(scores too large to subtract)"
            )
    adjusted = holm(p)
    results = []
    for m in members:
        a, b = pairs[m.name]
        diff, wide = paired_difference(a, b), paired_difference(a, b, 1 - alpha / len(members))
        results.append(
            Result(
                **vars(m),
                n=diff.n,
                mean=diff.mean,
                interval=(diff.low, diff.high),
                bonferroni=(wide.low, wide.high),
                p=p[m.name],
                p_holm=adjusted[m.name],
                resolved=adjusted[m.name] < alpha,
            )
        )
    return results


def render(
    results: list[Result],
    alpha: float,
    command: str = "",
    title: str = "A family of comparisons, Holm-corrected",
    notes: str = "",
) -> str:
    """The markdown table of the family, with how to read it; `notes` (markdown: what was run,
    the reading) follow the table."""
    m = len(results)
    level = f"{100 * (1 - alpha / m):.4g} %"
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Made by: `{command}`", ""]
    lines += [
        f"| comparison | arm − baseline | seeds | mean difference | 95 % interval "
        f"| Bonferroni {level} interval | p (paired t) | Holm p | resolved |",
        "|---" * 9 + "|",
    ]
    for r in results:
        resolved = "yes" if r.resolved else "no"
        lines.append(
            f"| {r.name} | {r.arm} − {r.baseline} | {r.n} | {r.mean:+.2f} "
            f"| {_interval(r.interval)} | {_interval(r.bonferroni)} "
            f"| {r.p:.3g} | {r.p_holm:.3g} | {resolved} |"
        )
    lines += [
        "",
        f"How to read it: a difference is resolved only if it survives Holm's correction over "
        f"the family's {m} comparison(s) (Holm p < α = {alpha:g}, family-wise); the Bonferroni "
        f"interval (confidence 1 − α/{m}) is given alongside and excludes zero only where Holm "
        "resolves. The p-values are two-sided paired t-tests over the seeds both arms have.",
        "",
        *(f"- {r.name}: `{r.summary}`" for r in results),
        "",
    ]
    if notes:
        lines += [notes.rstrip("\n"), ""]
    return "\n".join(lines)


def _interval(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:+.2f}, {bounds[1]:+.2f}]"


def write_family(
    results: list[Result],
    alpha: float,
    md_path: Path,
    command: str = "",
    force: bool = False,
    title: str = "A family of comparisons, Holm-corrected",
    notes: str = "",
) -> Path:
    """Write the table to `md_path` (a .md file) and the numbers to the .json beside it. Neither
    replaces a file this command did not make (its JSON records MADE_BY) unless `force`."""
    md_path = Path(md_path)
    if md_path.suffix != ".md":
        raise FamilyError(f"{md_path}: --out names a .md file (its .json is written beside it)")
    json_path = md_path.with_suffix(".json")
    for path in (md_path, json_path):
        check_output(path, "family", force)  # never inside a folder another command made
    existing = [p for p in (md_path, json_path) if p.exists() or p.is_symlink()]
    if existing and not force and not _ours(json_path):
        raise FamilyError(
            f"{existing[0]}: exists and was not written by `{MADE_BY}`: choose another path "
            f"(or --force to overwrite)"
        )
    record = {"made_by": MADE_BY, "command": command, "alpha": alpha, "correction": "Holm 1979"}
    record["comparisons"] = [{**asdict(r), "summary": str(r.summary)} for r in results]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_file(json_path, json.dumps(record, indent=2) + "\n")
    return write_file(md_path, render(results, alpha, command, title, notes))


def _ours(json_path: Path) -> bool:
    try:
        record = loads_json(read_regular(json_path), json_path)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("made_by") == MADE_BY
