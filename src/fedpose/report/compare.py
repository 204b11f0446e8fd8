"""The last evaluation of a run. The comparison report itself is report/experiment.py; the
metrics reader is metrics/log.py."""

from __future__ import annotations


def final_eval(rows: list[dict]) -> dict | None:
    evaluated = [r for r in rows if r.get("pck_mean") is not None]
    return evaluated[-1] if evaluated else None
