"""Client-side (local) differential privacy on the Flower engine, done by Flower's own code.

Each client clips its update to an L2 norm of at most C and adds Gaussian noise before the update
leaves the SuperNode; the noise is drawn by Flower's `LocalDpMod` (flwr.clientapp.mod), with

    Δ̃ = Δ / max(1, ‖Δ‖₂ / C) + N(0, σ² I),   σ = s √(2 ln(1.25/δ)) / ε,   s = 2C

C = `fed.dp_clip`, ε = `fed.dp_epsilon` (0 = off), δ = `fed.dp_delta`. s is the L2 sensitivity
of one release: two clipped updates differ by at most 2C. The formula is the classic Gaussian
mechanism (Dwork & Roth 2014, Thm. A.1), an (ε, δ) guarantee per release for ε < 1. A client
releases one update per round it trains in; `privacy_report` composes those releases with
Flower's Rényi-DP accountant (`flwr.serverapp.RdpAccountant`, which needs the `dp-accounting`
package: `pip install 'flwr[dp]'`) and always gives the simple bound k·ε, k·δ as well.

Why an adapter and not `ClientApp(mods=[LocalDpMod(...)])` as is: LocalDpMod expects the Flower
"arrays in, arrays out" layout, one ArrayRecord in the request and one with the same keys in the
reply, holding full weights, and clips reply − request. A fedpose reply packs the flat update Δ
together with the BatchNorm statistics into two byte arrays (`pack_state`), and the DP
parameters come from the run config, which a mod list fixed at import time cannot see. So
`privatize_update` shows LocalDpMod a request of zeros and a reply holding Δ alone (reply −
request = Δ exactly); the ClientApp's mod (`client_dp_mod` in `engine/flower_client.py`) unpacks Δ
from the reply and packs the result back beside the BatchNorm statistics. Those are therefore
sent without noise: the guarantee covers the trainable update only. Flower's server-side DP
wrappers (DifferentialPrivacyClientSide/ServerSideFixedClipping) wrap a Flower `Strategy`;
fedpose's server loop and strategies are its own (FedGH needs every individual update), so they
do not apply.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.mod import LocalDpMod

from fedpose.config import ConfigError, FedConfig


def dp_enabled(fed: FedConfig) -> bool:
    return fed.dp_epsilon > 0


def check_dp_config(fed: FedConfig) -> None:
    if fed.dp_epsilon < 0 or not math.isfinite(fed.dp_epsilon):
        raise ConfigError(f"fed.dp_epsilon must be >= 0 (0 = off), got {fed.dp_epsilon}")
    if dp_enabled(fed):
        if not fed.dp_clip > 0 or not math.isfinite(fed.dp_clip):
            raise ConfigError(f"fed.dp_clip must be > 0, got {fed.dp_clip}")
        if not 0 < fed.dp_delta < 1:
            raise ConfigError(f"fed.dp_delta must be in (0, 1), got {fed.dp_delta}")


def sensitivity(fed: FedConfig) -> float:
    return 2.0 * fed.dp_clip


def noise_std(fed: FedConfig) -> float:
    """σ as LocalDpMod computes it from (sensitivity, ε, δ)."""
    return sensitivity(fed) * math.sqrt(2 * math.log(1.25 / fed.dp_delta)) / fed.dp_epsilon


def local_dp_mod(fed: FedConfig) -> LocalDpMod:
    check_dp_config(fed)
    return LocalDpMod(
        clipping_norm=fed.dp_clip,
        sensitivity=sensitivity(fed),
        epsilon=fed.dp_epsilon,
        delta=fed.dp_delta,
    )


def privatize_update(
    msg: Message, reply: Message, ctxt: Context, delta: np.ndarray, fed: FedConfig
) -> np.ndarray:
    """The update `delta` (flat float32) of `reply` to request `msg`, clipped and noised by
    Flower's LocalDpMod. Both messages are shown to the mod in the layout it expects and are
    left with their own content afterwards."""
    request_content, reply_content = msg.content, reply.content
    msg.content = RecordDict({"delta": ArrayRecord({"delta": Array(np.zeros_like(delta))})})
    reply.content = RecordDict({"delta": ArrayRecord({"delta": Array(delta)})})
    # LocalDpMod draws from numpy's global generator: whatever seeded it before (training code,
    # a library), the noise must not be predictable, so it is reseeded from the OS here
    np.random.seed()
    try:
        out = local_dp_mod(fed)(msg, ctxt, lambda _msg, _ctxt: reply)
        if out.has_error():
            raise RuntimeError(f"LocalDpMod refused the update: {out.error.reason}")
        return np.asarray(out.content["delta"]["delta"].numpy())
    finally:
        msg.content = request_content
        reply.content = reply_content


def releases_per_client(rows: list[dict]) -> dict[int, int]:
    """How many updates each client may have released: every round it was sent a request
    (selected and not dropped), whether or not its reply was used."""
    counts: dict[int, int] = {}
    for row in rows:
        dropped = set(row.get("dropped", []))
        for k in row.get("selected", []):
            if k not in dropped:
                counts[int(k)] = counts.get(int(k), 0) + 1
    return counts


def privacy_report(fed: FedConfig, releases: dict[int, int]) -> dict:
    """The privacy spent by the client that released most: per release (ε, δ) as configured,
    the simple composition bound, and Flower's RDP accountant's ε at δ when it is installed."""
    most = max(releases.values(), default=0)
    report: dict = {
        "mechanism": "Flower LocalDpMod (Gaussian), per client",
        "clip_norm": fed.dp_clip,
        "sensitivity": sensitivity(fed),
        "noise_std": noise_std(fed),
        "epsilon_per_release": fed.dp_epsilon,
        "delta_per_release": fed.dp_delta,
        "releases_max": most,
        "releases": {str(k): n for k, n in sorted(releases.items())},
        "epsilon_composed_simple": most * fed.dp_epsilon,
        "delta_composed_simple": most * fed.dp_delta,
        "epsilon_rdp": None,
        "delta_rdp": fed.dp_delta,
        "accountant": None,
    }
    if most == 0:
        return report
    try:
        report["epsilon_rdp"] = rdp_epsilon(noise_std(fed) / sensitivity(fed), most, fed.dp_delta)
        report["accountant"] = "flwr.serverapp.RdpAccountant"
    except ImportError as e:
        report["accountant"] = f"unavailable: {e}"
    return report


def rdp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at δ after `releases` Gaussian releases of the given noise multiplier (σ / sensitivity),
    by Flower's RDP accountant. Local DP: every release is the client's own, no sampling."""
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(
        GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=1, population_size=1),
        count=releases,
    )
    return float(accountant.get_privacy_spent().epsilon)
