"""Non-IID partitioners: exact cover, determinism, skew where promised, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedpose.data
from fedpose.cli import main
from fedpose.config import FedConfig
from fedpose.data.partition import (
    by_attribute,
    client_statistics,
    dirichlet,
    iid,
    normalized_poses,
    partition,
    plot_statistics,
    print_statistics,
    quantity_skew,
    record_labels,
)
from fedpose.data.records import ARM, LSP, PoseRecord

VIEWS = ("anterior", "posterior", "left", "right")


def _arm_records(n: int = 200, seed: int = 0) -> list[PoseRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        view = VIEWS[i % 4]
        posture = "extended" if rng.random() < 0.5 else "upright"
        joints = rng.uniform(0, 128, (3, 2)).astype(np.float32)
        records.append(
            PoseRecord(
                image=f"{i:06d}.png",
                joints=joints,
                visibility=np.ones(3, np.float32),
                center=joints.mean(0),
                scale=0.5,
                record_id=str(i),
                attributes={"view": view, "posture": posture, "facing": f"f-{view}"},
            )
        )
    return records


def _assert_cover(parts: list[list[int]], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(parts), "a client is empty"
    assert all(p == sorted(p) for p in parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def _mean_max_share(parts, labels) -> float:
    shares = []
    for p in parts:
        counts = np.unique([labels[i] for i in p], return_counts=True)[1]
        shares.append(counts.max() / len(p))
    return float(np.mean(shares))


RECORDS = _arm_records()


def test_iid_cover_balance_determinism():
    parts = iid(103, 5, seed=1)
    _assert_cover(parts, 103, 5)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == iid(103, 5, seed=1)
    assert parts != iid(103, 5, seed=2)


def test_by_attribute_one_view_per_client():
    parts = by_attribute(RECORDS, "view", 4)
    _assert_cover(parts, len(RECORDS), 4)
    # sorted value order: anterior, left, posterior, right
    for part, view in zip(parts, sorted(VIEWS), strict=True):
        assert {RECORDS[i].attributes["view"] for i in part} == {view}


def test_by_attribute_views_times_subsets():
    parts = by_attribute(RECORDS, "view", 8, seed=3)
    _assert_cover(parts, len(RECORDS), 8)
    for v, view in enumerate(sorted(VIEWS)):
        pair = parts[2 * v : 2 * v + 2]
        assert all({RECORDS[i].attributes["view"] for i in p} == {view} for p in pair)
        assert abs(len(pair[0]) - len(pair[1])) <= 1  # equal subsets
    assert by_attribute(RECORDS, "view", 8, seed=3) == parts  # seeded
    assert by_attribute(RECORDS, "view", 8, seed=4) != parts


def test_by_attribute_round_robin_and_errors():
    parts = by_attribute(RECORDS, "view", 2)
    _assert_cover(parts, len(RECORDS), 2)
    assert {RECORDS[i].attributes["view"] for i in parts[0]} == {"anterior", "posterior"}
    with pytest.raises(ValueError, match="2 values .* for 3 clients"):
        by_attribute(RECORDS, "posture", 3)
    with pytest.raises(ValueError, match="no attribute 'colour'"):
        by_attribute(RECORDS, "colour", 2)


def test_dirichlet_cover_determinism_and_skew():
    labels = [r.attributes["view"] for r in RECORDS]
    parts = dirichlet(RECORDS, "view", 6, alpha=0.5, seed=3)
    _assert_cover(parts, len(RECORDS), 6)
    assert parts == dirichlet(RECORDS, "view", 6, alpha=0.5, seed=3)
    assert parts != dirichlet(RECORDS, "view", 6, alpha=0.5, seed=4)
    small = np.mean(
        [_mean_max_share(dirichlet(RECORDS, "view", 4, 0.05, s), labels) for s in range(5)]
    )
    large = np.mean(
        [_mean_max_share(dirichlet(RECORDS, "view", 4, 100.0, s), labels) for s in range(5)]
    )
    assert small > large + 0.3 and large < 0.4


def test_dirichlet_tiny_alpha_many_clients_no_empty_client():
    parts = dirichlet(RECORDS, "posture", 10, alpha=0.001, seed=0)
    _assert_cover(parts, len(RECORDS), 10)


def test_dirichlet_min_size_redraws_until_every_client_is_large_enough():
    labels = [r.attributes["view"] for r in RECORDS]
    once = [dirichlet(RECORDS, "view", 4, 0.3, s) for s in range(8)]
    redrawn = [dirichlet(RECORDS, "view", 4, 0.3, s, min_size=25) for s in range(8)]
    for parts in redrawn:
        _assert_cover(parts, len(RECORDS), 4)
        assert min(len(p) for p in parts) >= 25
    assert redrawn == [dirichlet(RECORDS, "view", 4, 0.3, s, min_size=25) for s in range(8)]
    # the draw-once rule leaves small clients the redraw rule refuses: two different partitions
    assert min(len(p) for parts in once for p in parts) < 25
    # conditioning on large clients makes the same alpha less skewed: results do not compare
    skew_once = np.mean([_mean_max_share(parts, labels) for parts in once])
    skew_redrawn = np.mean([_mean_max_share(parts, labels) for parts in redrawn])
    assert skew_redrawn < skew_once


def test_dirichlet_min_size_errors_name_the_setting():
    with pytest.raises(ValueError, match="dirichlet_min_size 60: 4 clients .* need 240"):
        dirichlet(RECORDS, "view", 4, 0.3, 0, min_size=60)
    # enough records, but at a tiny alpha each of the two postures goes whole to one client,
    # so one of three clients stays (nearly) empty in every draw
    with pytest.raises(ValueError, match=r"no Dirichlet\(0.001\) draw in 100 .* 3 clients 40"):
        dirichlet(RECORDS, "posture", 3, 0.001, 0, min_size=40)


def test_dirichlet_rule_is_in_the_config_and_the_partition_report(tmp_path, monkeypatch):
    from fedpose.config import ConfigError, load_config
    from fedpose.data.partition import write_partition_report

    with pytest.raises(ConfigError, match="fed.dirichlet_min_size"):
        load_config(None, ["fed.dirichlet_min_size=-1"])
    monkeypatch.setattr(fedpose.data, "load_split", lambda cfg, split: (RECORDS, ARM))
    for min_size, rule in ((0, "drawn once"), (10, "redrawn until every client has >= 10")):
        cfg = load_config(
            None,
            [
                f"out_dir={tmp_path}",
                f"name=p{min_size}",
                "fed.partition=dirichlet",
                f"fed.dirichlet_min_size={min_size}",
            ],
        )
        report = write_partition_report(cfg)
        assert json.loads(report.json_path.read_text())["dirichlet_rule"].startswith(rule)


def test_dirichlet_over_pose_clusters():
    parts = dirichlet(RECORDS, "pose", 4, alpha=0.3, seed=0)
    _assert_cover(parts, len(RECORDS), 4)
    labels = record_labels(RECORDS, "pose", num_clusters=4, seed=0)
    assert set(labels) <= {"pose0", "pose1", "pose2", "pose3"} and len(set(labels)) > 1
    assert labels == record_labels(RECORDS, "pose", num_clusters=4, seed=0)


def test_normalized_poses_scale_free_and_fills_unlabelled():
    a = _arm_records(2)
    b = PoseRecord(
        image="x",
        joints=a[0].joints * 3 + 7,
        visibility=np.ones(3, np.float32),
        center=np.zeros(2, np.float32),
        scale=1.0,
    )
    hidden = PoseRecord(
        image="y",
        joints=a[1].joints.copy(),
        visibility=np.array([1, 1, 0], np.float32),
        center=np.zeros(2, np.float32),
        scale=1.0,
    )
    x = normalized_poses([a[0], b, hidden])
    np.testing.assert_allclose(x[0], x[1], atol=1e-5)
    assert np.isfinite(x).all()
    # the unlabelled wrist takes the wrist's mean over the records where it is labelled
    np.testing.assert_allclose(x[2, 4:6], x[:2, 4:6].mean(0), atol=1e-6)


def test_facing_derived_from_shoulders():
    def person(r_x: float, l_x: float) -> PoseRecord:
        joints = np.zeros((14, 2), np.float32)
        joints[8] = (r_x, 50)  # r_shoulder
        joints[9] = (l_x, 50)  # l_shoulder
        joints[2] = (r_x, 150)  # r_hip
        joints[3] = (l_x, 150)  # l_hip
        vis = np.zeros(14, np.float32)
        vis[[2, 3, 8, 9]] = 1
        return PoseRecord(
            image="p", joints=joints, visibility=vis, center=np.zeros(2, np.float32), scale=1.0
        )

    people = [person(40, 100), person(100, 40), person(70, 75)]
    assert record_labels(people, "facing", skeleton=LSP) == ["toward", "away", "profile"]
    assert record_labels(people, "facing") == ["toward", "away", "profile"]  # guessed skeleton
    # synth-arm records carry the attribute
    assert record_labels(RECORDS[:2], "facing", skeleton=ARM) == ["f-anterior", "f-posterior"]
    with pytest.raises(ValueError, match="l_shoulder"):
        no_view = [
            PoseRecord(
                image="a",
                joints=np.zeros((3, 2), np.float32),
                visibility=np.ones(3, np.float32),
                center=np.zeros(2),
                scale=1.0,
            )
        ]
        record_labels(no_view, "facing", skeleton=ARM)


def test_quantity_skew_sizes_vary():
    parts = quantity_skew(500, 8, alpha=0.3, seed=0)
    _assert_cover(parts, 500, 8)
    sizes = sorted(map(len, parts))
    assert sizes[-1] > 3 * sizes[0]
    assert parts == quantity_skew(500, 8, alpha=0.3, seed=0)
    tiny = quantity_skew(10, 10, alpha=0.01, seed=0)
    assert [len(p) for p in tiny] == [1] * 10


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: iid(3, 4, 0), "only 3 records"),
        (lambda: iid(3, 0, 0), "at least 1"),
        (lambda: quantity_skew(10, 2, 0.0, 0), "alpha must be > 0"),
        (lambda: dirichlet(RECORDS, "view", 4, -1.0, 0), "alpha must be > 0"),
        (lambda: partition(RECORDS, FedConfig(partition="zipf"), 0), "unknown fed.partition"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("method", ["iid", "attribute", "dirichlet", "quantity"])
def test_partition_dispatch(method):
    cfg = FedConfig(partition=method, num_clients=4, partition_attr="view")
    parts = partition(RECORDS, cfg, seed=0)
    _assert_cover(parts, len(RECORDS), 4)
    assert parts == partition(RECORDS, cfg, seed=0)


def test_statistics_table_and_plot(tmp_path, capsys):
    parts = by_attribute(RECORDS, "view", 4)
    stats = client_statistics(RECORDS, parts, labels={"pose": ["p"] * len(RECORDS)})
    assert [s["size"] for s in stats] == [50] * 4
    assert stats[0]["view"] == {"anterior": 50}
    assert list(stats[0]) == ["client", "size", "pose", "view", "posture"]
    assert sum(stats[1]["posture"].values()) == 50
    print_statistics(stats)
    assert "anterior:50" in capsys.readouterr().out
    out = plot_statistics(stats, tmp_path / "stats.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_partition_main_writes_files(tmp_path, monkeypatch, capsys):
    def fake_load_split(_cfg_data, split):
        assert split == "train"
        return RECORDS, ARM

    monkeypatch.setattr(fedpose.data, "load_split", fake_load_split, raising=False)
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[fed]\nnum_clients = 3\npartition = "dirichlet"\n')
    rc = main(
        [
            "data",
            "partition",
            str(cfg),
            "-c",
            f"out_dir={tmp_path / 'runs'}",
            "-c",
            "fed.dirichlet_alpha=0.2",
        ]
    )
    assert rc == 0
    run_dir = tmp_path / "runs" / "exp-partition"  # its own folder beside the runs of exp
    data = json.loads((run_dir / "partition.json").read_text())
    assert data["partition"] == "dirichlet" and data["alpha"] == 0.2
    assert len(data["clients"]) == 3
    _assert_cover([c["indices"] for c in data["clients"]], len(RECORDS), 3)
    assert (run_dir / "partition.png").exists()
    assert "partition.json" in capsys.readouterr().out

    rc = main(
        [
            "data",
            "partition",
            str(cfg),
            "-c",
            f"out_dir={tmp_path / 'runs'}",
            "-c",
            "fed.partition=attribute",
            "-c",
            "fed.num_clients=5",
        ]
    )
    assert rc == 2
    assert "5 clients" in capsys.readouterr().err
