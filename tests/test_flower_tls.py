"""Flower over TLS with SuperNode authentication, on loopback, with certificates and keys made
here: a registered SuperNode trains one round of fedpose, a SuperNode with an unknown key is
refused, and plaintext clients (a SuperNode and the `flwr` CLI) cannot talk to the TLS SuperLink.
The round runs with client-side differential privacy on, so the same (slow) run also shows
Flower's LocalDpMod working inside a real ClientApp and the ServerApp's privacy report.

One SuperLink, three SuperNodes started together; every process is stopped by PID (process
group) in `finally`, also when an assertion fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedpose.engine.federation import build_federation
from fedpose.engine.runner import prepare_run_dir
from fedpose.metrics.log import read_jsonl
from fedpose.tools.flower_demo import (
    CONNECTION,
    Deployment,
    _follow_run,
    _listening,
    demo_config,
    free_port,
    stop_groups,
    write_app_dir,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
        reason="needs openssl and ssh-keygen",
    ),
]
REFUSED_NODE_LIMIT_S = 90.0


def _sh(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost signed by it, and two
    ECDSA P-384 SuperNode key pairs (one to register, one nobody registers)."""
    folder.mkdir(parents=True, exist_ok=True)
    _sh(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=fedpose test CA",
        cwd=folder,
    )
    _sh(
        "openssl",
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=folder,
    )
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _sh(
        "openssl",
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
        cwd=folder,
    )
    for name in ("registered", "unknown"):
        _sh(
            "ssh-keygen",
            "-q",
            "-t",
            "ecdsa",
            "-b",
            "384",
            "-N",
            "",
            "-C",
            name,
            "-f",
            name,
            cwd=folder,
        )
    return {
        name: folder / name
        for name in (
            "ca.crt",
            "server.pem",
            "server.key",
            "registered",
            "registered.pub",
            "unknown",
        )
    }


def _wait_exit(popen: subprocess.Popen, limit: float) -> int | None:
    try:
        return popen.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        return None


def test_tls_and_supernode_authentication(tmp_path):
    """SLOW (about 30-60 s on an idle machine)."""
    t0 = time.monotonic()
    cfg = demo_config(
        None,
        supernodes=1,
        rounds=1,
        overrides=[
            f"out_dir={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'synth-arm'}",
            "fed.method=fedavg",
            "name=tls",
            "fed.dp_epsilon=0.5",
            "fed.dp_clip=0.01",
        ],
    )
    build_federation(cfg)  # the data set exists before any process starts
    certs = make_certificates(tmp_path / "certs")
    deployment = Deployment(tmp_path / "flower", Console(quiet=True))
    port = free_port()
    address = f"127.0.0.1:{port}"
    (deployment.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{certs["ca.crt"]}"\n\n'
        f'[superlink.plaintext]\naddress = "{address}"\ninsecure = true\n'
    )
    node_args = [
        "flower-supernode",
        "--superlink",
        address,
        "--node-config",
        "partition-id=0 num-partitions=1",
    ]
    refused = []
    try:
        link = deployment.start(
            "superlink",
            [
                "flower-superlink",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ssl-ca-certfile",
                str(certs["ca.crt"]),
                "--ssl-certfile",
                str(certs["server.pem"]),
                "--ssl-keyfile",
                str(certs["server.key"]),
                "--enable-supernode-auth",
            ],
        )
        deadline = time.monotonic() + 60
        while not _listening(port):
            deployment.check_alive()
            assert time.monotonic() < deadline, f"SuperLink not listening; see {link.log}"
            time.sleep(0.1)

        registered = deployment.flwr(
            "supernode", "register", str(certs["registered.pub"]), CONNECTION
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr

        good = deployment.start(
            "supernode-registered",
            [
                *node_args,
                "--port",
                str(free_port()),
                "--root-certificates",
                str(certs["ca.crt"]),
                "--auth-supernode-private-key",
                str(certs["registered"]),
            ],
        )
        unknown = deployment.start(
            "supernode-unknown",
            [
                *node_args,
                "--port",
                str(free_port()),
                "--root-certificates",
                str(certs["ca.crt"]),
                "--auth-supernode-private-key",
                str(certs["unknown"]),
            ],
        )
        # plaintext (Flower itself will not send a SuperNode key without TLS, so none is given:
        # the log shows whether it failed at the connection or at authentication)
        plaintext = deployment.start(
            "supernode-plaintext",
            [
                *node_args,
                "--port",
                str(free_port()),
                "--insecure",
                "--max-retries",
                "1",
                "--max-wait-time",
                "10",
            ],
        )

        # the refused two exit on their own; the run's liveness checks must not count them
        refused = [unknown, plaintext]
        deployment.processes = [p for p in deployment.processes if p not in refused]

        deadline = time.monotonic() + 60
        while deployment.connected_nodes() < 1:
            deployment.check_alive()
            assert time.monotonic() < deadline, f"registered SuperNode not active; see {good.log}"
            time.sleep(0.2)

        app_dir = write_app_dir(tmp_path / "app", cfg, reply_timeout=120.0)
        prepare_run_dir(cfg, resume=False)
        status = _follow_run(deployment, app_dir, cfg, Console(quiet=True), timeout=240)
        assert status["status"] == "finished:completed", json.dumps(status)
        rows = read_jsonl(cfg.run_dir / "metrics.jsonl")
        assert [r["aggregated"] for r in rows] == [[0]]
        assert rows[0]["rejected"] == {}
        privacy = json.loads((cfg.run_dir / "privacy.json").read_text())
        assert privacy["releases"] == {"0": 1} and privacy["noise_std"] > 0
        assert privacy["epsilon_composed_simple"] == 0.5
        # a plaintext CLI gets no answer from the TLS port (`flwr` exits 0 and says so in JSON),
        # while the same request over TLS succeeds
        plain = json.loads(deployment.flwr("ls", "plaintext", "--format", "json").stdout)
        assert plain["success"] is False and "unavailable" in plain["error-message"], plain
        over_tls = json.loads(deployment.flwr("ls", CONNECTION, "--format", "json").stdout)
        assert over_tls["success"] is True, over_tls

        unknown_code = _wait_exit(unknown.popen, REFUSED_NODE_LIMIT_S)
        unknown_log = unknown.log.read_text(errors="replace")
        assert unknown_code not in (None, 0), f"unknown SuperNode not refused:\n{unknown_log}"
        assert "Failed to activate SuperNode" in unknown_log, unknown_log
        plaintext_code = _wait_exit(plaintext.popen, REFUSED_NODE_LIMIT_S)
        plaintext_log = plaintext.log.read_text(errors="replace")
        assert plaintext_code not in (None, 0), f"plaintext SuperNode not refused:\n{plaintext_log}"
        assert "Activated" not in plaintext_log and "Failed to activate" not in plaintext_log
        assert "could not establish a connection" in plaintext_log, plaintext_log

        # only the registered node ever got in
        assert deployment.connected_nodes() == 1
        print(f"TLS test: {time.monotonic() - t0:.1f} s")
    finally:
        started = [p.popen for p in deployment.processes + refused]
        stop_groups([p.popen for p in refused])
        deployment.stop()
        assert all(p.poll() is not None for p in started), "Flower processes left running"
