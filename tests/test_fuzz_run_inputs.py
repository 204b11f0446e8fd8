"""The inputs of runs and reports, malformed: deeply nested TOML, metrics.jsonl rows of every
wrong shape (in `report` and `compare --resume`), run config.json files, contradictory
overrides, benchmark sizes. Each ends in one `error:` line naming the file (and the line and
key), exit 2; resuming across modes and after a kill between a row and its checkpoint works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedtiny import tiny_cli_args

from fedpose.cli import main
from fedpose.config import Config

DEEP = "[" * 100_000 + "]" * 100_000


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "Traceback" not in captured.err
    return err[0]


@pytest.mark.parametrize(
    "text",
    [
        "[fed]\nrounds = " + DEEP,
        "[fed]\nrounds = " + "{a = " * 100_000 + "1" + "}" * 100_000,
        "a" + ".a" * 100_000 + " = 1",
        "[" + "a." * 100_000 + "a]\nx = 1",
    ],
    ids=["arrays", "inline-tables", "dotted-key", "dotted-table"],
)
def test_deeply_nested_toml_is_one_error_line(tmp_path, capsys, text):
    config = tmp_path / "deep.toml"
    config.write_text(text)
    assert main(["run", str(config)]) == 2
    assert str(config) in _one_error_line(capsys)


@pytest.mark.parametrize(
    "overrides",
    [
        ["fed.rounds=1", "fed.rounds.x=3"],
        ["fed.rounds.x=3", "fed.rounds=1"],
        ["fed=3"],
        ["fed.rounds.x.y=3"],
    ],
)
def test_contradictory_overrides_are_one_error_line(capsys, overrides):
    argv = ["train", "configs/demo.toml"]
    for item in overrides:
        argv += ["-c", item]
    assert main(argv) == 2
    assert "fed" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [["--clients", "0"], ["--clients", "1"], ["--clients", "-3"], ["--params", "0"]],
)
def test_bench_aggregate_sizes_below_its_minimum_are_one_error_line(capsys, argv):
    assert main(["bench", "aggregate", "--params", "100", "--repeats", "1", *argv]) == 2
    assert argv[0] in _one_error_line(capsys)


# ----------------------------------------------------------------------------- metrics rows
BAD_ROWS = [
    [],
    "text",
    42,
    None,
    {},
    {"round": "1"},
    {"round": -1},
    {"round": True},
    {"round": 1.5},
    {"round": None},
    {"round": 1, "pck_mean": "high"},
    {"round": 1, "pck_per_joint": [1, 2]},
    {"round": 1, "pck_per_joint": {"shoulder": "x"}},
    {"round": 1, "aggregated": "0,1"},
    {"round": 1, "layer_conflict": {"conv1.weight": 3}},
    {"round": 1, "sim_time": {}},
    {"round": 1, "site_pck": 5},
    {"round": 1, "weights": [None]},
]


def _run_dir(folder: Path, bad_row: object, rounds: int = 3) -> Path:
    """A run folder whose metrics.jsonl holds `bad_row` between two sound rows."""
    folder.mkdir(parents=True)
    cfg = Config()
    cfg.fed.rounds = rounds
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    good = {"round": 1, "pck_mean": 50.0, "pck_per_joint": {"shoulder": 50.0}, "sim_time": 1.0}
    lines = [json.dumps(good), json.dumps(bad_row), json.dumps({**good, "round": 2})]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("bad_row", BAD_ROWS, ids=[json.dumps(r)[:30] for r in BAD_ROWS])
def test_a_malformed_metrics_row_in_report_is_one_error_line(tmp_path, capsys, bad_row):
    run_dir = _run_dir(tmp_path / "cmp" / "fedavg-s0", bad_row)
    assert main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "r.md")]) == 2
    line = _one_error_line(capsys)
    assert str(run_dir / "metrics.jsonl") in line and "[line 2]" in line
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("bad_row", BAD_ROWS[::3], ids=[json.dumps(r)[:30] for r in BAD_ROWS[::3]])
def test_a_malformed_metrics_row_in_compare_resume_is_one_error_line(
    tmp_path, synth_dir, capsys, bad_row
):
    runs = tmp_path / "runs"
    run_dir = _run_dir(runs / "cmp" / "fedavg-s0", bad_row)
    args = tiny_cli_args(runs, synth_dir)
    argv = ["compare", "configs/demo.toml", *args, "--name", "cmp", "--methods", "fedavg"]
    assert main([*argv, "--resume"]) == 2
    line = _one_error_line(capsys)
    assert str(run_dir / "metrics.jsonl") in line and "[line 2]" in line


@pytest.mark.parametrize(
    "config",
    [DEEP, "[1, 2]", '{"data": 5}', '{"fed": {"rounds": "3"}}', '{"seed": "x"}', '{"train": []}'],
)
def test_a_malformed_config_json_in_report_is_one_error_line(tmp_path, capsys, config):
    run_dir = _run_dir(tmp_path / "cmp" / "fedavg-s0", {"round": 3})
    (run_dir / "config.json").write_text(config)
    assert main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "r.md")]) == 2
    assert str(run_dir / "config.json") in _one_error_line(capsys)


# ----------------------------------------------------------------------------- resuming
@pytest.mark.slow  # four runs across modes: make test-slow
def test_resume_force_across_modes_continues(tmp_path, synth_dir, capsys):
    first, then = "sync", "async"  # the way that crashed (async -> sync drops work in flight)
    args = ["configs/demo.toml", *tiny_cli_args(tmp_path / "runs", synth_dir)]
    assert main(["run", *args, "-c", f"fed.mode={first}"]) == 0
    capsys.readouterr()
    again = ["run", *args, "-c", f"fed.mode={then}", "-c", "fed.rounds=2", "--resume"]
    assert main(again) == 2  # another config: refused unless forced
    assert "written by another run" in _one_error_line(capsys)
    assert main([*again, "--force"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["mode"] == then
    assert (tmp_path / "runs" / "t" / "model.safetensors").exists()


def test_train_resume_after_a_kill_between_row_and_checkpoint_keeps_one_row_per_epoch(
    tmp_path, synth_dir
):
    args = ["configs/demo.toml", *tiny_cli_args(tmp_path / "runs", synth_dir, "train.epochs=2")]
    assert main(["train", *args]) == 0
    run_dir = tmp_path / "runs" / "t"
    # as if killed after epoch 2's row was written, before its checkpoint replaced epoch 1's
    (run_dir / "checkpoints" / "last.safetensors").unlink()
    assert main(["train", *args, "--resume"]) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert [r["epoch"] for r in rows] == [1, 2]
