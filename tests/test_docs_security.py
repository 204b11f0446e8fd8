"""docs/security.md's commands work as written: the in-process secure run is run (on the tiny
data), the Flower run config and node config are made and parsed as the processes would."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

from fedtiny import tiny_cli_args
from flwr.common.config import parse_config_args
from test_docs import _blocks, _run, _sections

from fedpose.engine.flower_messages import settings_from_run_config
from fedpose.engine.flower_secagg import SKETCH_SECRET, check_server_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"


def _lines() -> list[str]:
    text = "".join(t for lang, t, _ in _blocks(_sections(DOC)["Commands"]) if lang == "bash")
    return [x for x in text.splitlines() if x.strip()]


def test_the_in_process_command_runs_a_secure_federation(tmp_path, synth_dir, capsys):
    (line,) = [x for x in _lines() if x.startswith("fedpose run ")]
    argv = shlex.split(line)[1:]
    # the tiny data and model, the doc's own secure settings kept
    _run(argv + tiny_cli_args(tmp_path / "runs", synth_dir), capsys)
    rows = [
        json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["secure"] is True
    width = int(next(a for a in argv if a.startswith("fed.sketch_width=")).split("=")[1])
    assert rows[-1]["gram"] == {"path": "CountSketch estimate", "width": width}


def test_the_flower_commands_put_the_secret_on_the_sites_only(tmp_path, capsys):
    lines = _lines()
    (config_line,) = [x for x in lines if x.startswith("fedpose flower-config ")]
    argv = shlex.split(config_line.split(">")[0])[1:]
    run_toml = _run([*argv, "-c", f"out_dir={tmp_path}"], capsys)
    settings = settings_from_run_config(tomllib.loads(run_toml))
    fed = settings.config.fed
    assert fed.secure and fed.sketch_secret == ""
    check_server_config(fed)  # the ServerApp accepts it: no secret in the run config

    (node_line,) = [x for x in lines if x.startswith("flower-supernode ")]
    args = shlex.split(node_line)
    node_config = parse_config_args([args[args.index("--node-config") + 1]])
    assert node_config[SKETCH_SECRET]
    assert any(x.startswith("flwr run ") and "run.toml" in x for x in lines)
