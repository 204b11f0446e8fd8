"""Flower's Simulation Engine (Ray) runs fedpose's ServerApp and ClientApp on virtual
SuperNodes: the result equals the in-process engine's."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from test_flower import _running_with_home, comparable_rows

from fedpose.engine.runner import run_federation
from fedpose.tools.flower_demo import demo_config, renamed
from fedpose.tools.flower_sim import run_flower_simulation


@pytest.mark.slow
def test_eight_virtual_supernodes_match_the_in_process_engine(tmp_path):
    """SLOW (about 1-2 min on 2 cores): a simulation SuperLink, 8 virtual SuperNodes, 2 rounds
    of FedGH; final weights and metrics equal the in-process engine's bit for bit."""
    pytest.importorskip("ray")
    cfg = demo_config(
        None,
        supernodes=8,
        rounds=2,
        overrides=[f"out_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'synth-arm'}"],
    )
    work = tmp_path / "flower"
    try:
        result = run_flower_simulation(
            renamed(cfg, "sim"), 8, Console(width=100), work, timeout=600
        )
    finally:
        assert _running_with_home(work / "flwr-home") == [], "Flower processes left running"
    assert result.flower.status["status"] == "finished:completed"
    assert result.peak_rss_bytes > 0

    local = run_federation(renamed(cfg, "local"))
    for name, t in local.weights.items():
        assert torch.equal(result.flower.weights[name], t), name
    rows = {engine: comparable_rows(tmp_path / "runs" / engine) for engine in ("sim", "local")}
    assert [r["aggregated"] for r in rows["sim"]] == [list(range(8))] * 2
    assert rows["sim"] == rows["local"]
