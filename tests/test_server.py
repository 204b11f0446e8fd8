"""The federated round loop: determinism, bit-exact resume, and faulty clients."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from fedtiny import tiny_config

from fedpose.engine.local import LocalTransport
from fedpose.engine.runner import run_federation
from fedpose.fl import server as server_module
from fedpose.fl.messages import TrainReply
from fedpose.fl.observer import RunObserver
from fedpose.fl.params import rows_of_one_matrix


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_numbers(tmp_path, synth_dir):
    # one round is enough: a second one only repeats what the first did
    a = run_federation(tiny_config(tmp_path, synth_dir, "name=a", "fed.rounds=1"))
    b = run_federation(tiny_config(tmp_path, synth_dir, "name=b", "fed.rounds=1"))
    assert _weights_equal(a.weights, b.weights)
    c = run_federation(tiny_config(tmp_path, synth_dir, "name=c", "fed.rounds=1", "seed=1"))
    assert not _weights_equal(a.weights, c.weights)


class _SeparateUpdates(LocalTransport):
    """Hands every update over as a tensor of its own, as a remote transport does."""

    def _update_row(self, _client_id: int) -> None:
        return None


class _WatchFreezing(RunObserver):
    def __init__(self) -> None:
        self.frozen: list[int] = []

    def round_done(self, _done: int, _record: dict) -> None:
        self.frozen.append(gc.get_freeze_count())


def test_updates_in_one_matrix_aggregate_like_separate_ones_and_the_run_unfreezes(
    tmp_path, synth_dir, monkeypatch
):
    # the in-process transport writes a round's updates as the rows of one matrix, which the
    # server aggregates without copying them; FedGH is the most order-sensitive rule
    found = []

    def watch_rows(rows):
        found.append(rows_of_one_matrix(rows) is not None)
        return rows_of_one_matrix(rows)

    monkeypatch.setattr(server_module, "rows_of_one_matrix", watch_rows)
    watch = _WatchFreezing()
    one_round = ("fed.method=fedgh", "fed.rounds=1")
    rows = run_federation(tiny_config(tmp_path, synth_dir, "name=rows", *one_round), observer=watch)
    cfg = tiny_config(tmp_path, synth_dir, "name=separate", *one_round)
    separate = run_federation(cfg, transport_factory=_SeparateUpdates, observer=RunObserver())
    assert found == [True, False]  # one matrix, then separate updates copied into one
    assert _weights_equal(rows.weights, separate.weights)
    # from the first round's end, what lives as long as the run is out of the collector's way
    assert watch.frozen[0] > 0
    assert gc.get_freeze_count() == 0  # and handed back when the run ends


def test_rows_of_one_matrix_are_found_only_when_they_are_exactly_that():
    matrix = torch.arange(12.0).reshape(4, 3)
    found = rows_of_one_matrix(list(matrix))
    assert torch.equal(found, matrix) and found.data_ptr() == matrix.data_ptr()
    assert torch.equal(rows_of_one_matrix(list(matrix[1:])), matrix[1:])
    assert rows_of_one_matrix([matrix[1], matrix[0]]) is None  # another order
    assert rows_of_one_matrix([matrix[0], matrix[2]]) is None  # a gap
    assert rows_of_one_matrix([matrix[0], matrix[1].clone()]) is None  # a tensor of its own
    assert rows_of_one_matrix([matrix[:, 0], matrix[:, 1]]) is None  # columns, not rows


@pytest.mark.parametrize(
    "extra",
    [
        ("fed.method=fedgh",),
        # FedDyn's client state and FedBN's local BatchNorm: make test-slow (seconds each)
        pytest.param(("fed.method=feddyn",), marks=pytest.mark.slow),
        pytest.param(("fed.method=fedbn",), marks=pytest.mark.slow),
        # the server optimiser's moments and step count live in the checkpoint
        pytest.param(
            ("fed.method=fedgh", "fed.server_opt=adam", "fed.server_lr=0.01"),
            marks=pytest.mark.slow,
        ),
        # SCAFFOLD: c in the strategy state, each c_k in the client states, two of four a round
        pytest.param(("fed.method=scaffold", "fed.clients_per_round=2"), marks=pytest.mark.slow),
        # asynchronous: the pending updates and their snapshots in the checkpoint; make test-slow
        pytest.param(
            (
                "fed.method=fedgh",
                "fed.mode=async",
                "fed.concurrency=3",
                "fed.buffer_size=2",
                "system.speed_spread=10",
            ),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_resume_is_bit_exact(tmp_path, synth_dir, extra):
    # killed after round 1, resumed for two more: the state a checkpoint restores must carry
    # over more than one round
    # one local step a round: what is checked is the state between rounds, not the training
    extra = ("fed.local_steps=1", *extra)
    full = run_federation(tiny_config(tmp_path, synth_dir, "name=full", "fed.rounds=3", *extra))
    run_federation(tiny_config(tmp_path, synth_dir, "name=half", "fed.rounds=1", *extra))
    cfg = tiny_config(tmp_path, synth_dir, "name=half", "fed.rounds=3", *extra)
    resumed = run_federation(cfg, resume=True)
    assert resumed.state.round == 3
    assert _weights_equal(full.weights, resumed.weights)
    drop = ("wall_seconds", "agg_seconds")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _metrics(cfg)]
    ref = [
        {k: v for k, v in r.items() if k not in drop}
        for r in _metrics(tiny_config(tmp_path, synth_dir, "name=full"))
    ]
    assert strip == ref


class _Faulty(LocalTransport):
    """Client 1 sends NaN, client 2 crashes; the others are honest."""

    def receive(self, client_id: int) -> TrainReply:
        if client_id == 2:
            self.requests.pop(client_id)
            raise_inside = TrainReply(client_id=2, version=0, error="client crashed: boom")
            return raise_inside
        reply = super().receive(client_id)
        if client_id == 1:
            reply.delta = reply.delta.clone()
            reply.delta[0] = float("nan")
        return reply


def test_bad_clients_do_not_poison_the_model(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "name=faulty", "fed.rounds=1")
    server = run_federation(cfg, transport_factory=_Faulty)
    assert all(torch.isfinite(t).all() for t in server.weights.values() if t.is_floating_point())
    row = _metrics(cfg)[0]
    assert row["aggregated"] == [0, 3]
    assert set(row["rejected"]) == {"1", "2"}
    assert "non-finite" in row["rejected"]["1"]


def test_client_exception_becomes_a_rejected_reply(tmp_path, synth_dir, monkeypatch):
    import fedpose.engine.local as local

    real = local.local_train

    def flaky(model, dataset, request, *args, **kwargs):
        if request.client_id == 0:
            raise RuntimeError("disk full")
        return real(model, dataset, request, *args, **kwargs)

    monkeypatch.setattr(local, "local_train", flaky)
    cfg = tiny_config(tmp_path, synth_dir, "name=crash", "fed.rounds=1")
    run_federation(cfg)
    row = _metrics(cfg)[0]
    assert "disk full" in row["rejected"]["0"]
    assert row["aggregated"] == [1, 2, 3]


def test_metrics_lines_have_the_documented_fields(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "name=fields", "fed.method=fedgh")
    run_federation(cfg)
    rows = _metrics(cfg)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            "round",
            "method",
            "selected",
            "train_loss",
            "conflict_share",
            "weights",
            "agg_seconds",
            "sim_time",
            "pck_mean",
            "pck_per_joint",
            "heatmap_acc",
            "update_norms",
        ):
            assert key in r, key
        assert 0 <= r["heatmap_acc"] <= 100
        assert r["selected"] == [0, 1, 2, 3]
        assert len(r["weights"]) == 4
        assert abs(sum(r["weights"]) - 1) < 1e-6
    assert rows[1]["sim_time"] > rows[0]["sim_time"] > 0
    assert (cfg.run_dir / "checkpoints" / "last.safetensors").exists()


def test_async_records_staleness_and_weights_it(tmp_path, synth_dir):
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "name=async",
        "fed.mode=async",
        "fed.method=fedavg",
        "fed.concurrency=4",
        "fed.buffer_size=2",
        "fed.rounds=4",
        "fed.staleness_exponent=1.0",
        "system.speeds=[400, 100, 50, 25]",
    )
    run_federation(cfg)
    rows = _metrics(cfg)
    assert len(rows) == 4
    assert all(len(r["staleness"]) == 2 for r in rows)
    assert any(s > 0 for r in rows for s in r["staleness"])
    # the fastest client (0) comes back first: the first buffer holds it
    assert 0 in rows[0]["aggregated"]
    clients = json.loads((cfg.run_dir / "clients.json").read_text())
    sizes = {c["client"]: c["samples"] for c in clients}
    for r in rows:
        # FedAvg over the buffer: weights proportional to n_k (1 + s)^-1
        raw = [sizes[k] / (1 + s) for k, s in zip(r["aggregated"], r["staleness"], strict=True)]
        assert r["weights"] == pytest.approx([x / sum(raw) for x in raw], rel=1e-9)


def test_dropout_is_seeded_and_survived(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, "name=drop", "system.dropout=0.5", "fed.rounds=3")
    run_federation(cfg)
    rows = _metrics(cfg)
    dropped = [r["dropped"] for r in rows]
    assert any(dropped)
    for r in rows:
        assert set(r["aggregated"]) == set(r["selected"]) - set(r["dropped"])
    cfg2 = tiny_config(tmp_path, synth_dir, "name=drop2", "system.dropout=0.5", "fed.rounds=3")
    run_federation(cfg2)
    assert [r["dropped"] for r in _metrics(cfg2)] == dropped


class _Recording(LocalTransport):
    """Keeps a private copy of every reply as it arrives."""

    seen: list[TrainReply] = []

    def receive(self, client_id: int) -> TrainReply:
        reply = super().receive(client_id)
        _Recording.seen.append(
            TrainReply(
                client_id=reply.client_id,
                version=reply.version,
                num_samples=reply.num_samples,
                delta=reply.delta.clone(),
                averaged={n: t.clone() for n, t in reply.averaged.items()},
            )
        )
        return reply


def test_server_averages_each_clients_own_batchnorm_statistics(tmp_path, synth_dir):
    _Recording.seen = []
    cfg = tiny_config(
        tmp_path, synth_dir, "name=bn", "fed.method=fedavg", "fed.rounds=1", "data.max_test=1"
    )
    server = run_federation(cfg, transport_factory=_Recording)
    replies = _Recording.seen
    assert len(replies) == 4
    total = sum(r.num_samples for r in replies)
    name = "bn1.running_mean"
    expected = sum(r.num_samples / total * r.averaged[name].double() for r in replies)
    assert torch.allclose(server.weights[name].double(), expected, atol=1e-6)
    # the clients really differ, so averaging one client's statistics four times would fail
    assert not torch.allclose(replies[0].averaged[name], replies[1].averaged[name])


def test_every_site_is_scored_on_its_own_test_records_and_fedbn_with_its_own_bn(
    tmp_path, synth_dir
):
    from fedpose.metrics.pck import score_counts

    cfg = tiny_config(tmp_path, synth_dir, "name=bn", "fed.method=fedbn", "fed.rounds=1")
    server = run_federation(cfg)
    row = _metrics(cfg)[-1]
    assert set(row["site_pck"]) == {"0", "1", "2", "3"}  # one view each
    assert set(row["site_pck_local_bn"]) == set(row["site_pck"])
    # the sites' counts add up to the whole test split's
    from fedpose.engine.evaluate import evaluate_counts
    from fedpose.engine.federation import build_federation

    fed = build_federation(cfg)
    fed.model.load_state_dict(server.weights)
    total = [0, 0]
    for idx in fed.test_parts:
        correct, counted = evaluate_counts(
            fed.model,
            [fed.test_records[i] for i in idx],
            fed.skeleton,
            fed.device,
            input_size=cfg.data.input_size,
            flip_test=cfg.train.flip_test,
        )
        total = [total[0] + correct, total[1] + counted]
    assert score_counts(*total, fed.skeleton).mean == pytest.approx(row["pck_mean"])
    # with its own BatchNorm a site scores differently from the global model's averaged one
    assert row["site_pck_local_bn"] != row["site_pck"]


def test_validation_split_is_carved_from_the_clients_and_replaces_the_test_split(
    tmp_path, synth_dir
):
    from fedpose.engine.federation import build_federation

    plain = build_federation(tiny_config(tmp_path, synth_dir))
    cfg = tiny_config(tmp_path, synth_dir, "name=val", "data.val_fraction=0.25")
    fed = build_federation(cfg)
    train_ids = {id(fed.train_records[i]) for p in fed.parts for i in p}
    val_ids = {id(r) for r in fed.test_records}
    # held out of the training records, never trained on, never the test split
    assert val_ids and not val_ids & train_ids
    assert {r.image for r in fed.test_records}.isdisjoint({r.image for r in plain.test_records})
    for before, after, held in zip(plain.parts, fed.parts, fed.test_parts, strict=True):
        assert len(after) + len(held) == len(before) and held  # every client gives some
    # each site is scored on its own held-out records
    views = [{fed.test_records[i].attributes["view"] for i in p} for p in fed.test_parts]
    assert all(len(v) == 1 for v in views) and len(set.union(*views)) == 4
    # the same records for every method: tuning runs are paired
    other = build_federation(
        tiny_config(tmp_path, synth_dir, "data.val_fraction=0.25", "fed.method=fedavg")
    )
    assert [r.image for r in other.test_records] == [r.image for r in fed.test_records]
