"""Benchmarks at toy sizes: they run, their figures are consistent, their last lines parse."""

from __future__ import annotations

import math

import pytest
import torch

from fedpose.cli import main
from fedpose.model.train_step import cpu_threads
from fedpose.tools.bench_data import DataBenchOptions, bench_data
from fedpose.tools.bench_train import TrainBenchOptions, bench_train, fedgh_step_seconds
from fedpose.tools.machine import bf16_peak_tflops, model_config, train_flops_per_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_threads_never_exceed_the_share_of_cores(monkeypatch):
    monkeypatch.setattr("fedpose.model.train_step.available_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert cpu_threads(0, processes=1) == 8
    assert cpu_threads(0, processes=3) == 2
    assert cpu_threads(0, processes=20) == 1
    assert cpu_threads(32) == 8  # an explicit request is capped at the cores
    assert cpu_threads(3) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1 wins
    assert cpu_threads(0, processes=1) == 1


def test_model_names_and_flops():
    assert model_config("pose_resnet50").depth == 50
    with pytest.raises(ValueError):
        model_config("resnet50")
    # the convolutions' cost grows with the pixels, and backward costs about twice forward
    small = train_flops_per_image(model_config("pose_resnet18"), 14, 32)
    large = train_flops_per_image(model_config("pose_resnet18"), 14, 64)
    assert large == pytest.approx(4 * small, rel=0.02)
    assert bf16_peak_tflops(torch.device("cpu")) is None
    assert bf16_peak_tflops(torch.device("cpu"), override=100.0) == 100.0


@pytest.mark.slow  # seconds of timed loading; the command test below stays fast
def test_bench_data_measures_both_sides(synth_dir):
    res = bench_data(
        DataBenchOptions(
            dataset="synth-arm",
            root=str(synth_dir),
            input_size=32,
            workers=1,
            batch_size=4,
            samples=8,
            model="pose_resnet18",
            model_batch=2,
            model_steps=1,
            device="cpu",
            repeats=1,
        )
    )
    for key in ("per_worker_uncached", "per_worker_cold", "per_worker", "loader", "model_img_s"):
        assert res[key] > 0 and math.isfinite(res[key])
    assert res["ratio"] == pytest.approx(res["loader"] / res["model_img_s"])
    assert res["cache_mb"] > 0


@pytest.mark.slow  # seconds of timed training steps: make test-slow
def test_bench_train_on_cpu_with_fedgh(synth_dir):
    res = bench_train(
        TrainBenchOptions(
            model="pose_resnet18",
            input_size=32,
            device="cpu",
            dataset="synth-arm",
            root=str(synth_dir),
            batch_size=4,
            workers=1,
            steps=2,
            warmup=1,
            fedgh_clients=4,
            fedgh_params=5000,
            fedgh_repeats=1,
        )
    )
    assert res["real_img_s"] > 0 and res["synthetic_img_s"] > 0
    assert res["peak_tflops"] is None and res["real_share"] is None  # a CPU has no known peak
    assert res["fedgh"]["fedavg"] > 0 and res["fedgh"]["fedgh"] > 0
    assert res["fedgh"]["gram_gemm"] > 0


@pytest.mark.slow  # seconds of timed loading: make test-slow
def test_bench_data_command_prints_the_ratio_last(synth_dir, capsys):
    assert (
        main(
            [
                "bench",
                "data",
                "--dataset",
                "synth-arm",
                "--root",
                str(synth_dir),
                "--input",
                "32",
                "--model",
                "pose_resnet18",
                "--device",
                "cpu",
                "--workers",
                "1",
                "--batch",
                "4",
                "--samples",
                "8",
                "--model-batch",
                "2",
                "--steps",
                "1",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "DataLoader with 1 workers" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("pipeline/model: ") and float(last.split(": ")[1]) > 0


def test_bench_train_without_cuda_is_one_error_line(synth_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert (
        main(
            [
                "bench",
                "train",
                "--dataset",
                "synth-arm",
                "--root",
                str(synth_dir),
                "--device",
                "cuda",
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    lines = [x for x in (captured.out + captured.err).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "cuda" in lines[0]


def test_fedgh_step_on_device_reports_errors_instead_of_raising(monkeypatch):
    from fedpose.fl.strategies import FedGH

    def broken(*_):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(FedGH, "aggregate", broken)
    out = fedgh_step_seconds(3, 100, torch.device("cpu"), repeats=1)
    assert out["fedavg"] > 0
    assert out["fedgh"] is None and "no kernel" in out["fedgh_error"]


@pytest.mark.slow  # starts fresh interpreters
def test_bench_sim_smoke(tmp_path):
    from fedpose.tools.bench_sim import SimBenchOptions, bench_sim

    opts = SimBenchOptions(
        clients=12, per_round=3, rounds=3, samples_per_client=2, sizes="12", workdir=str(tmp_path)
    )
    rows = bench_sim(opts)["rows"]
    assert [r["clients"] for r in rows] == [12]
    for row in rows:
        assert row["rounds"] == 2  # the first of the three rounds only warms up
        assert 0.0 < row["overhead_share"] < 1.0
        assert row["train_s"] > 0 and row["eval_s"] > 0
        assert row["state_memory"] == 0  # FedDyn's client state went to disk
        assert row["trained"] == 3 * 3
        assert 0 < row["state_clients"] <= 3 * 3  # only clients that trained hold state
        assert row["state_disk"] > 0
        phases = row["phases_ms"]
        assert all(phases[p] > 0 for p in ("state read", "state write", "reply checks"))
        assert all(phases[p] > 0 for p in ("aggregation", "checkpoint"))
        # the phases are parts of the overhead
        per_client = 1e3 * row["overhead_s"] * row["rounds"] / (3 * 2)
        assert sum(phases.values()) == pytest.approx(per_client)


def test_bench_sim_prints_the_overhead_share_last(monkeypatch, capsys):
    row = {
        "clients": 10,
        "per_round": 10,
        "round_s": 2.0,
        "train_s": 1.8,
        "eval_s": 0.1,
        "overhead_s": 0.1,
        "overhead_share": 0.05,
        "peak_rss": 2**28,
        "rss_growth": 0,
        "state_clients": 10,
        "state_memory": 0,
        "state_disk": 2**20,
        "params": 1000,
        "phases_ms": {
            "state read": 0.1,
            "state write": 0.2,
            "reply checks": 0.3,
            "aggregation": 0.4,
            "checkpoint": 0.5,
            "other": 0.6,
        },
    }
    monkeypatch.setattr(
        "fedpose.tools.bench_sim.bench_sim",
        lambda *_, **__: {"rows": [row], "overhead_share": 0.05, "method": "feddyn"},
    )
    assert main(["bench", "sim", "--clients", "10", "--sizes", "10"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "overhead share: 0.0500"
