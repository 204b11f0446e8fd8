"""Every failure is loud and counted: faulty clients are refused with a reason, a round in which
every client fails stops the run (exit 1), no untrained or non-finite model is ever written, and a
federation with 30 % faulty clients equals one that simply omitted them."""

from __future__ import annotations

import json

import pytest
import torch
from fedtiny import tiny_cli_args, tiny_config

from fedpose.cli import main
from fedpose.config import FAULT_KINDS, load_config
from fedpose.engine.local import LocalTransport
from fedpose.engine.runner import run_federation
from fedpose.fl.faults import FaultPlan
from fedpose.fl.messages import TrainReply
from fedpose.fl.params import model_layout
from fedpose.fl.reply_check import check_reply, norm_problem, norm_reference
from fedpose.fl.server import FederationError
from fedpose.model.pose_resnet import PoseResNet

ALL_FAULTS = json.dumps(list(FAULT_KINDS))


# ----------------------------------------------------------------------------- reply checks
@pytest.fixture(scope="module")
def layout_and_weights():
    model = PoseResNet(3, depth=18, width=4, deconv_filters=8)
    layout = model_layout(model)
    return layout, {n: t.clone() for n, t in model.state_dict().items()}


def _reply(layout, weights, **changes) -> TrainReply:
    size = layout.slices[-1][2]
    reply = TrainReply(
        client_id=0,
        version=0,
        num_samples=5,
        delta=torch.zeros(size),
        averaged={n: weights[n].clone() for n in layout.avg_names},
        train_loss=0.1,
    )
    for key, value in changes.items():
        setattr(reply, key, value)
    return reply


def test_sound_reply_passes(layout_and_weights):
    layout, weights = layout_and_weights
    reply = _reply(layout, weights)
    assert check_reply(reply, layout, weights) == (None, 0.0)
    # packed once here for the server's weighted average
    assert reply.averaged_flat is not None and reply.averaged_flat.dtype == torch.float64


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda n, w, lay: {"delta": torch.zeros(n - 1)}, "shape"),
        (lambda n, w, lay: {"delta": torch.zeros(n + 7)}, "shape"),
        (lambda n, w, lay: {"delta": torch.zeros(2, n // 2)}, "shape"),
        (lambda n, w, lay: {"delta": torch.zeros(n, dtype=torch.float64)}, "dtype"),
        (lambda n, w, lay: {"delta": torch.zeros(n, dtype=torch.int32)}, "dtype"),
        (lambda n, w, lay: {"delta": None}, "no update"),
        (lambda n, w, lay: {"delta": [0.0] * n}, "no update"),
        (lambda n, w, lay: {"delta": torch.full((n,), float("inf"))}, "non-finite"),
        (lambda n, w, lay: {"delta": _one_bad(torch.zeros(n), float("nan"))}, "non-finite"),
        (lambda n, w, lay: {"delta": _one_bad(torch.zeros(n), float("-inf"))}, "non-finite"),
        (
            lambda n, w, lay: {
                "averaged": {
                    k: _one_bad(w[k].clone(), float("nan")) if k.endswith("running_var") else w[k]
                    for k in lay.avg_names
                }
            },
            "non-finite values in",
        ),
        (lambda n, w, lay: {"averaged": {}}, "missing"),
        (
            lambda n, w, lay: {
                "averaged": {**{k: w[k] for k in lay.avg_names}, "extra": w[lay.avg_names[0]]}
            },
            "extra",
        ),
        (
            lambda n, w, lay: {
                "averaged": {
                    k: w[k].double() if w[k].is_floating_point() else w[k] for k in lay.avg_names
                }
            },
            "float64",
        ),
        (
            lambda n, w, lay: {"averaged": {k: w[k].reshape(-1)[:1] for k in lay.avg_names}},
            "expected",
        ),
        (lambda n, w, lay: {"num_samples": 0}, "no training samples"),
        (lambda n, w, lay: {"num_samples": 2.5}, "not an integer"),
        (lambda n, w, lay: {"error": "client crashed: boom"}, "boom"),
    ],
)
def test_malformed_replies_are_refused_with_a_reason(layout_and_weights, change, reason):
    layout, weights = layout_and_weights
    reply = _reply(layout, weights, **change(layout.slices[-1][2], weights, layout))
    problem, _ = check_reply(reply, layout, weights)
    assert problem is not None and reason in problem
    assert reply.averaged_flat is None


def _one_bad(t: torch.Tensor, value: float) -> torch.Tensor:
    t.view(-1)[t.numel() // 2] = value
    return t


def test_the_largest_finite_update_is_finite(layout_and_weights):
    # the norm is the finiteness check: float32's largest values must not overflow it
    layout, weights = layout_and_weights
    reply = _reply(layout, weights, delta=torch.full((layout.slices[-1][2],), -3.4e38))
    problem, norm = check_reply(reply, layout, weights)
    assert problem is None and norm > 1e38


def test_norm_outliers():
    assert norm_reference([], [3.0, 1.0, 2e30]) == 1.0  # a majority of huge ones can't vote
    assert norm_reference([], [0.0, 2.0]) == 2.0
    assert norm_reference([1.0, 2.0, 50.0], [1e9]) == 2.0
    assert norm_reference([], []) is None
    assert norm_problem(1e30, 1.0, 100.0) is not None
    assert norm_problem(99.0, 1.0, 100.0) is None
    assert norm_problem(1e30, 1.0, 0.0) is None  # the check is off


# ----------------------------------------------------------------------------- fault injection
def test_fault_plan_is_seeded_and_has_the_rate():
    cfg = load_config(None, [f"system.faults={ALL_FAULTS}", "system.fault_rate=0.3"])
    plan = FaultPlan(cfg.system, seed=3)
    draws = [plan.fault(r, k) for r in range(400) for k in range(5)]
    assert draws == [
        FaultPlan(cfg.system, seed=3).fault(r, k) for r in range(400) for k in range(5)
    ]
    share = sum(d is not None for d in draws) / len(draws)
    assert 0.26 < share < 0.34
    assert {d for d in draws if d} == set(FAULT_KINDS)


class OmittingTransport(LocalTransport):
    """Clients the fault plan marks as faulty send no update at all (without training)."""

    def __init__(self, federation, plan: FaultPlan):
        super().__init__(federation)
        self.faults = FaultPlan(load_config(None, []).system, 0)  # no injected faults
        self.omit = plan

    def receive(self, client_id: int) -> TrainReply:
        request = self.requests[client_id]
        if self.omit.fault(request.round, client_id):
            self.requests.pop(client_id)
            return TrainReply(client_id=client_id, version=request.version, error="omitted")
        return super().receive(client_id)


@pytest.mark.usefixtures("one_thread")
# FedGH in the fast suite (its weights depend on which updates came), FedAvg slow
@pytest.mark.parametrize("method", [pytest.param("fedavg", marks=pytest.mark.slow), "fedgh"])
def test_30_percent_faulty_clients_equal_a_run_that_omitted_them(tmp_path, synth_dir, method):
    sets = [
        f"fed.method={method}",
        "fed.rounds=5",
        "fed.local_steps=1",
        "fed.eval_every=5",
        "seed=61",
    ]  # at fault_rate 0.3, 7 of 20 replies faulty, all five kinds, never a whole round
    faulty_cfg = tiny_config(
        tmp_path,
        synth_dir,
        "name=faulty",
        *sets,
        f"system.faults={ALL_FAULTS}",
        "system.fault_rate=0.3",
    )
    plan = FaultPlan(faulty_cfg.system, faulty_cfg.seed)
    faulty = {(r, k): plan.fault(r, k) for r in range(5) for k in range(4) if plan.fault(r, k)}
    assert 5 <= len(faulty) <= 8 and set(faulty.values()) == set(FAULT_KINDS)
    assert all(sum((r, k) in faulty for k in range(4)) < 4 for r in range(5))

    server = run_federation(faulty_cfg)
    clean_cfg = tiny_config(tmp_path, synth_dir, "name=clean", *sets)
    reference = run_federation(clean_cfg, transport_factory=lambda f: OmittingTransport(f, plan))

    for name, tensor in reference.weights.items():
        assert torch.equal(server.weights[name], tensor), name
    lines = (faulty_cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    for row in rows:
        r = row["round"] - 1
        assert {int(k) for k in row["rejected"]} == {k for (rr, k) in faulty if rr == r}
        assert row["aggregated"] == [k for k in range(4) if (r, k) not in faulty]
    reasons = " ".join(v for row in rows for v in row["rejected"].values())
    for expected in ("InjectedFault", "non-finite", "shape", "norm", "timeout"):
        assert expected in reasons


def _cli_args(tmp_path, synth_dir) -> list[str]:
    return tiny_cli_args(tmp_path / "runs", synth_dir, "fed.rounds=2")


def test_console_shows_rejected_clients_with_the_reason(tmp_path, synth_dir, capsys):
    assert (
        main(
            [
                "run",
                "configs/demo.toml",
                *_cli_args(tmp_path, synth_dir),
                "-c",
                'system.faults=["nan"]',
                "-c",
                "system.fault_rate=0.5",
                "-c",
                "seed=2",
                "-c",
                "fed.rounds=1",
            ]
        )
        == 0
    )  # seed 2: client 1 faulty, client 0 sound
    out = capsys.readouterr().out
    assert "rejected client" in out and "non-finite values in the update" in out


@pytest.mark.parametrize("retries", [0, 2])
def test_a_round_where_every_client_fails_stops_with_exit_1(tmp_path, synth_dir, capsys, retries):
    assert (
        main(
            [
                "run",
                "configs/demo.toml",
                *_cli_args(tmp_path, synth_dir),
                "-c",
                'system.faults=["exception"]',
                "-c",
                "system.fault_rate=1",
                "-c",
                f"fed.round_retries={retries}",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: round 1: every selected client failed")
    assert f"{retries} retries" in err[0]
    assert "first: client 0: client crashed: InjectedFault" in err[0]
    assert not (tmp_path / "runs" / "t" / "model.safetensors").exists()


def test_a_non_finite_global_model_is_never_written(tmp_path, synth_dir, capsys):
    assert (
        main(
            [
                "run",
                "configs/demo.toml",
                *_cli_args(tmp_path, synth_dir),
                "-c",
                "fed.method=fedavg",
                "-c",
                "fed.server_lr=1e300",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the aggregated model is not finite" in err[0], err
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "checkpoints").exists()


def test_no_update_ever_means_no_saved_model(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "system.dropout=0.999999")
    with pytest.raises(FederationError, match="no client update arrived in 2 rounds"):
        run_federation(cfg)
    assert not (cfg.run_dir / "model.safetensors").exists()


def test_async_mode_ends_when_no_update_can_arrive(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "fed.mode=async", "system.dropout=0.999999")
    with pytest.raises(FederationError, match="asynchronous mode: no update can arrive"):
        run_federation(cfg)
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "name=t2",
        "fed.mode=async",
        'system.faults=["exception"]',
        "system.fault_rate=1",
    )
    with pytest.raises(FederationError, match="first failure: client .*InjectedFault"):
        run_federation(cfg)


@pytest.mark.usefixtures("one_thread")
def test_async_mode_with_faulty_clients_completes(tmp_path, synth_dir):
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "fed.mode=async",
        "fed.rounds=4",
        f"system.faults={ALL_FAULTS}",
        "system.fault_rate=0.3",
        "fed.local_steps=1",
    )
    server = run_federation(cfg)
    assert server.state.round == 4
    assert all(
        bool(torch.isfinite(t).all()) for t in server.weights.values() if t.is_floating_point()
    )


# ----------------------------------------------------------------------------- no capture
def test_the_norm_reference_never_exceeds_the_initial_models_scale():
    # every candidate huge and no history: the initial model's norm is the yardstick
    assert norm_reference([], [1e30, 2e30], scale=5.0) == 5.0
    # a history grown step by step cannot lift the reference above it either
    assert norm_reference([1e6, 2e6, 3e6], [1.0], scale=5.0) == 5.0
    # ordinary updates, far below the model's norm, keep their own reference
    assert norm_reference([0.1, 0.2, 0.3], [0.15], scale=5.0) == 0.2
    assert norm_reference([], [], scale=5.0) == 5.0


def test_an_exploding_federation_stops_with_one_line_and_saves_nothing(tmp_path, synth_dir, capsys):
    # every update of every round is huge: no reference can be taken from them
    args = _cli_args(tmp_path, synth_dir)
    faults = ["-c", "system.faults=['exploding_norm']", "-c", "system.fault_rate=1"]
    assert main(["run", "configs/demo.toml", *args, *faults, "-c", "fed.round_retries=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: round 1: every selected client failed")
    assert "2 retries" in err[0] and "times the reference" in err[0]
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "checkpoints").exists()


def test_a_model_whose_norm_exploded_is_never_saved(tmp_path, synth_dir, capsys):
    # finite, every update accepted, but the server step blows the model up
    args = [*_cli_args(tmp_path, synth_dir), "-c", "fed.method=fedavg", "-c", "fed.server_lr=1e7"]
    assert main(["run", "configs/demo.toml", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the aggregated model exploded" in err[0], err
    assert not (tmp_path / "runs" / "t" / "model.safetensors").exists()


def test_round_retries_are_bounded(capsys):
    from fedpose.config import MAX_ROUND_RETRIES

    assert load_config(None, [f"fed.round_retries={MAX_ROUND_RETRIES}"])
    assert main(["run", "configs/demo.toml", "-c", "fed.round_retries=1000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"fed.round_retries: 1000000000 is out of range; allowed: [0, {MAX_ROUND_RETRIES}]"
        in err[0]
    )


def test_a_diverged_centralized_training_saves_nothing(tmp_path, synth_dir, capsys):
    args = _cli_args(tmp_path, synth_dir)
    diverge = ["-c", "train.epochs=1", "-c", "train.optimizer=sgd", "-c", "train.lr=1e30"]
    assert main(["train", "configs/demo.toml", *args, *diverge]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 1: tensor" in err[0] and "NaN or Inf" in err[0], err
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
