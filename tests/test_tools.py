"""The tooling behind `fedpose bench` and `fedpose flower-config`: each benchmark runs as a
command, prints its figures, and fails with one `error:` line."""

from __future__ import annotations

import json
import tomllib

import pytest

from fedpose.cli import main
from fedpose.config import load_config
from fedpose.engine.flower_messages import REPLY_TIMEOUT_S, settings_from_run_config


@pytest.mark.slow  # starts fresh interpreters
@pytest.mark.usefixtures("one_thread")
def test_bench_aggregate_smoke(capsys):
    assert main(["bench", "aggregate", "--clients", "3", "--params", "2000", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "fedgh (gram)" in out and "fedgh-direct" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("fedgh/fedavg: ") and float(last.split(": ")[1]) > 0


def test_bench_aggregate_too_big_is_one_error_line(capsys):
    # 10^13 float32 parameters per client cannot fit in any machine's memory
    assert main(["bench", "aggregate", "--clients", "4", "--params", str(10**13)]) == 2
    captured = capsys.readouterr()
    lines = [x for x in (captured.out + captured.err).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--params" in lines[0]


def test_flower_config_prints_a_run_config_carrying_the_config(tmp_path, capsys):
    cfg_file = tmp_path / "exp.toml"
    cfg_file.write_text('[fed]\nmethod = "feddyn"\nrounds = 4\n')
    assert main(["flower-config", str(cfg_file), "-c", "fed.dyn_alpha=0.25"]) == 0
    run_config = tomllib.loads(capsys.readouterr().out)
    assert run_config["reply-timeout"] == REPLY_TIMEOUT_S
    settings = settings_from_run_config(run_config)
    expected = load_config(cfg_file, ["fed.dyn_alpha=0.25"])
    assert settings.config.to_dict() == expected.to_dict()
    assert json.loads(run_config["fedpose-config"])["fed"]["dyn_alpha"] == 0.25


@pytest.mark.slow
def test_bench_flower_smoke(tmp_path, capsys):
    """SLOW (about a minute): `fedpose bench flower` on real Flower processes, FedProx, so the
    client rule and its coefficient travel in the Flower messages; both engines must agree."""
    out = tmp_path / "flower.md"
    assert (
        main(
            [
                "bench",
                "flower",
                "--supernodes",
                "2",
                "--rounds",
                "1",
                "-c",
                f"out_dir={tmp_path / 'runs'}",
                "-c",
                f"data.root={tmp_path / 'synth'}",
                "-c",
                "fed.method=fedprox",
                "-c",
                "fed.prox_mu=0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("flower/in-process run time: ") and float(last.split(": ")[1]) > 0
    report = out.read_text()
    assert "fedpose bench flower" in report
    assert "Largest absolute weight difference between the two final models: 0." in report
