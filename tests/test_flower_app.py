"""fedpose as a Flower App: the bundle `flwr run .` uploads, the run config's flat keys and quick
start, the number of clients following Flower's partitions, and the results that come back to
the submitter through the run's log stream (`fedpose flower-pull`)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from test_flower_sites import LoopbackGrid, task_identity  # noqa: F401 (a fixture)

from fedpose.cli import main
from fedpose.config import Config, ConfigError
from fedpose.engine.flower_messages import (
    DEFAULT_RUN_CONFIG,
    FLAT_KEYS,
    QUICKSTART_CONFIG,
    QUICKSTART_FLAT,
    run_config_toml,
    settings_from_run_config,
)
from fedpose.engine.flower_results import file_lines, parse_results, record_line, status_line
from fedpose.engine.flower_server import run_flower_server
from fedpose.engine.run import check_config
from fedpose.model.io import MODEL_FILE
from fedpose.tools import flower_pull

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
APP_CONFIG = PYPROJECT["tool"]["flwr"]["app"]["config"]


# ----------------------------------------------------------------------------- the bundle
@pytest.mark.slow  # seconds of work: make test-slow
def test_the_app_bundle_holds_only_what_the_apps_need():
    """`flwr run .` builds the bundle with this function (flwr/cli/run/run.py): the apps' code is
    the installed fedpose package, so the bundle needs the app's pyproject.toml and nothing of
    the source tree, results/ or tests/."""
    # imported here: a slow test, and the import costs every fast-suite worker most of a second
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert names == {"pyproject.toml", "README.md", "LICENSE", ".info/CONTENT"}
    assert len(fab) < 2**20, len(fab)
    bundled = tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode())
    assert bundled["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedpose.engine.flower_server:server_app",
        "clientapp": "fedpose.engine.flower_client:client_app",
    }
    assert bundled["project"]["license"] == "MIT" and (REPO / "LICENSE").is_file()


def test_pyproject_declares_the_run_config_the_code_knows():
    declared = dict(APP_CONFIG)
    assert json.loads(declared.pop("fedpose-config")) == QUICKSTART_CONFIG
    assert declared == {k: v for k, v in DEFAULT_RUN_CONFIG.items() if k != "fedpose-config"}
    # each flat key's declared value is the quick start's own setting (so it changes nothing)
    quick = settings_from_run_config(APP_CONFIG, {"partition-id": 0, "num-partitions": 2}).config
    for key, setting in FLAT_KEYS.items():
        if key == "num-clients":
            assert QUICKSTART_FLAT[key] == 0 and quick.fed.num_clients == 2
            continue
        value = quick
        for part in setting.split("."):
            value = getattr(value, part)
        expected = QUICKSTART_FLAT[key]
        assert (",".join(value) if key == "track" else value) == expected, key


# ----------------------------------------------------------------------------- run config
def test_flat_keys_override_the_full_config_when_set():
    quick = settings_from_run_config(APP_CONFIG).config
    assert (quick.fed.rounds, quick.model.width, quick.track) == (3, 8, ["csv"])

    # Flower users' habit: --run-config "num-server-rounds=5 lr=0.01"
    s = settings_from_run_config(
        APP_CONFIG
        | {"num-server-rounds": 5, "lr": 0.01, "method": "fedavg", "track": "csv,tensorboard"}
    )
    assert (s.config.fed.rounds, s.config.train.lr, s.config.fed.method) == (5, 0.01, "fedavg")
    assert s.config.track == ["csv", "tensorboard"] and s.config.model.width == 8

    # a full config of one's own: flat keys left at their declared values change nothing
    mine = Config()
    mine.fed.rounds, mine.train.lr = 50, 0.05
    own = APP_CONFIG | {"fedpose-config": json.dumps(mine.to_dict())}
    s = settings_from_run_config(own)
    assert (s.config.fed.rounds, s.config.train.lr, s.overridden) == (50, 0.05, [])
    s = settings_from_run_config(own | {"num-server-rounds": 7})
    assert s.config.fed.rounds == 7 and s.overridden == ["fed.rounds=7 (fedpose-config: 50)"]
    # fedpose-overrides come last
    s = settings_from_run_config(
        own | {"num-server-rounds": 7, "fedpose-overrides": "fed.rounds=9"}
    )
    assert s.config.fed.rounds == 9

    with pytest.raises(ConfigError, match="fed.method"):
        check_config(settings_from_run_config(APP_CONFIG | {"method": "nope"}).config)
    with pytest.raises(ConfigError, match="track"):
        settings_from_run_config(APP_CONFIG | {"track": "mlflow"})


def test_num_clients_follows_the_partitions():
    on_node = settings_from_run_config(APP_CONFIG, {"partition-id": 1, "num-partitions": 5})
    assert on_node.follow_partitions and on_node.config.fed.num_clients == 5
    fixed = settings_from_run_config(APP_CONFIG | {"num-clients": 3}, {"num-partitions": 5})
    assert not fixed.follow_partitions and fixed.config.fed.num_clients == 3
    # a site has no partitions: the config's number stands
    site = settings_from_run_config(APP_CONFIG, {"data-root": "/x"})
    assert site.config.fed.num_clients == Config().fed.num_clients


def test_flower_config_files_carry_the_flat_keys_of_their_config():
    cfg = Config()
    cfg.fed.rounds, cfg.fed.num_clients, cfg.track = 7, 6, ["tensorboard"]
    run_config = tomllib.loads(run_config_toml(cfg))
    assert (run_config["num-server-rounds"], run_config["num-clients"]) == (7, 6)
    assert run_config["track"] == "tensorboard"
    assert settings_from_run_config(run_config).config == cfg


# ----------------------------------------------------------------------------- results
class _Kept(dict):
    """A cache that outlives messages, as in Flower's Simulation Engine (its ClientApps live on
    in Ray actors); LoopbackGrid clears the caches per message like the Deployment Engine."""

    def clear(self) -> None:
        pass


@pytest.mark.usefixtures("task_identity")
def test_the_log_stream_carries_the_records_and_the_model(tmp_path, synth_dir, capsys, monkeypatch):
    """A ServerApp with num-clients = 0 on two partition SuperNodes (a config saying 4): two
    clients; what it prints for the submitter parses back into its run folder's files."""
    from fedtiny import tiny_config

    from fedpose.engine import flower_client

    monkeypatch.setattr(flower_client, "_client_sides", _Kept())
    monkeypatch.setattr(flower_client, "_federations", _Kept())

    cfg = tiny_config(tmp_path, synth_dir, "fed.rounds=1", "fed.local_steps=1", "fed.num_clients=4")
    run_config = DEFAULT_RUN_CONFIG | {"fedpose-config": json.dumps(cfg.to_dict())}
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    settings = settings_from_run_config(run_config)
    assert settings.follow_partitions
    settings.connect_timeout, settings.reply_timeout = 5.0, 60.0
    capsys.readouterr()
    run_flower_server(LoopbackGrid(nodes, run_config), settings, lambda _: None)
    printed = capsys.readouterr().out
    run_dir = cfg.run_dir
    assert json.loads((run_dir / "config.json").read_text())["fed"]["num_clients"] == 2

    pulled = parse_results(printed)
    assert pulled.problems == []
    assert (
        "".join(json.dumps(r) + "\n" for r in pulled.records)
        == (run_dir / "metrics.jsonl").read_text()
    )
    assert [r["aggregated"] for r in pulled.records] == [[0, 1]]
    for name in ("config.json", "clients.json", MODEL_FILE):
        assert pulled.files[name] == (run_dir / name).read_bytes(), name


def test_a_failed_run_says_so_in_the_log_stream(capsys):
    """`flwr run` exits 0 whatever the ServerApp does: the stream's last word is the failure."""
    from flwr.app import Context, RecordDict

    from fedpose.engine.flower_server import _server_main

    context = Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config=APP_CONFIG | {"fedpose-config": "{not json"},
    )
    with pytest.raises(ConfigError):
        _server_main(None, context)
    out = capsys.readouterr().out
    assert "[fedpose] run failed: ConfigError: fedpose-config: not valid JSON" in out
    pulled = parse_results(out)
    assert pulled.status == "failed" and pulled.error.startswith("ConfigError: fedpose-config")


def test_a_damaged_or_incomplete_file_is_left_out():
    data = os.urandom(120_000)  # three pieces
    lines = file_lines("model.safetensors", data)
    assert len(lines) == 3
    good = parse_results("\n".join(["noise", *lines, status_line("completed")]))
    assert good.files == {"model.safetensors": data} and good.status == "completed"
    missing = parse_results("\n".join(lines[:2]))
    assert missing.files == {} and "2 of 3 pieces" in missing.problems[0]
    flipped = lines[1][:-8] + ("AAAAAAAA" if not lines[1].endswith("AAAAAAAA") else "BBBBBBBB")
    damaged = parse_results("\n".join([lines[0], flipped, lines[2]]))
    assert damaged.files == {} and "sha256" in damaged.problems[0]
    with pytest.raises(ValueError):
        file_lines("../x", b"")


def _fake_flwr(status: str, log: str):
    def flwr(*args: str) -> str:
        if args[0] == "ls":
            return json.dumps({"success": True, "runs": [{"run-id": "42", "status": status}]})
        assert args[0] == "log" and "--show" in args
        return log

    return flwr


def test_flower_pull_writes_the_run_folder_and_says_when_a_run_failed(
    tmp_path, monkeypatch, capsys
):
    config = {**Config().to_dict(), "track": ["csv"]}
    records = [{"round": 1, "train_loss": 0.5}, {"round": 2, "train_loss": 0.25}]
    log = "\n".join(
        [
            "INFO :      Starting logstream",
            *file_lines("config.json", json.dumps(config).encode()),
            *[record_line(r) for r in records],
            *file_lines(MODEL_FILE, b"weights"),
            status_line("completed"),
        ]
    )
    monkeypatch.setattr(flower_pull, "flwr_command", _fake_flwr("finished:completed", log))
    out = tmp_path / "pulled"
    assert main(["flower-pull", "42", "--out", str(out)]) == 0
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == records
    assert (out / MODEL_FILE).read_bytes() == b"weights"
    assert (out / "metrics.csv").read_text().splitlines() == [
        "round,train_loss",
        "1,0.5",
        "2,0.25",
    ]
    # the folder holds a run now: not written over without --force
    assert main(["flower-pull", "42", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err

    failed = log.replace(status_line("completed"), status_line("failed", "RuntimeError: boom"))
    monkeypatch.setattr(flower_pull, "flwr_command", _fake_flwr("finished:failed", failed))
    assert main(["flower-pull", "42", "--out", str(out), "--force"]) == 1
    assert "did not complete (finished:failed): RuntimeError: boom" in capsys.readouterr().err

    monkeypatch.setattr(flower_pull, "flwr_command", _fake_flwr("finished:failed", "nothing"))
    assert main(["flower-pull", "42", "--out", str(tmp_path / "other")]) == 2
    assert "no fedpose results" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- a real `flwr run .`
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_naming(text: str) -> list[int]:
    """PIDs of the processes whose command line holds `text` (this test's FLWR_HOME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _stop(pids: list[int]) -> None:
    """Stop the detached local SuperLink `flwr run` started (and the process groups it leads:
    SuperExec, the simulation and Ray under it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.5)


def _start_local_superlink(home: Path, env: dict) -> subprocess.Popen:
    """The SuperLink `flwr run` starts for its default local federation, with Flower's own
    command line (flwr/cli/local_superlink.py), started here so that the test owns its PID and
    waits longer than Flower's 15 s on a busy machine; `flwr run` finds it running."""
    import urllib.request

    logs = home / "local-superlink"
    logs.mkdir(parents=True)
    http = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        http,
        "--log-file",
        str(logs / "superlink.log"),
        "--database",
        str(logs / "state.db"),
    ]
    proc = subprocess.Popen(
        command, env=env, cwd=env["PWD"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the local SuperLink did not start: {(logs / 'superlink.log')}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="flwr not on PATH")
def test_plain_flwr_run_on_the_default_local_federation(tmp_path):
    """`flwr run APP --stream` with no federation named: Flower's own local simulation (its
    default 2 virtual SuperNodes, Ray) runs the quick start to completion, and `fedpose
    flower-pull` brings its results back. cwd is tmp_path: the SuperLink and the apps work
    there (data/, runs/)."""
    pytest.importorskip("ray")
    home = tmp_path / "flwr-home"
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PWD": str(tmp_path),
        "PYTHONPATH": str(REPO / "src"),
        "FLWR_HOME": str(home),
        # the local SuperLink's fixed ports (39091/39093), moved to free ones
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }

    def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )

    superlink = _start_local_superlink(home, env)
    try:
        run = flwr("run", str(REPO), "--stream", timeout=600)
        output = run.stdout + run.stderr
        assert (home / "config.toml").read_text().count('address = ":local:"') == 1
        found = re.search(r"Successfully started run (\d+)", output)
        assert found, output[-3000:]
        run_id = found.group(1)
        listing = json.loads(flwr("ls", "--run-id", run_id, "--format", "json").stdout)
        assert listing["runs"][0]["status"] == "finished:completed", output[-3000:]
        assert "[fedpose] num-clients = 0: 2 clients, one per partition" in output

        pulled = tmp_path / "pulled"
        done = subprocess.run(
            [sys.executable, "-m", "fedpose.cli", "flower-pull", run_id, "--out", str(pulled)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        rows = [json.loads(x) for x in (pulled / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3]
        server_dir = tmp_path / "runs" / "flower-quickstart"
        assert (pulled / "metrics.jsonl").read_text() == (server_dir / "metrics.jsonl").read_text()
        assert (pulled / MODEL_FILE).read_bytes() == (server_dir / MODEL_FILE).read_bytes()
        assert len((pulled / "metrics.csv").read_text().splitlines()) == 4
        assert json.loads((pulled / "config.json").read_text())["fed"]["num_clients"] == 2
    finally:
        _stop([superlink.pid, *_processes_naming(str(home))])
    assert _processes_naming(str(home)) == []
