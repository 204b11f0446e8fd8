"""`fedpose watch RUN_DIR`: redraw a run's curves while it goes on.

Reads metrics.jsonl (a last line still being written is left out, see metrics.log) every few
seconds and redraws one PNG in the run folder; stops when the run has its last round (the
config's fed.rounds), or after a time limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from fedpose.files import write_atomically
from fedpose.metrics.log import METRICS_FILE, read_metrics

WATCH_FILE = "watch.png"
# curves drawn, when the run has them: (record field, axis label)
CURVES = (
    ("train_loss", "training loss"),
    ("pck_mean", "PCK (mean over joints)"),
    ("central_pck_mean", "central PCK"),
)


class WatchError(ValueError):
    pass


def planned_rounds(run_dir: Path) -> int:
    """The run's fed.rounds, from its config.json."""
    path = run_dir / "config.json"
    try:
        return int(json.loads(path.read_text())["fed"]["rounds"])
    except FileNotFoundError:
        raise WatchError(f"{path}: no config.json: not a run folder") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise WatchError(f"{path}: no fed.rounds ({type(e).__name__}: {e})") from None


def draw_curves(rows: list[dict], rounds: int, path: Path, title: str) -> None:
    """One panel per curve the records hold, x = round (up to the planned rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in CURVES if any(r.get(k) is not None for r in rows)]
    panels = present or [("train_loss", "training loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        ax.set_xlim(0, max(rounds, 1))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    done = rows[-1]["round"] if rows else 0
    fig.suptitle(f"{title}: round {done}/{rounds}")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def watch(
    run_dir: str | Path,
    every: float = 10.0,
    timeout: float = 24 * 3600.0,
    say: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Redraw run_dir/watch.png whenever metrics.jsonl changes, every `every` seconds, until
    the run has its last round (True) or it has waited `timeout` seconds (False)."""
    run_dir = Path(run_dir)
    rounds = planned_rounds(run_dir)
    out = run_dir / WATCH_FILE
    every = max(every, 0.1)
    waited = 0.0
    seen = None
    while True:
        metrics = run_dir / METRICS_FILE
        stamp = (metrics.stat().st_size, metrics.stat().st_mtime_ns) if metrics.exists() else None
        if stamp != seen or not out.exists():
            seen = stamp
            rows = read_metrics(run_dir)
            draw_curves(rows, rounds, out, run_dir.name)
            last = rows[-1] if rows else {}
            text = f"round {last.get('round', 0)}/{rounds}"
            for key, _ in CURVES:
                if last.get(key) is not None:
                    text += f", {key} {last[key]:.4g}"
            say(f"{text}  ({out})")
            if rows and rows[-1]["round"] >= rounds:
                return True
        if waited + every > timeout:
            return False
        sleep(every)
        waited += every
