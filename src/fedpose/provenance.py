"""What a run's numbers depend on besides its config: code version, thread count, Gram path.

Aggregation results are bit-reproducible only for the same code, CPU family and thread count, so
every run directory records them beside the resolved config (`config.json`, key "runtime").
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout holding `path` (default: this package), '+dirty' if modified."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def gram_path() -> str:
    """Which code computes large Gram matrices in this process (the code's own report)."""
    try:
        from fedpose.fl.gram_native import native_gram_kernel
    except ImportError:
        return "torch"
    return "native" if native_gram_kernel() is not None else "torch"


def runtime_info() -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "gram_path": gram_path(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "commit": git_commit(),
    }
