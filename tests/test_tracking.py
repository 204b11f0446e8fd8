"""Tracking: metrics.csv and TensorBoard event files written from the records metrics.jsonl gets,
and `fedpose watch` redrawing a run's curves."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from fedtiny import tiny_config

from fedpose.cli import main
from fedpose.engine.runner import run_federation
from fedpose.metrics.log import read_metrics
from fedpose.metrics.track import CSV_FILE, TENSORBOARD_DIR, Tracker, scalars
from fedpose.report.watch import WATCH_FILE, watch


def test_scalars_flatten_a_record():
    record = {
        "round": 3,
        "method": "fedgh",
        "selected": [0, 1, 2],
        "rejected": {"2": "nan"},
        "train_loss": 0.5,
        "conflict_share": None,
        "site_pck": {"0": 40.0, "1": None},
        "pck_per_joint": [10.0, float("nan"), 30.0],
        "weights": [0.25, 0.75],
        "sim_time": 12,
    }
    assert scalars(record) == {
        "selected_count": 3.0,
        "rejected_count": 1.0,
        "train_loss": 0.5,
        "site_pck/0": 40.0,
        "pck_per_joint/0": 10.0,
        "pck_per_joint/2": 30.0,
        "weights/0": 0.25,
        "weights/1": 0.75,
        "sim_time": 12.0,
    }


def test_a_two_round_run_writes_the_logged_scalars(tmp_path, synth_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "fed.num_clients=2",
        "fed.local_steps=1",
        "track=['tensorboard', 'csv']",
    )
    run_federation(cfg)
    rows = read_metrics(cfg.run_dir)
    assert [r["round"] for r in rows] == [1, 2]

    events = EventAccumulator(str(cfg.run_dir / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {tag for r in rows for tag in scalars(r)}
    assert {"train_loss", "pck_mean", "pck_per_joint/wrist", "aggregated_count"} <= tags
    assert tags == expected
    for tag in ("train_loss", "pck_mean", "wall_seconds"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        # float32 in the event file
        assert logged == [(r["round"], pytest.approx(r[tag], rel=1e-6)) for r in rows], tag

    with open(cfg.run_dir / CSV_FILE) as f:
        table = list(csv.DictReader(f))
    assert [int(row["round"]) for row in table] == [1, 2]
    for row, record in zip(table, rows, strict=True):
        values = scalars(record)
        assert set(values) <= set(row)
        for key, value in values.items():
            assert float(row[key]) == value, key  # the CSV keeps every digit


def test_a_fresh_start_replaces_old_tracking_files_and_a_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = Tracker(run_dir, ["csv"])
    for k in (1, 2, 3):
        first.log({"round": k, "train_loss": 1.0 / k})
    # a resumed run (its metrics.jsonl holds rounds 1-2) continues at round 3
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": k, "train_loss": 1.0 / k}) + "\n" for k in (1, 2))
    )
    resumed = Tracker(run_dir, ["csv"])
    resumed.log({"round": 3, "train_loss": 0.3, "pck_mean": 50.0})
    table = (run_dir / CSV_FILE).read_text().splitlines()
    assert table == ["round,train_loss,pck_mean", "1,1.0,", "2,0.5,", "3,0.3,50.0"]
    fresh = Tracker(run_dir, ["csv"])
    fresh.log({"round": 1, "train_loss": 2.0})
    assert (run_dir / CSV_FILE).read_text().splitlines() == ["round,train_loss", "1,2.0"]


def test_track_is_checked_with_the_config(tmp_path, capsys):
    args = [
        "run",
        str(Path(__file__).parents[1] / "configs" / "demo.toml"),
        "-c",
        "track=['mlflow']",
        "-c",
        f"out_dir={tmp_path}",
    ]
    assert main(args) == 2
    assert "track: 'mlflow' is not allowed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _finished_run(tmp_path, rounds: int = 3, done: int = 3):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"fed": {"rounds": rounds}}))
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"round": k, "train_loss": math.exp(-k), "pck_mean": 10.0 * k}) + "\n"
            for k in range(1, done + 1)
        )
    )
    return run_dir


def test_watch_draws_a_finished_run_once_and_returns(tmp_path):
    run_dir = _finished_run(tmp_path)
    said, slept = [], []
    assert watch(run_dir, every=5.0, say=said.append, sleep=slept.append) is True
    assert slept == [] and len(said) == 1 and said[0].startswith("round 3/3")
    png = (run_dir / WATCH_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["watch", str(run_dir), "--every", "1"]) == 0


def test_watch_follows_a_running_run_and_gives_up_at_its_time_limit(tmp_path):
    run_dir = _finished_run(tmp_path, rounds=5, done=2)
    said, slept = [], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 1:  # the run logs round 3 meanwhile
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"round": 3, "train_loss": 0.1}) + "\n")

    # every=1, timeout=2.5: the loop may sleep at most twice before the time limit stops it
    finished = watch(run_dir, every=1.0, timeout=2.5, say=said.append, sleep=sleep)
    assert finished is False
    assert [s.split(",")[0] for s in said] == ["round 2/5", "round 3/5"]
    assert len(slept) <= 2


def test_watch_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["watch", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
