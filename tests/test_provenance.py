"""Every run directory records what its numbers depend on besides the config."""

from __future__ import annotations

import json

import torch

from fedpose.config import load_config
from fedpose.engine.runner import prepare_run_dir


def test_config_json_records_threads_and_gram_path(tmp_path):
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            cfg = load_config(None, [f"out_dir={tmp_path}", f"name=run{n}"])
            runtime = json.loads((prepare_run_dir(cfg, resume=False) / "config.json").read_text())[
                "runtime"
            ]
            assert runtime["torch_threads"] == n
            assert runtime["gram_path"] == "fixed-point int64"
            assert runtime["torch"] == torch.__version__
    finally:
        torch.set_num_threads(threads)
