"""The comparison statistic, paired intervals, `fedpose report` and `fedpose compare --jobs`."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from fedtiny import tiny_cli_args

from fedpose.cli import main
from fedpose.report.experiment import load_arms, write_report
from fedpose.report.stats import paired_difference, tail_mean, tail_window
from fedpose.run_dir import owner


# ------------------------------------------------------------------------------- statistics
def test_tail_window_is_the_last_fifth_of_the_rounds():
    assert tail_window(40) == (33, 40)
    assert tail_window(10) == (9, 10)
    assert tail_window(8) == (7, 8)
    assert tail_window(3) == (3, 3)


def test_tail_mean_never_takes_the_best_round():
    rows = [
        {"round": r, "pck_mean": v}
        for r, v in enumerate([10, 30, 90, 40, 41, 42, 43, 44, 50, 60], start=1)
    ]
    rows.insert(3, {"round": 3, "train_loss": 1.0})  # rows without an evaluation are skipped
    assert tail_mean(rows, 10) == pytest.approx(55.0)
    only_early = [{"round": 2, "pck_mean": 70.0}, {"round": 9}]
    assert tail_mean(only_early, 10) == 70.0  # no evaluation inside: the last one


def test_paired_interval_matches_scipys_paired_t():
    from scipy import stats

    a = {0: 71.0, 1: 74.5, 2: 69.0, 3: 73.2, 4: 70.1}
    b = {0: 70.0, 1: 71.0, 2: 70.5, 3: 70.0, 4: 69.9, 9: 50.0}  # seed 9 has no partner
    diff = paired_difference(a, b)
    seeds = sorted(a)
    ref = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(0.95)
    assert diff.n == 5
    assert diff.mean == pytest.approx(sum(a[s] - b[s] for s in seeds) / 5)
    assert (diff.low, diff.high) == pytest.approx((ref.low, ref.high))
    assert diff.resolved == (ref.low > 0 or ref.high < 0)


def test_paired_interval_by_hand():
    diff = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) · sd / √n with sd = 1
    assert (diff.mean, diff.std) == pytest.approx((2.0, 1.0))
    assert (diff.low, diff.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert not diff.resolved
    one = paired_difference({0: 1.0}, {0: 0.0})
    assert one.n == 1 and math.isnan(one.low) and not one.resolved
    assert paired_difference({0: 1.0}, {1: 0.0}) is None


# ------------------------------------------------------------------------------- fedpose report
def _fake_run(
    root: Path,
    label: str,
    seed: int,
    finals: list[float],
    rounds: int = 10,
    stop: int | None = None,
    conflict: float | None = 0.3,
) -> None:
    d = root / f"{label}-s{seed}"
    d.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "name": f"x/{label}-s{seed}",
        "data": {"dataset": "synth-arm", "root": "data", "input_size": 64},
        "model": {"depth": 18, "width": 16},
        "train": {"batch_size": 32},
        "fed": {
            "rounds": rounds,
            "num_clients": 4,
            "partition": "attribute",
            "partition_attr": "view",
            "mode": "sync",
            "local_steps": 8,
            "eval_every": 1,
        },
        "runtime": {
            "torch_threads": 1,
            "gram_path": "torch",
            "torch": "2",
            "machine": "x",
            "commit": "abc123",
        },
    }
    (d / "config.json").write_text(json.dumps(cfg))
    rows = []
    for r in range(1, (stop or rounds) + 1):
        value = finals[r - rounds - 1] if r > rounds - len(finals) else 20.0 + r
        rows.append(
            {
                "round": r,
                "pck_mean": value,
                "train_loss": 1.0 / r,
                "sim_time": 2.0 * r,
                "conflict_share": conflict,
                "pck_per_joint": {"shoulder": value + 10, "elbow": value, "wrist": value - 10},
            }
        )
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


def _experiment(root: Path) -> Path:
    runs = root / "exp"
    for seed, (avg, gh) in enumerate([(60.0, 62.0), (58.0, 61.0), (61.0, 62.5), (59.0, 60.0)]):
        _fake_run(runs, "fedavg", seed, [avg - 1, avg + 1], conflict=None)
        _fake_run(runs, "fedgh", seed, [gh, gh])
    _fake_run(runs, "fedgh", 7, [99.0], stop=5)  # stopped early: listed, not scored
    return runs


def test_report_tables_differences_and_bands(tmp_path):
    from scipy import stats

    arms = load_arms([_experiment(tmp_path)])
    assert list(arms) == ["fedavg", "fedgh"]
    assert arms["fedgh"].scores() == {0: 62.0, 1: 61.0, 2: 62.5, 3: 60.0}
    md = write_report(
        arms,
        tmp_path / "out",
        "t",
        command="fedpose report exp",
        produced_by="fedpose compare cfg.toml",
    )
    text = md.read_text()
    assert "| fedgh | 4 | 71.38 ± 1.11 | 61.38 ± 1.11 | 51.38 ± 1.11 | 61.38 ± 1.11 |" in text
    diffs = [2.0, 3.0, 1.5, 1.0]
    ref = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    interval = f"[{ref.low:+.2f}, {ref.high:+.2f}]"
    assert f"| fedgh − fedavg | 4 | +1.88 | 0.85 | {interval} | yes |" in text
    assert "rounds 9–10 of 10" in text
    assert "not scored, stopped at round 5 of 10: fedgh-s7" in text
    assert "commit abc123" in text and "`fedpose compare cfg.toml`" in text
    assert "Not recorded in these runs' metrics.jsonl: heatmap accuracy" in text
    for png in ("pck_vs_round.png", "conflict_share_vs_round.png", "train_loss_vs_round.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["differences"]["fedgh-fedavg"]["resolved"] is True


def test_report_time_to_target(tmp_path):
    md = write_report(
        load_arms([_experiment(tmp_path)]), tmp_path / "out", "t", target_pck=55.0, figures=False
    )
    # fedavg first reaches 55 % at round 9 on every seed: simulated time 18 s
    assert "| fedavg | 4/4 | 18.0 ± 0.0 | 9.0 ± 0.0 | 20.0 ± 0.0 |" in md.read_text()


def test_report_command(tmp_path):
    runs = _experiment(tmp_path)
    out = tmp_path / "results" / "README.md"
    assert main(["report", str(runs), "--out", str(out), "--title", "Synthetic"]) == 0
    text = out.read_text()
    assert text.startswith("# Synthetic")
    assert f"Report made by: `fedpose report {runs} --out {out} --title Synthetic`" in text
    assert (out.parent / "README_pck_vs_round.png").exists()


def test_report_of_a_missing_folder_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]


# ------------------------------------------------------------------------------- compare --jobs
@pytest.mark.slow  # starts fresh interpreters
def test_compare_runs_seeds_in_single_thread_processes(tmp_path, synth_dir):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "tiny"\n')
    sets = [
        f"out_dir={tmp_path / 'runs'}",
        "data.dataset=synth-arm",
        f"data.root={synth_dir}",
        "data.input_size=32",
        "data.test_fraction=0.25",
        "model.width=4",
        "model.deconv_filters=8",
        "train.batch_size=8",
        "train.flip_test=false",
        "fed.rounds=1",
        "fed.local_steps=1",
    ]
    args = ["compare", str(cfg), "--methods", "fedavg", "--seeds", "0-1", "--jobs", "2"]
    for s in sets:
        args += ["-c", s]
    assert main(args) == 0
    for seed in (0, 1):
        run = tmp_path / "runs" / "tiny" / f"fedavg-s{seed}"
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 1
        config = json.loads((run / "config.json").read_text())
        assert config["seed"] == seed
        assert config["runtime"]["torch_threads"] == 1  # the worker ran single-threaded
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "| fedavg | 2 |" in report


def test_compare_generates_synth_arm_once_before_its_parallel_runs(tmp_path, monkeypatch):
    import fedpose.engine.experiment as experiment

    root = tmp_path / "synth"
    found_before_runs = []

    def run_in_process(jobs, *_):
        # the worker processes would race to render the same files into one folder
        found_before_runs.append((root / "annotations.json").is_file())
        return {job.name: job.run_here() for job in jobs}

    monkeypatch.setattr(experiment, "run_jobs", run_in_process)
    sets = tiny_cli_args(
        tmp_path / "runs",
        root,
        "data.synth_n=24",
        "data.synth_size=32",
        "data.test_fraction=0.25",
        "data.generate=true",
    )
    args = ["compare", "configs/demo.toml", "--methods", "fedavg", "--seeds", "0-1", "--jobs", "2"]
    assert main([*args, *sets, "--no-figures"]) == 0
    assert found_before_runs == [True]
    assert len(list((root / "images").glob("*.png"))) == 24
    assert not list(root.rglob("*.tmp"))  # every file renamed into place
    assert "| fedavg | 2 |" in (tmp_path / "runs" / "t" / "report.md").read_text()


def test_compare_checks_every_variant_before_the_first_run(tmp_path, capsys):
    sets = tiny_cli_args(tmp_path / "runs", tmp_path / "synth")
    args = ["compare", "configs/demo.toml", "--methods", "fedavg,fedgh2", "--seeds", "0-1"]
    assert main([*args, *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: fed.method: 'fedgh2'"), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "synth").exists()


def test_centralized_runs_join_the_report_with_epochs_as_rounds(tmp_path):
    runs = _experiment(tmp_path)
    for seed in range(4):
        d = runs / f"local-c0-s{seed}"
        d.mkdir()
        cfg = {"seed": seed, "fed": {"rounds": 40}, "train": {"epochs": 5}}
        (d / "config.json").write_text(json.dumps(cfg))
        rows = [{"epoch": e, "pck_mean": 30.0 + e + seed} for e in range(1, 6)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    arms = load_arms([runs])
    local = arms["local-c0"]
    assert all(r.centralized and r.complete for r in local.runs)
    # the last 20 % of 5 epochs is epoch 5, whatever fed.rounds says
    assert local.scores() == {0: 35.0, 1: 36.0, 2: 37.0, 3: 38.0}
    text = write_report(
        arms, tmp_path / "out", "t", baselines=("fedavg",), figures=False
    ).read_text()
    assert "| local-c0 − fedavg | 4 |" in text


def test_report_shows_where_updates_conflict(tmp_path):
    runs = _experiment(tmp_path)
    for seed in range(2):
        rows = []
        for r in range(1, 11):
            layers = {
                "conv1.weight": {"conflict_share": 0.0, "norms": [1.0]},
                "layer1.0.conv1.weight": {"conflict_share": 0.5, "norms": [1.0]},
                "final_layer.weight": {"conflict_share": 1.0 if seed else 0.5, "norms": [1.0]},
            }
            rows.append({"round": r, "pck_mean": 50.0, "layer_conflict": layers})
        d = runs / f"fedgh-stats-s{seed}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"seed": seed, "fed": {"rounds": 10}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    text = write_report(load_arms([runs]), tmp_path / "out", "t").read_text()
    assert "| method | seeds | conv1 | layer1 | final_layer |" in text
    assert "| fedgh-stats | 2 | 0.00 | 0.50 | 0.75 |" in text
    assert (tmp_path / "out" / "layer_conflict.png").stat().st_size > 1000


def test_report_tables_what_the_server_did(tmp_path):
    runs = tmp_path / "exp"
    for seed in range(2):
        _fake_run(runs, "fedgh", seed, [60.0, 61.0], conflict=0.5)
        path = runs / f"fedgh-s{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.update(aggregated=[0, 1], weights=[0.25, 0.75], coefficients=[0.3, 0.9])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # a server optimiser logs its step: 2, 4, ..., 20 in seed 0's ten rounds, 4 more in seed 1's
        _fake_run(runs, "fedyogi", seed, [60.0, 61.0], conflict=None)
        path = runs / f"fedyogi-s{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, r in enumerate(rows):
            r.update(aggregated=[0, 1], weights=[0.5, 0.5], server_step_norm=2.0 + 2 * i + 4 * seed)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(load_arms([runs]), tmp_path / "out", "t", figures=False).read_text()
    # no cosines: no step ratio; no server optimiser: no server step
    assert "| fedgh | 0.500 | 1.200 | – | – | 0: 0.250, 1: 0.750 |" in text
    assert "| fedyogi | – | – | – | 13.000 | 0: 0.500, 1: 0.500 |" in text


def _cpu_run(folder: Path, label: str, seed: int, cpu: str | None, pck: float) -> None:
    run = folder / f"{label}-s{seed}"
    run.mkdir(parents=True)
    runtime = {"cpu_model": cpu} if cpu else {}
    config = {"seed": seed, "fed": {"rounds": 2, "method": label}, "runtime": runtime}
    (run / "config.json").write_text(json.dumps(config))
    rows = [{"round": r, "pck_mean": pck + r + seed} for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_refuses_runs_of_different_cpu_models_unless_told(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _cpu_run(runs, "fedavg", seed, "AMD EPYC 7763 64-Core Processor", 50.0)
        _cpu_run(runs, "fedgh", seed, "Intel(R) Xeon(R) Platinum 8370C" if seed else None, 51.0)
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--mixed-cpus" in err[0]
    assert "Xeon" in err[0] and "EPYC" in err[0]
    assert not out.exists()  # nothing written
    assert main(["report", str(runs), "--out", str(out), "--mixed-cpus", "--no-figures"]) == 0
    assert "CPU model of the runs" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))  # --no-figures: the tables alone
    assert owner(out) == "report"  # the folder it made is its own: no run or train writes there
    # a run without a recorded model (made before it was recorded) does not count as another
    (runs / "fedgh-s1").rename(tmp_path / "aside")
    assert main(["report", str(runs), "--out", str(tmp_path / "again"), "--no-figures"]) == 0


def test_step_ratio_from_the_logged_gram_quantities():
    from fedpose.report.experiment import step_ratio

    d = [[3.0, 0.0], [-1.0, 2.0]]  # two updates, in conflict
    norms = [math.hypot(*x) for x in d]
    cos = [
        [
            sum(a * b for a, b in zip(x, y, strict=True)) / (nx * ny)
            for y, ny in zip(d, norms, strict=True)
        ]
        for x, nx in zip(d, norms, strict=True)
    ]
    psi, coef = [0.5, 0.5], [0.7, 0.4]
    step = [sum(c * x[i] for c, x in zip(coef, d, strict=True)) for i in range(2)]
    plain = [sum(c * x[i] for c, x in zip(psi, d, strict=True)) for i in range(2)]
    row = {"coefficients": coef, "weights": psi, "cosine": cos, "update_norms": norms}
    assert step_ratio(row) == pytest.approx(math.hypot(*step) / math.hypot(*plain))
    assert step_ratio({**row, "coefficients": psi}) == pytest.approx(1.0)
    assert step_ratio({"weights": psi}) is None


def test_tuning_table_names_each_methods_grid_and_its_choice(tmp_path):
    runs = tmp_path / "tune"
    grid = {
        "fedavgm-m0.5": ({"method": "fedavgm", "server_momentum": 0.5}, 40.0),
        "fedavgm-m0.9": ({"method": "fedavgm", "server_momentum": 0.9}, 42.0),
        "fedadam-lr0.01": ({"method": "fedadam", "server_lr": 0.01}, 41.0),
        "fedadam-lr0.001": ({"method": "fedadam", "server_lr": 0.001}, 39.0),
    }
    for label, (fed, pck) in grid.items():
        for seed in (0, 1):
            run = runs / f"{label}-s{seed}"
            run.mkdir(parents=True)
            config = {"seed": seed, "data": {"val_fraction": 0.2}, "fed": {"rounds": 2, **fed}}
            (run / "config.json").write_text(json.dumps(config))
            rows = [{"round": r, "pck_mean": pck + seed} for r in (1, 2)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(load_arms([runs]), tmp_path / "out", "t", figures=False).read_text()
    assert "Scored on a validation split" in text
    assert "| fedavgm | fedavgm-m0.9 | fed.server_momentum=0.9 | 2 | 42.50 ± 0.71 | yes |" in text
    assert "| fedavgm | fedavgm-m0.5 | fed.server_momentum=0.5 | 2 | 40.50 ± 0.71 |  |" in text
    assert "| fedadam | fedadam-lr0.01 | fed.server_lr=0.01 | 2 | 41.50 ± 0.71 | yes |" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tuning"]["fedadam"]["chosen"] == "fedadam-lr0.01"


def test_paired_p_value_and_holm():
    from scipy import stats

    from fedpose.report.stats import holm, paired_p_value

    a = {0: 71.0, 1: 74.5, 2: 69.0, 3: 73.2, 4: 70.1}
    b = {0: 70.0, 1: 71.0, 2: 70.5, 3: 70.0, 4: 69.9}
    seeds = sorted(a)
    ref = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue
    assert paired_p_value(a, b) == pytest.approx(ref)
    # Holm by hand: 0.01 x 3, 0.02 x 2 = 0.04, 0.04 x 1 = 0.04; order of the family kept
    adjusted = holm({"x": 0.04, "y": 0.01, "z": 0.02})
    assert adjusted == pytest.approx({"y": 0.03, "z": 0.04, "x": 0.04})
    assert holm({"x": 0.5, "y": 0.6}) == pytest.approx({"x": 1.0, "y": 1.0})


def test_round_progress_prints_plain_lines_as_runs_advance(tmp_path):
    from rich.console import Console

    from fedpose.engine.progress import RoundProgress, last_round

    out = io.StringIO()
    console = Console(file=out, width=200)  # not a terminal: plain lines
    runs = {name: (tmp_path / name, 3) for name in ("fedaw-s0", "fedgh-s0")}
    for run_dir, _ in runs.values():
        run_dir.mkdir()
    metrics = tmp_path / "fedaw-s0" / "metrics.jsonl"
    with RoundProgress(console, runs) as progress:
        progress.poll(runs, force=True)
        metrics.write_text('{"round": 1}\n{"round": 2}\n{"rou')  # the last line being written
        assert last_round(tmp_path / "fedaw-s0") == 2
        progress.poll(runs, force=True)
        progress.poll(runs, force=True)  # nothing new: nothing printed
        metrics.write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n')
        progress.finished("fedaw-s0", "done in 4 s")
    assert out.getvalue().splitlines() == [
        "fedaw-s0: round 0/3",
        "fedgh-s0: round 0/3",
        "fedaw-s0: round 2/3",
        "fedaw-s0: round 3/3",
        "fedaw-s0: done in 4 s",
    ]


def test_curves_mark_the_scored_window_clip_share_bands_and_tell_arms_apart(tmp_path):
    from fedpose.report.experiment import HEATMAP_ACCURACY, HOW_TO_READ, band_figure

    runs = tmp_path / "exp"
    # conflict shares near 0 with a wide spread across seeds: mean - std would dip below 0
    for seed, share in enumerate([0.0, 0.0, 0.3]):
        _fake_run(runs, "fedaw", seed, [50.0, 50.0], conflict=share)
        _fake_run(runs, "fedgh", seed, [51.0, 51.0], conflict=share)
    arms = load_arms([runs])
    fig = band_figure(arms, "conflict_share", "share", window=(9, 10))
    ax = fig.axes[0]
    bands = [c for c in ax.collections if c.get_paths()]
    ys = np.concatenate([p.vertices[:, 1] for c in bands for p in c.get_paths()])
    assert len(bands) == 2 and ys.min() >= 0.0 and ys.max() <= 1.0
    thick = [line for line in ax.lines if line.get_linewidth() == 2]
    # identical curves: the two arms still differ in line style and marker
    assert len(thick) == 2
    assert thick[0].get_linestyle() != thick[1].get_linestyle()
    assert thick[0].get_marker() != thick[1].get_marker()
    spans = [p for p in ax.patches if p.get_label() == "scored rounds"]
    assert len(spans) == 1
    span = spans[0]  # a Rectangle in data x
    assert (span.get_x(), span.get_x() + span.get_width()) == (8.5, 10.5)
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = write_report(load_arms([runs]), tmp_path / "out", "t").read_text()
    assert HOW_TO_READ in text and "The grey span marks the scored rounds (9–10)." in text
    assert HEATMAP_ACCURACY not in text  # no heatmap accuracy recorded: nothing to define
    for metrics in runs.glob("*/metrics.jsonl"):
        rows = [{**json.loads(x), "heatmap_acc": 40.0} for x in metrics.read_text().splitlines()]
        metrics.write_text("".join(json.dumps(x) + "\n" for x in rows))
    text = write_report(load_arms([runs]), tmp_path / "out2", "t").read_text()
    assert HEATMAP_ACCURACY in text


def test_a_run_outside_a_terminal_prints_a_line_per_round(tmp_path, synth_dir):
    from types import SimpleNamespace

    from fedtiny import tiny_config
    from rich.console import Console

    from fedpose.engine.runner import ConsoleObserver
    from fedpose.train import train_centralized

    out = io.StringIO()
    console = Console(file=out, width=200)  # a log: a progress bar would show only at the end
    observer = ConsoleObserver(tiny_config(tmp_path, synth_dir), console)
    observer.started(SimpleNamespace(strategy=SimpleNamespace(name="fedavg")))
    observer.round_done(1, {"train_loss": 0.5})
    assert out.getvalue() == "tiny fedavg: round 1/2  loss 0.50000\n"  # before the run ends
    observer.round_done(2, {"train_loss": 0.25, "pck_mean": 40.0})
    observer.closed()
    assert out.getvalue().splitlines()[-1] == "tiny fedavg: round 2/2  loss 0.25000  PCK 40.0%"
    train_centralized(tiny_config(tmp_path, synth_dir, "name=c", "train.epochs=1"), console=console)
    epochs = [x for x in out.getvalue().splitlines() if re.match(r"train epoch \d+/", x)]
    assert len(epochs) == 1, epochs
    assert re.fullmatch(r"train epoch 1/1  loss \d\.\d{6}  PCK \d+\.\d%", epochs[0]), epochs
