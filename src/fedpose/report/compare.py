"""Comparison report over finished runs: per-joint PCK tables (mean ± std over seeds), curves of
PCK against rounds and simulated time, conflict share, and time to a target PCK."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedpose.metrics.log import read_metrics


def final_eval(rows: list[dict]) -> dict | None:
    evaluated = [r for r in rows if r.get("pck_mean") is not None]
    return evaluated[-1] if evaluated else None


def time_to_target(rows: list[dict], target: float) -> tuple[float | None, int | None]:
    """Simulated seconds and rounds until the global model first reaches `target` PCK."""
    for r in rows:
        if r.get("pck_mean") is not None and r["pck_mean"] >= target:
            return r.get("sim_time"), r["round"]
    return None, None


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def build_report(runs: dict[str, list[Path]], out_dir: Path, title: str,
                 target_pck: float = 0.0) -> Path:
    """runs: label (method) -> run directories (one per seed). Writes report.md and PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {label: [read_metrics(d) for d in dirs] for label, dirs in runs.items()}
    joints: list[str] = []
    for rows_list in metrics.values():
        for rows in rows_list:
            last = final_eval(rows)
            if last:
                joints = list(last["pck_per_joint"])
                break
        if joints:
            break

    lines = [f"# {title}", "", "Final global model on the test split; mean ± std over seeds "
             f"({', '.join(str(len(v)) for v in runs.values())} runs per method).", ""]
    lines.append("| method | " + " | ".join(joints) + " | mean PCK | rounds |")
    lines.append("|---" * (len(joints) + 3) + "|")
    summary = {}
    for label, rows_list in metrics.items():
        finals = [final_eval(rows) for rows in rows_list]
        finals = [f for f in finals if f]
        per_joint = [_fmt([f["pck_per_joint"].get(j) for f in finals]) for j in joints]
        means = [f["pck_mean"] for f in finals]
        rounds = max((rows[-1]["round"] for rows in rows_list if rows), default=0)
        summary[label] = {"mean": float(np.mean(means)) if means else None,
                          "std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0}
        lines.append(f"| {label} | " + " | ".join(per_joint) + f" | {_fmt(means)} | {rounds} |")

    if target_pck > 0:
        lines += ["", f"Time to reach PCK ≥ {target_pck:g} % (simulated seconds; rounds):", "",
                  "| method | simulated time | rounds | final PCK | final simulated time |",
                  "|---|---|---|---|---|"]
        for label, rows_list in metrics.items():
            times, rnds, finals, ends = [], [], [], []
            for rows in rows_list:
                t, r = time_to_target(rows, target_pck)
                times.append(t)
                rnds.append(r)
                f = final_eval(rows)
                finals.append(f["pck_mean"] if f else None)
                ends.append(rows[-1].get("sim_time") if rows else None)
            reached = sum(t is not None for t in times)
            lines.append(f"| {label} | {_fmt(times)} ({reached}/{len(times)} reached) | "
                         f"{_fmt(rnds)} | {_fmt(finals)} | {_fmt(ends)} |")

    lines += site_table(metrics)
    plots = {
        "pck_vs_round.png": ("round", "pck_mean", "PCK (%)"),
        "pck_vs_time.png": ("sim_time", "pck_mean", "PCK (%)"),
        "conflict_share.png": ("round", "conflict_share", "share of conflicting update pairs"),
        "train_loss.png": ("round", "train_loss", "training loss"),
    }
    for name, (xkey, ykey, ylabel) in plots.items():
        if _plot(metrics, xkey, ykey, ylabel, out_dir / name):
            lines += ["", f"![{ykey} vs {xkey}]({name})"]
    lines.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return report


def _plot(metrics: dict, xkey: str, ykey: str, ylabel: str, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drew = False
    for i, (label, rows_list) in enumerate(metrics.items()):
        color = f"C{i % 10}"
        curves = []
        for rows in rows_list:
            pts = [(r[xkey], r[ykey]) for r in rows
                   if r.get(ykey) is not None and r.get(xkey) is not None]
            if pts:
                curves.append(np.array(pts, dtype=float))
        if not curves:
            continue
        drew = True
        # a mean curve only where the seeds share their x values (rounds, not simulated time)
        same_x = len({c[:, 0].tobytes() for c in curves}) == 1
        for j, c in enumerate(curves):
            faint = len(curves) > 1 and same_x
            ax.plot(c[:, 0], c[:, 1], color=color, alpha=0.35 if faint else 1.0,
                    label=label if j == 0 and not faint else None)
        if len(curves) > 1 and same_x:
            mean = np.mean([c[:, 1] for c in curves], axis=0)
            ax.plot(curves[0][:, 0], mean, color=color, linewidth=2, label=f"{label} (mean)")
    if not drew:
        plt.close(fig)
        return False
    ax.set_xlabel({"round": "round", "sim_time": "simulated time (s)"}.get(xkey, xkey))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def site_table(metrics: dict[str, list[list[dict]]]) -> list[str]:
    """Markdown lines: each site's own PCK of the final model, for runs evaluated federated
    (every site scoring its own test records); none for centrally evaluated runs."""
    finals = {label: [f for f in (final_eval(rows) for rows in rows_list)
                      if f and f.get("site_pck")]
              for label, rows_list in metrics.items()}
    sites = sorted({k for fs in finals.values() for f in fs for k in f["site_pck"]}, key=int)
    if not sites:
        return []
    lines = ["", "Per-site PCK of the final model (federated evaluation: each site scores its own "
             "test records; the mean PCK above sums their counts):", "",
             "| method | " + " | ".join(f"site {k}" for k in sites) + " |",
             "|---" * (len(sites) + 1) + "|"]
    for label, fs in finals.items():
        if fs:
            cells = [_fmt([f["site_pck"][k] for f in fs if f["site_pck"].get(k) is not None])
                     for k in sites]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines
