"""What a CountSketch of width m costs FedGH, measured on the updates of one exact run.

    fedpose sketch-study configs/demo.toml --widths 1024,4096,16384,65536 --keys 3

runs FedGH exactly (in-process) and, every round, before the exact aggregation, also computes
what secure FedGH would have done with sketches of each width under `--keys` different
consortium secrets, from the same updates and the same strategy state:
  cos_err_mean / cos_err_max  |ĉos_ij − cos_ij| over the client pairs (Gram estimate's angles)
  norm_err_mean              |‖ŷ_k‖/‖Δ_k‖ − 1| over the clients
  flip_share                 share of PCGrad's projection decisions (client k, visit t) that
                             differ from the exact run's
  step_cos_err               1 − cos(Σ ĉ_k Δ_k, Σ c_k Δ_k): direction error of the round's step
  step_norm_err              |‖Σ ĉ_k Δ_k‖ / ‖Σ c_k Δ_k‖ − 1|
No retraining: one run gives every width's per-round error. Rows go to
`<run dir>/sketch_diagnostics.jsonl`, a summary (mean over rounds and keys) to stdout.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from fedpose.engine.local import LocalTransport
from fedpose.engine.runner import run_federation
from fedpose.fl.gram import cosine_from_gram, gram_matrix, weighted_sum
from fedpose.fl.harmonize import pcgrad_decisions
from fedpose.fl.sketch import count_sketch, sketch_gram
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy
from fedpose.fl.strategies.fedgh import FedGH
from fedpose.seeding import fedgh_order_seed


def round_diagnostics(
    strategy: FedGH, inputs: RoundInput, state: dict, widths: list[int], keys: int
) -> list[dict]:
    """One row per (width, key): the sketch's errors against the exact Gram-space FedGH."""
    d = inputs.deltas
    p = d.shape[1]
    exact_g = gram_matrix(d)
    exact_cos = cosine_from_gram(exact_g).numpy()
    seed = fedgh_order_seed(strategy.seed, state.get("round", 0))
    exact_hits = pcgrad_decisions(exact_g, order=strategy.order, seed=seed)
    coef, _, _ = strategy.plan(exact_g[None], inputs, copy.deepcopy(state))
    step = weighted_sum(d, coef[0]).double()
    k = d.shape[0]
    iu = np.triu_indices(k, 1)
    norms = np.sqrt(np.diagonal(exact_g.numpy()))
    rows = []
    for m in widths:
        for key in range(keys):
            secret = f"study-key-{key}"
            y = torch.stack([count_sketch(row, m, secret) for row in d])
            g = sketch_gram(y, p)
            cos = cosine_from_gram(g).numpy()
            hits = pcgrad_decisions(g, order=strategy.order, seed=seed)
            c_hat, _, _ = strategy.plan(g[None], inputs, copy.deepcopy(state))
            s_hat = weighted_sum(d, c_hat[0]).double()
            err = np.abs(cos[iu] - exact_cos[iu])
            denom = float(step.norm() * s_hat.norm())
            rows.append(
                {
                    "round": state.get("round", 0) + 1,
                    "width": m,
                    "key": key,
                    "cos_err_mean": float(err.mean()) if err.size else 0.0,
                    "cos_err_max": float(err.max()) if err.size else 0.0,
                    "norm_err_mean": float(
                        np.mean(np.abs(np.sqrt(np.diagonal(g.numpy())) / norms - 1.0))
                    ),
                    "flip_share": float((hits != exact_hits).mean()) if hits.size else 0.0,
                    "projections_exact": int(exact_hits.sum()),
                    "step_cos_err": 1.0 - float(s_hat @ step) / denom if denom > 0 else 0.0,
                    "step_norm_err": abs(float(s_hat.norm() / step.norm()) - 1.0),
                }
            )
    return rows


class _Recording(Strategy):
    """FedGH that, before each exact aggregation, measures every sketch width on its inputs."""

    def __init__(self, inner: FedGH, widths: list[int], keys: int, out):
        self.inner, self.widths, self.keys, self.out = inner, widths, keys, out
        self.name = inner.name
        self.client_rule, self.client_coef = inner.client_rule, inner.client_coef
        self.rows: list[dict] = []

    def initial_state(self) -> dict:
        return self.inner.initial_state()

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        rows = round_diagnostics(self.inner, inputs, state, self.widths, self.keys)
        with open(self.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        self.rows.extend(rows)
        return self.inner.aggregate(inputs, state)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for m in sorted({r["width"] for r in rows}):
        sel = [r for r in rows if r["width"] == m]
        out.append(
            {
                "width": m,
                **{
                    key: float(np.mean([r[key] for r in sel]))
                    for key in (
                        "cos_err_mean",
                        "cos_err_max",
                        "norm_err_mean",
                        "flip_share",
                        "step_cos_err",
                        "step_norm_err",
                    )
                },
                "rounds": len({r["round"] for r in sel}),
            }
        )
    return out


def flower_cost(out_dir: Path, rounds: int = 2, supernodes: int = 2, width: int = 16384) -> list:
    """Bytes the ServerApp receives and seconds per round, plain against secure, for FedAvg and
    FedGH on a loopback Flower deployment of the tiny demo federation (`fedpose flower-demo`'s
    default model). Bytes: every message the ServerApp received during training rounds
    (phase 1 replies and the four SecAgg+ stages), from its inspection log."""
    from rich.console import Console

    from fedpose.engine.flower_secagg import INSPECT_ENV, SKETCH_SECRET
    from fedpose.tools.flower_demo import demo_config, renamed, run_flower

    console = Console(width=100, emoji=False)
    arms = [
        ("fedavg-plain", ["fed.method=fedavg"]),
        ("fedavg-secure", ["fed.method=fedavg", "fed.secure=true"]),
        ("fedgh-plain", ["fed.method=fedgh"]),
        ("fedgh-secure", ["fed.method=fedgh", "fed.secure=true", f"fed.sketch_width={width}"]),
    ]
    out = []
    for label, sets in arms:
        cfg = demo_config(
            None,
            supernodes,
            rounds,
            [f"out_dir={out_dir}", f"data.root={out_dir / 'synth-arm'}", "fed.eval_every=1000"]
            + sets,
        )
        log = out_dir / f"{label}-received.jsonl"
        log.unlink(missing_ok=True)
        nodes = [
            f'partition-id={i} num-partitions={supernodes} {SKETCH_SECRET}="bench-secret"'
            for i in range(supernodes)
        ]
        envs = [{} for _ in range(supernodes)] + [{INSPECT_ENV: str(log)}]
        res = run_flower(
            renamed(cfg, label),
            supernodes,
            console,
            out_dir / label / "flower",
            timeout=3600,
            node_configs=nodes,
            envs=envs,
        )
        metrics = [
            json.loads(x)
            for x in (res.run_dir / "metrics.jsonl").read_text().split("\n")
            if x.strip()
        ]
        received = [json.loads(x) for x in log.read_text().splitlines()]
        train_bytes = sum(m["bytes"] for m in received if m["type"] == "train")
        walls = [m["wall_seconds"] for m in metrics]
        out.append(
            {
                "arm": label,
                "rounds": len(metrics),
                "seconds_per_round": float(np.mean(walls)),
                "seconds_per_round_each": walls,
                "uplink_bytes_per_round": train_bytes / max(len(metrics), 1),
                "messages_per_round": sum(m["type"] == "train" for m in received)
                / max(len(metrics), 1),
            }
        )
        console.print(json.dumps(out[-1]))
    return out


def sketch_study(cfg, widths: list[int], keys: int) -> list[dict]:
    """Run `cfg` with exact FedGH in-process, measuring every sketch width each round; write
    `sketch_diagnostics.jsonl` and `sketch_summary.json` into its run directory."""
    out = cfg.run_dir / "sketch_diagnostics.jsonl"
    recorders: list[_Recording] = []

    def transport(federation):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        rec = _Recording(federation.strategy, widths, keys, out)
        federation.server.strategy = rec
        recorders.append(rec)
        return LocalTransport(federation)

    run_federation(cfg, transport_factory=transport)
    summary = summarize(recorders[0].rows)
    (cfg.run_dir / "sketch_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_table(summary: list[dict]) -> str:
    lines = [
        "| m | mean abs cosine error | max abs cosine error | norm error | PCGrad flips "
        "| step direction error (1 − cos) | step norm error |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['width']} | {s['cos_err_mean']:.4f} | {s['cos_err_max']:.4f} | "
            f"{s['norm_err_mean']:.4f} | {100 * s['flip_share']:.2f} % | "
            f"{s['step_cos_err']:.2e} | {s['step_norm_err']:.4f} |"
        )
    return "\n".join(lines)
