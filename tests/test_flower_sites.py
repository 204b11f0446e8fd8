"""Sites on the Flower engine, in one process: per-site data from node config, `data split`
folders, federated evaluation, packed transport, refused and failing sites. The ServerApp's
logic and the real ClientApp run against a Grid that hands every message, deflated and inflated
as Flower sends it, straight to the ClientApp of its node."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtiny import tiny_config
from flwr.app import Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fedpose.cli import main
from fedpose.data.site import evaluation_partition, load_site, site_folder_names, split_into_sites
from fedpose.engine import flower_client
from fedpose.engine.federation import build_federation
from fedpose.engine.flower_messages import (
    DEFAULT_RUN_CONFIG,
    AppSettings,
    SiteEvaluation,
    content_to_evaluation,
    count_correct,
    evaluation_to_content,
    federated_metrics,
    pack_state,
    record_to_state,
)
from fedpose.engine.flower_server import run_flower_server
from fedpose.engine.runner import run_federation


def _over_the_wire(content: RecordDict) -> RecordDict:
    objects = get_all_nested_objects(content)
    return inflate_object_from_contents(
        content.object_id, {oid: obj.deflate() for oid, obj in objects.items()}
    )


class LoopbackGrid:
    """A Grid whose SuperNodes are ClientApp calls in this process, one Context per node."""

    def __init__(self, node_configs: list[dict], run_config: dict):
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nc in enumerate(node_configs)
        }
        self.replies: dict[str, Message] = {}
        self.objects_sent = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.objects_sent += len(get_all_nested_objects(msg.content))
            received = Message(
                _over_the_wire(msg.content),
                dst_node_id=msg.metadata.dst_node_id,
                message_type=msg.metadata.message_type,
            )
            received.metadata.__dict__["_message_id"] = msg.metadata.message_id
            # the Deployment Engine starts a fresh ClientApp process for every message
            flower_client._client_sides.clear()
            flower_client._federations.clear()
            reply = flower_client.client_app(received, self.contexts[msg.metadata.dst_node_id])
            if not reply.has_error():
                reply = Message(_over_the_wire(reply.content), reply_to=received)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture
def task_identity(monkeypatch):
    # Messages are made inside a ServerApp or ClientApp, where Flower has set the task's identity
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    flower_client._client_sides.clear()
    flower_client._federations.clear()
    yield
    flower_client._client_sides.clear()
    flower_client._federations.clear()


@pytest.fixture
def synth(tmp_path, synth_dir) -> Path:
    """This test's own copy of the session's synth-arm set, the one _tiny configures (copied in
    milliseconds; rendering it takes a second)."""
    return Path(shutil.copytree(synth_dir, tmp_path / "synth"))


def _tiny(tmp_path: Path, synth: Path, *overrides: str):
    return tiny_config(
        tmp_path,
        synth,
        "fed.num_clients=3",
        "fed.partition=dirichlet",
        "fed.dirichlet_alpha=1.0",
        *overrides,
    )


def _site_configs(sites: Path, n: int) -> list[dict]:
    return [
        {
            "data-root": str(sites / name),
            "dataset": "coco",
            "ann": "train.json",
            "test-ann": "test.json",
        }
        for name in site_folder_names(n)
    ]


def _run_sites(cfg, node_configs: list[dict], **settings):
    run_config = DEFAULT_RUN_CONFIG | {"fedpose-config": json.dumps(cfg.to_dict())}
    grid = LoopbackGrid(node_configs, run_config)
    logs: list[str] = []
    server = run_flower_server(
        grid, AppSettings(cfg, connect_timeout=5.0, reply_timeout=60.0, **settings), logs.append
    )
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return server, rows, logs, grid


# ----------------------------------------------------------------------------- transport
def test_packed_state_is_exact_and_two_arrays():
    state = {
        "w": torch.randn(3, 4),
        "b.num_batches_tracked": torch.tensor(2**40),
        "h": torch.randn(5, dtype=torch.float64),
        "f16": torch.randn(7).half(),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "t": torch.randn(4, 6).t(),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }
    record = pack_state(state)
    assert len(record) == 2
    back = record_to_state(_over_the_wire(RecordDict({"w": record}))["w"])
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(
            back[name].view(-1).view(torch.uint8) if t.numel() else back[name],
            t.contiguous().view(-1).view(torch.uint8) if t.numel() else t,
        ), name
    back["w"].add_(1)  # writable


# ----------------------------------------------------------------------------- data split
def test_split_sites_hold_exactly_the_partition(tmp_path, synth):
    cfg = _tiny(tmp_path, synth)
    fed = build_federation(cfg)
    sites = split_into_sites(cfg, tmp_path / "sites")
    tests = evaluation_partition(fed.test_records, cfg)
    assert sum(s.test for s in sites) == len(fed.test_records)
    for k, (site, nc) in enumerate(zip(sites, _site_configs(tmp_path / "sites", 3), strict=True)):
        data = load_site(nc, cfg.data, fed.skeleton)
        assert len(data.train) == len(fed.parts[k]) == site.train
        assert len(data.test) == len(tests[k]) == site.test
        store = RecordDict()
        flower_client._site_side(cfg, nc, store)
        # what a later message of the run trains on: the records kept in context.state
        ours = flower_client._site_side(cfg, nc, _over_the_wire(store)).dataset
        theirs = fed.client_dataset(k)
        for i in range(len(ours)):
            a, b = ours[i], theirs[i]
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (k, i, key)
        for r in data.train + data.test:
            assert Path(r.image).is_relative_to(site.folder)


def test_data_split_command_and_inspect(tmp_path, capsys):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        f'[data]\ndataset = "synth-arm"\nroot = "{tmp_path / "synth"}"\n'
        "synth_n = 32\nsynth_size = 64\ngenerate = true\n[fed]\nnum_clients = 2\n"
        'partition = "iid"\n'
    )
    assert main(["data", "split", str(cfg_file), str(tmp_path / "out")]) == 0
    assert (
        main(
            [
                "data",
                "inspect",
                "--dataset",
                "coco",
                "--root",
                str(tmp_path / "out/site0"),
                "--ann",
                str(tmp_path / "out/site0/train.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 site folders" in out and "labelled joints" in out
    for site in ("site0", "site1"):
        assert {p.name for p in (tmp_path / "out" / site).iterdir()} == {
            "images",
            "train.json",
            "test.json",
        }
    images = sorted(p.name for p in (tmp_path / "out").glob("site*/images/**/*.*"))
    assert len(images) == 32 and len(set(images)) == 32  # every image at exactly one site


# ----------------------------------------------------------------------------- the engine
# two federations of two rounds, seconds: make test-slow (the fast suite runs the sites in
# test_central_evaluation_only_when_asked)
@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_sites_train_like_the_in_process_engine_and_evaluate_federated(
    tmp_path, monkeypatch, synth
):
    loads = []
    real_load_site = flower_client.load_site

    def counting_load_site(node_config, *args):
        loads.append(node_config["data-root"])
        return real_load_site(node_config, *args)

    monkeypatch.setattr(flower_client, "load_site", counting_load_site)
    cfg = _tiny(tmp_path, synth, "fed.rounds=2", "fed.method=fedavg")
    split_into_sites(cfg, tmp_path / "sites")
    local = run_federation(cfg)
    local_rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]

    # the server's data root does not exist: it loads no data
    flower_cfg = _tiny(
        tmp_path,
        synth,
        "fed.rounds=2",
        "fed.method=fedavg",
        "name=flower",
        f"data.root={tmp_path / 'nowhere'}",
    )
    server, rows, _, grid = _run_sites(flower_cfg, _site_configs(tmp_path / "sites", 3))
    assert not (tmp_path / "nowhere").exists()
    for name, t in local.weights.items():
        assert torch.equal(server.weights[name], t), name
    for ours, theirs in zip(rows, local_rows, strict=True):
        # federated PCK over the sites' test sets = central PCK over their union, exactly
        assert ours["pck_mean"] == theirs["pck_mean"]
        assert ours["pck_per_joint"] == theirs["pck_per_joint"]
        assert ours["train_loss"] == theirs["train_loss"]
        assert set(ours["site_pck"]) == {"0", "1", "2"}
        assert "central_pck_mean" not in ours  # central evaluation only when asked
    # 3 sites x (query + 2 x (train + evaluate)) messages, each "in a fresh process", yet every
    # site parsed its annotation files once: later messages took them from context.state
    assert sorted(loads) == sorted(str(tmp_path / "sites" / n) for n in site_folder_names(3))
    clients = json.loads((flower_cfg.run_dir / "clients.json").read_text())
    fed = build_federation(cfg)
    assert [c["samples"] for c in clients] == fed.client_sizes
    # two arrays per state dict: a request is the RecordDict, its two records, few objects
    assert grid.objects_sent / (2 * 3 * 3) < 12
    # the report shows each site's PCK
    from fedpose.report.experiment import load_arms, write_report

    arms = load_arms([flower_cfg.run_dir])
    (label,) = arms
    report = write_report(arms, tmp_path / "report", "t", figures=False).read_text()
    assert "Per-site PCK" in report
    site_table = report.split("Per-site PCK")[1]
    site_row = next(line for line in site_table.splitlines() if line.startswith(f"| {label} | "))
    last = [rows[-1]["site_pck"][k] for k in ("0", "1", "2")]
    assert (
        site_row
        == f"| {label} | "
        + " | ".join(f"{v:.2f}" for v in [*last, min(last), max(last) - min(last)])
        + " |"
    )
    # the in-process engine scores the same sites from its central predictions
    assert [r["site_pck"] for r in local_rows] == [r["site_pck"] for r in rows]


@pytest.mark.slow  # seconds of work: make test-slow
@pytest.mark.usefixtures("task_identity")
def test_scaffold_sites_keep_their_control_variates_like_the_in_process_engine(tmp_path, synth):
    # c travels with each request, c_k⁺ − c_k with each reply, c_k stays in the node's state
    sets = ("fed.rounds=3", "fed.method=scaffold", "fed.clients_per_round=2")
    cfg = _tiny(tmp_path, synth, *sets)
    split_into_sites(cfg, tmp_path / "sites")
    local = run_federation(cfg)
    flower_cfg = _tiny(tmp_path, synth, *sets, "name=flower")
    server, _, _, _ = _run_sites(flower_cfg, _site_configs(tmp_path / "sites", 3))
    assert server.state.strategy["c"].abs().sum() > 0
    torch.testing.assert_close(
        server.state.strategy["c"], local.state.strategy["c"], rtol=0, atol=0
    )
    for name, t in local.weights.items():
        assert torch.equal(server.weights[name], t), name


def test_federated_counts_add_up_to_central_evaluation(tmp_path, synth):
    cfg = _tiny(tmp_path, synth)
    fed = build_federation(cfg)
    torch.manual_seed(3)
    weights = {
        n: t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t
        for n, t in fed.initial_weights().items()
    }
    evaluations = []
    for k, part in enumerate(evaluation_partition(fed.test_records, cfg)):
        records = [fed.test_records[i] for i in part]
        correct, counted = count_correct(fed.model, weights, records, fed.skeleton, cfg, fed.device)
        content = _over_the_wire(
            evaluation_to_content(SiteEvaluation(k, len(records), correct, counted))
        )
        evaluations.append(content_to_evaluation(content))
    central = fed.evaluate(weights)
    federated = federated_metrics(evaluations, fed.skeleton)
    assert federated["pck_mean"] == central["pck_mean"]
    assert federated["pck_per_joint"] == central["pck_per_joint"]
    assert len(federated["site_pck"]) == 3
    # a site that failed is left out and named
    evaluations[1] = SiteEvaluation(1, 0, np.zeros(0), np.zeros(0), "site1: boom")
    assert federated_metrics(evaluations, fed.skeleton)["site_eval_errors"] == {"1": "site1: boom"}


@pytest.mark.usefixtures("task_identity")
def test_unreadable_and_empty_sites_are_refused_not_fatal(tmp_path, synth):
    cfg = _tiny(tmp_path, synth, "fed.rounds=1", "fed.method=fedavg")
    split_into_sites(cfg, tmp_path / "sites")
    configs = _site_configs(tmp_path / "sites", 3)
    (tmp_path / "sites/site1/train.json").write_text("{not json")
    empty = json.loads((tmp_path / "sites/site2/train.json").read_text())
    empty["annotations"] = []
    (tmp_path / "sites/site2/train.json").write_text(json.dumps(empty))
    _, rows, logs, _ = _run_sites(cfg, configs)
    text = "\n".join(logs)
    assert "site1" in text and "train.json" in text  # the broken file is named
    assert "site2" in text and "no usable training record" in text
    assert rows[0]["aggregated"] == [0]
    assert "train.json" in rows[0]["rejected"]["1"]
    assert "no usable training record" in rows[0]["rejected"]["2"]


@pytest.mark.usefixtures("task_identity")
def test_site_whose_test_file_vanishes_reports_an_error(tmp_path, synth):
    cfg = _tiny(tmp_path, synth, "fed.rounds=1", "fed.method=fedavg")
    split_into_sites(cfg, tmp_path / "sites")
    configs = _site_configs(tmp_path / "sites", 3)
    shutil.rmtree(tmp_path / "sites/site0/images")  # readable annotations, missing images
    _, rows, logs, _ = _run_sites(cfg, configs)
    assert "site0" in "\n".join(logs)
    assert rows[-1]["aggregated"] == [1, 2]


# ----------------------------------------------------------------------------- real processes
# Loaded into every Python process of a SuperNode (SuperNode, SuperExec, each flwr-clientapp)
# through PYTHONPATH: an audit hook writes every path the process opens to <dir>/<pid>.log.
# Python's "open" audit event covers open(), io.open and os.open, so PIL, json and numpy reads
# are all seen; reads from C extensions that bypass Python's file API would not be.
OPEN_LOGGER = """
import os, sys
_dir = os.environ.get("FEDPOSE_OPEN_LOG")
if _dir:
    _fd = os.open(os.path.join(_dir, f"{os.getpid()}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    def _log_open(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            os.write(_fd, os.fsencode(os.path.abspath(os.fsdecode(args[0]))) + b"\\n")
    sys.addaudithook(_log_open)
"""


def _opened(log_dir: Path) -> set[str]:
    return {line for f in log_dir.glob("*.log") for line in f.read_text().splitlines()}


def _processes_that_opened(log_dir: Path, path: Path) -> int:
    return sum(str(path) in f.read_text().splitlines() for f in log_dir.glob("*.log"))


@pytest.mark.slow
def test_three_sites_on_real_flower_processes(tmp_path, synth):
    """SLOW (about 40-90 s): a SuperLink and three SuperNodes, each pointed at its own `data
    split` folder; the ServerApp's data root does not exist. The final model equals the
    in-process engine's on the same partition bit for bit, and no process of a site opens a
    file in another site's folder (the ServerApp opens none at all)."""
    from rich.console import Console
    from test_flower import _running_with_home

    from fedpose.tools.flower_demo import run_flower

    cfg = _tiny(tmp_path, synth, "fed.rounds=2")
    sites = [s.folder for s in split_into_sites(cfg, tmp_path / "sites")]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_LOGGER)
    logs = [tmp_path / f"opened-{name}" for name in ("site0", "site1", "site2", "superlink")]
    envs = []
    for d in logs:
        d.mkdir()
        envs.append(
            {
                "FEDPOSE_OPEN_LOG": str(d),
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(hook), os.environ.get("PYTHONPATH", "")])
                ),
            }
        )
    node_configs = [
        f'data-root="{folder}" dataset="coco" ann="train.json" test-ann="test.json"'
        for folder in sites
    ]
    server_cfg = _tiny(
        tmp_path, "fed.rounds=2", "name=sites-flower", f"data.root={tmp_path / 'no-such-folder'}"
    )
    work = tmp_path / "flower"
    try:
        result = run_flower(
            server_cfg,
            3,
            Console(width=100),
            work,
            timeout=300,
            node_configs=node_configs,
            envs=envs,
        )
    finally:
        assert _running_with_home(work / "flwr-home") == [], "Flower processes left running"
    assert result.status["status"] == "finished:completed"

    local = run_federation(cfg)
    for name, t in local.weights.items():
        assert torch.equal(result.weights[name], t), name
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["pck_mean"] for r in rows] == [r["pck_mean"] for r in local_rows]
    assert all(set(r["site_pck"]) == {"0", "1", "2"} for r in rows)

    opened = [_opened(d) for d in logs]
    for k, folder in enumerate(sites):
        # the hook saw this site's own files, so an empty log cannot pass for innocence
        assert str(folder / "train.json") in opened[k]
        assert any(p.startswith(str(folder / "images")) for p in opened[k])
        # 5 messages, each in its own ClientApp process, but one parse of the annotations:
        # the others took the records from context.state
        assert _processes_that_opened(logs[k], folder / "train.json") == 1
        for j, other in enumerate(sites):
            if j != k:
                assert not [p for p in opened[k] if p.startswith(str(other) + os.sep)], (k, j)
    assert not [p for p in opened[3] if p.startswith(str(tmp_path / "sites"))]
    assert not [p for p in opened[3] if p.startswith(str(tmp_path / "synth"))]
    assert any("fedpose" in p for p in opened[3])  # the ServerApp's process was logged too


def test_site_records_cache_in_context_state(tmp_path, synth):
    cfg = _tiny(tmp_path, synth)
    split_into_sites(cfg, tmp_path / "sites")
    nc = _site_configs(tmp_path / "sites", 3)[1]
    skeleton = build_federation(cfg).skeleton
    store = RecordDict()
    first = flower_client.site_records(nc, cfg.data, skeleton, store)
    again = flower_client.site_records(nc, cfg.data, skeleton, _over_the_wire(store))
    assert len(again.train) == len(first.train) and len(again.test) == len(first.test)
    for a, b in zip(first.train + first.test, again.train + again.test, strict=True):
        assert a.image == b.image and a.record_id == b.record_id and a.scale == b.scale
        for name in ("joints", "visibility", "center", "person_box"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
            assert getattr(a, name).dtype == getattr(b, name).dtype, name
        assert b.head_box is None
    # an edited annotation file is parsed again
    ann = tmp_path / "sites/site1/test.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][:1]
    ann.write_text(json.dumps(data))
    assert len(flower_client.site_records(nc, cfg.data, skeleton, store).test) == 1


@pytest.mark.usefixtures("task_identity")
def test_central_evaluation_only_when_asked(tmp_path, synth):
    cfg = _tiny(tmp_path, synth, "fed.rounds=1", "fed.method=fedavg")
    split_into_sites(cfg, tmp_path / "sites")
    _, rows, _, _ = _run_sites(cfg, _site_configs(tmp_path / "sites", 3), central_eval=True)
    # the sites' test sets together are the config's test split: both evaluations agree
    assert rows[-1]["central_pck_mean"] == rows[-1]["pck_mean"]
    assert rows[-1]["central_pck_per_joint"] == rows[-1]["pck_per_joint"]
    # not asked (test_sites_train_like_the_in_process_engine_and_evaluate_federated): absent


def test_site_node_config_errors_name_the_problem(tmp_path, synth):
    from fedpose.config import ConfigError
    from fedpose.data.records import ARM, DatasetError

    cfg = _tiny(tmp_path, synth)
    with pytest.raises(DatasetError, match="annotations.json"):  # nothing generated at a site
        load_site({"data-root": str(tmp_path / "empty"), "dataset": "synth-arm"}, cfg.data, ARM)
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ConfigError, match="test_ann"):
        load_site({"data-root": str(tmp_path), "test_ann": "x.json"}, cfg.data, ARM)
    with pytest.raises(DatasetError, match="no-such.json"):
        load_site(
            {"data-root": str(tmp_path), "dataset": "coco", "ann": "no-such.json"}, cfg.data, ARM
        )


@pytest.mark.usefixtures("task_identity")
def test_a_run_without_any_usable_site_fails(tmp_path, synth):
    cfg = _tiny(tmp_path, synth, "fed.rounds=1")
    configs = _site_configs(tmp_path / "nowhere", 3)
    with pytest.raises(RuntimeError, match="no usable SuperNode"):
        _run_sites(cfg, configs)


def test_more_clients_than_test_records(tmp_path, synth):
    cfg = _tiny(tmp_path, synth, "fed.num_clients=20", "fed.partition=iid")
    fed = build_federation(cfg)
    parts = evaluation_partition(fed.test_records, cfg)
    assert len(parts) == 20 and len(fed.test_records) < 20
    assert sorted(i for p in parts for i in p) == list(range(len(fed.test_records)))
    assert sum(1 for p in parts if p) == len(fed.test_records)
