"""Secure aggregation on Flower 1.42: fl/secure.py's two phases over a Grid, phase 2 by SecAgg+.

Phase 1 is fedpose's usual "train" message. Under `fed.secure` the ClientApp's
`client_secure_mod` (outermost mod, so it sees the update after LocalDpMod's noise) keeps the
update (and SCAFFOLD's control variate change) in the node's `context.state` and replaces them
in the reply by the update's CountSketch (width `fed.sketch_width`, keyed by the SuperNode's
node-config `sketch-secret`, which the server never sees) — or by nothing, for FedAvg, FedProx,
FedBN, FedDyn and SCAFFOLD. The reply then holds counts, losses and the sketch only.

Phase 2 is Flower's own SecAgg+ (`SecAggPlusWorkflow` on the server, `secaggplus_mod` on the
ClientApp), run once per round for the round's clients by `FlowerSecureTransport.secure_sum`.
The workflow is Flower's unmodified four stages (setup, share keys, collect masked vectors,
unmask) with its dropout recovery (Shamir shares of the dropped clients' keys); fedpose only
feeds it: the workflow asks a legacy Strategy's `configure_fit` for the per-node instructions
(here: the node's coefficient c_k, its BatchNorm weight a_k and, for SCAFFOLD, its control
weight e_k) and hands the unmasked result to `aggregate_fit`, where fedpose takes it. On the
ClientApp, secaggplus_mod's inner handler (`_masked_input`) answers with
[c_k Δ_k, e_k (c_k⁺ − c_k) (SCAFFOLD only), a_k (BN_k − BN_global)] and weight 1, which
secaggplus_mod clips to ±`fed.secagg_clip`, quantises (2^22 levels, stochastic rounding), masks
and uploads: one masked vector, so the control variate's change is as hidden as the update.
The server obtains the mean of the kept clients' vectors and multiplies it by their number.

Quantisation error of a sum, per coordinate: at most K · 2 · clip / 2^22 (K clients in the sum;
4.8e-7 per client at clip = 1), unbiased (stochastic rounding); values beyond ±clip are clipped,
and each client reports how many of its values were (`secagg_clipped` in metrics.jsonl).

Dropouts (measured in tests/test_flower_secure.py): a client lost during the collect-masked-
vectors or unmask stage is recovered by SecAgg+ (its masks are removed with the others' shares
as long as `fed.secagg_threshold` of them answer); the sums then cover the clients whose masked
vectors arrived (`SecureTotals.kept`) and fl/secure.py's `finish_round` takes the survivors'
step. Flower 1.42's unmask stage asks for key shares of every sampled client, so a client lost
during setup or share keys (no shares of its keys exist) halts SecAgg+: the round stops the run
with `SecureAggregationError`, before anything of that round is written.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedpose.config import ConfigError
from fedpose.engine.flower_messages import (
    CONTROL_DELTA,
    content_to_request,
    pack_state,
    record_to_state,
    settings_from_run_config,
)
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout, weighted_average
from fedpose.fl.secure import SecureTotals, needs_sketch
from fedpose.fl.sketch import count_sketch
from fedpose.fl.strategies import build_strategy

SKETCH_SECRET = "sketch-secret"  # node config key: the consortium secret (never the run config)
_KEPT = "fedpose.secure.update"  # context.state key: this site's update of the round
_AVG = "avgdelta/"  # name prefix of the BatchNorm statistics' change in the kept update
_CONTROL = "control"  # SCAFFOLD's control variate change in the kept update
COUNTERS = "counters"  # reply record: integer BatchNorm counters, in the clear
QUANTISATION_LEVELS = 1 << 22  # SecAgg+'s default quantization_range, used as is
# where a ServerApp writes what it received when asked to (the inspection test)
INSPECT_ENV = "FEDPOSE_INSPECT_MESSAGES"
# tests only: a SuperNode started with FEDPOSE_TEST_SECAGG_DROP=<SecAgg+ stage> (setup,
# share_keys, collect_masked_vectors, unmask) loses its site at that stage of every round: the
# ClientApp process exits without a reply, as a crashed or disconnected site would
DROP_ENV = "FEDPOSE_TEST_SECAGG_DROP"
DROP_EXIT_CODE = 75


def check_server_config(fed) -> None:
    """The server must not hold the sketches' key: it belongs in the SuperNodes' node config."""
    if fed.sketch_secret:
        raise ConfigError(
            "fed.sketch_secret is set in the run config, which the server reads: give the "
            f"secret to each SuperNode instead (--node-config '{SKETCH_SECRET}=\"...\"')"
        )


def quantisation_bound(num_clients: int, clip: float) -> float:
    """Largest error per coordinate of the secure sum of `num_clients` vectors."""
    return num_clients * 2.0 * clip / QUANTISATION_LEVELS


# ----------------------------------------------------------------------------- ClientApp side
def client_secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Phase 1: keep the update, send its sketch; phase 2: SecAgg+ over the kept update."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    try:
        fed = settings_from_run_config(context.run_config).config.fed
    except Exception:  # the handler reports a broken config as a failed client
        return call_next(msg, context)
    if not fed.secure:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        _injected_dropout(msg)
        return secaggplus_mod(msg, context, _masked_input)
    reply = call_next(msg, context)
    if reply.has_error() or "update" not in reply.content:
        return reply  # a failed client releases nothing
    return _keep_and_sketch(msg, reply, context, fed)


def _injected_dropout(msg: Message) -> None:
    """The test switch DROP_ENV: end this ClientApp process, unanswered, at the named stage."""
    stage = os.environ.get(DROP_ENV)
    if stage and msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == stage:
        print(f"{DROP_ENV}={stage}: this site drops out of SecAgg+ here", flush=True)
        os._exit(DROP_EXIT_CODE)


def _keep_and_sketch(msg: Message, reply: Message, context: Context, fed) -> Message:
    update = record_to_state(reply.content["update"])
    delta = update.pop("delta")
    sent = content_to_request(msg.content).weights
    kept = {"delta": delta}
    if CONTROL_DELTA in update:  # SCAFFOLD: c_k⁺ − c_k goes through SecAgg+ with the update
        kept[_CONTROL] = update.pop(CONTROL_DELTA)
    counters = {}
    for key, t in update.items():  # "averaged/<name>": BatchNorm statistics
        name = key.split("/", 1)[1]
        if t.is_floating_point():
            kept[_AVG + name] = t.double() - sent[name].double()
        else:
            # BatchNorm's batch counters: how many batches the site ran, which its reply's
            # "steps" says in the clear anyway; scalars, averaged by the server as in a plain run
            counters[name] = [int(v) for v in t.reshape(-1).tolist()]
    content = reply.content
    del content["update"]
    if counters:
        content[COUNTERS] = ConfigRecord(counters)
    if needs_sketch(build_strategy(fed)):
        secret = str(context.node_config.get(SKETCH_SECRET, ""))
        if not secret:
            content["config"]["error"] = (
                f"fed.secure with {fed.method}: this SuperNode has no {SKETCH_SECRET} in its "
                f"--node-config (the consortium secret of the sketches)"
            )
            return Message(content, reply_to=msg)
        sketch = count_sketch(delta, fed.sketch_width, secret)
        content["sketch"] = ArrayRecord({"sketch": _array(sketch.numpy())})
    context.state[_KEPT] = pack_state(kept)
    return Message(content, reply_to=msg)


def _array(values: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(values))


def _masked_input(msg: Message, context: Context) -> Message:
    """SecAgg+'s inner handler: [c_k Δ_k, e_k Δc_k (SCAFFOLD), a_k ΔBN_k] as a FitRes of
    weight 1."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    coef, avg_weight = float(fitins.config["coef"]), float(fitins.config["avg-weight"])
    clip = float(fitins.config["clip"])
    if _KEPT not in context.state:
        raise RuntimeError("secure aggregation asked for an update this site did not keep")
    kept = record_to_state(context.state.array_records[_KEPT])
    del context.state[_KEPT]  # one sum per update
    vectors = [kept.pop("delta").double().numpy() * coef]
    if "control-coef" in fitins.config:
        if _CONTROL not in kept:
            raise RuntimeError(
                "secure aggregation asked for a control variate change this site did not keep"
            )
        vectors.append(kept.pop(_CONTROL).double().numpy() * float(fitins.config["control-coef"]))
    names = [n for n in kept if n.startswith(_AVG)]
    vectors.append(
        np.concatenate([kept[n].reshape(-1).numpy() * avg_weight for n in names])
        if names
        else np.zeros(0)
    )
    clipped = sum(int((np.abs(v) > clip).sum()) for v in vectors)
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(vectors),
        1,
        {"secagg-clipped": clipped},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# ----------------------------------------------------------------------------- ServerApp side
class _RoundPlan(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow talks to: it names the round's nodes with their
    instructions and takes the unmasked aggregate. Nothing else of it is used."""

    def __init__(self, grid, instructions: dict[int, dict]):
        self.grid = grid
        self.instructions = instructions
        self.aggregate: list[np.ndarray] | None = None
        self.contributors: list[int] = []
        self.clipped = 0

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ARG002 (flwr Strategy signature)
        empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
        return [
            (GridClientProxy(node, self.grid, 0), FitIns(empty, dict(cfg)))
            for node, cfg in self.instructions.items()
        ]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ARG002 (flwr Strategy signature)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = [int(proxy.node_id) for proxy, _ in results]
            self.clipped = sum(int(res.metrics.get("secagg-clipped", 0)) for _, res in results)
        return None, {}

    # the workflow calls none of these
    def initialize_parameters(self, client_manager):  # noqa: ARG002 (flwr Strategy signature)
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ARG002 (flwr Strategy signature)
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ARG002 (flwr Strategy signature)
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ARG002 (flwr Strategy signature)
        return None


class SecureAggregationError(RuntimeError):
    """SecAgg+ could not produce the round's sum (module docstring: dropouts)."""


def secure_transport(transport, layout: ModelLayout, fed):
    """The ServerApp's transport for this run: under fed.secure, wrapped for SecAgg+ (and the
    run config checked for a secret it must not hold)."""
    if not fed.secure:
        return transport
    check_server_config(fed)
    return FlowerSecureTransport(transport, layout, fed)


class FlowerSecureTransport:
    """A FlowerTransport (engine/flower_server.py, wrapped: every other attribute is its)
    whose replies hold sketches and whose `secure_sum` runs SecAgg+."""

    def __init__(self, inner, layout: ModelLayout, fed):
        self.inner = inner
        self.layout = layout
        self.fed = fed
        self._global_avg: dict[str, torch.Tensor] = {}
        self._round = 0
        self._counters: dict[int, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def receive(self, client_id: int) -> TrainReply:
        reply = self.inner.receive(client_id)
        # the integer counters came in the clear (content_to_reply puts them in `averaged`)
        self._counters[client_id] = reply.averaged
        reply.averaged = {}
        return reply

    def send(self, request: TrainRequest) -> None:
        # the BatchNorm statistics the sites' changes are measured from
        self._global_avg = {n: request.weights[n] for n in self.layout.avg_names}
        self._round = request.round
        self.inner.send(request)

    def secure_sum(
        self,
        client_ids: list[int],
        coef: list[float],
        avg_weights: list[float],
        control_coef: list[float] | None = None,
    ) -> SecureTotals:
        client_of = {self.inner.node_of[k]: k for k in client_ids}
        instructions = {}
        for i, k in enumerate(client_ids):
            cfg = {"coef": coef[i], "avg-weight": avg_weights[i], "clip": self.fed.secagg_clip}
            if control_coef is not None:
                cfg["control-coef"] = control_coef[i]
            instructions[self.inner.node_of[k]] = cfg
        plan = _RoundPlan(self.inner.grid, instructions)
        self._run_workflow(plan)
        if plan.aggregate is None:
            raise SecureAggregationError(
                f"round {self._round + 1}: SecAgg+ halted without the sum of clients "
                f"{client_ids} (a site lost before its key shares went out, or fewer than "
                f"fed.secagg_threshold of them left to unmask); nothing of this round was "
                f"written; see the ServerApp log"
            )
        kept = sorted(client_of[n] for n in plan.contributors)
        # the workflow returns the mean of the kept clients' vectors
        arrays = [np.asarray(a, dtype=np.float64) * len(kept) for a in plan.aggregate]
        update = torch.from_numpy(arrays[0]).float()
        control = torch.from_numpy(arrays[1]).float() if control_coef is not None else None
        weight_of = dict(zip(client_ids, avg_weights, strict=True))
        averaged = self._averaged(arrays[-1], kept, [weight_of[k] for k in kept])
        diagnostics = {
            "secagg_clients": len(kept),
            "secagg_dropped": [k for k in client_ids if k not in kept],
            "secagg_clipped": plan.clipped,
            "secagg_error_bound": quantisation_bound(len(kept), self.fed.secagg_clip),
        }
        return SecureTotals(update, averaged, kept, control, diagnostics)

    def _run_workflow(self, plan: _RoundPlan) -> None:
        """Flower's SecAgg+ workflow, unmodified, for the nodes `plan` names."""
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=1),
            strategy=plan,
            client_manager=SimpleClientManager(),
        )
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: self._round + 1}
        )
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=self.fed.secagg_threshold,
            max_weight=1.0,
            clipping_range=self.fed.secagg_clip,
            quantization_range=QUANTISATION_LEVELS,
            timeout=self.inner.reply_timeout,
        )
        workflow(self.inner.grid, context)

    def _averaged(
        self, bn: np.ndarray, kept: list[int], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The kept clients' BatchNorm statistics, averaged by their weights: the global ones
        plus Σ_kept a_k ΔBN_k / Σ_kept a_k; the integer counters from the clear replies."""
        averaged = {}
        total_weight = math.fsum(weights)
        at = 0
        floats = [n for n in self.layout.avg_names if self._global_avg[n].is_floating_point()]
        for name in floats:
            ref = self._global_avg[name]
            part = torch.from_numpy(bn[at : at + ref.numel()].reshape(ref.shape))
            at += ref.numel()
            averaged[name] = (ref.double() + part / total_weight).to(ref.dtype)
        ints = tuple(n for n in self.layout.avg_names if n not in floats)
        if ints:
            averaged.update(weighted_average([self._counters[k] for k in kept], ints, weights))
        return averaged


# ----------------------------------------------------------------------------- inspection
class InspectingGrid:
    """A Grid that writes a summary of every message the ServerApp receives (record names,
    array dtypes and sizes, config values' types and lengths) as JSON lines, for the test that
    checks what a secure server sees. Enabled by FEDPOSE_INSPECT_MESSAGES=<file>."""

    def __init__(self, grid, path: str):
        self._grid = grid
        self._path = path

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self._record(replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._record(replies)
        return replies

    def _record(self, replies) -> None:
        import json

        with open(self._path, "a") as f:
            for msg in replies:
                f.write(json.dumps(message_summary(msg)) + "\n")


def message_summary(msg: Message) -> dict:
    """What a received message holds, value by value: arrays by dtype and element count,
    config values by type and, for bytes, by the array they decode to."""
    from flwr.common import bytes_to_ndarray

    out: dict = {
        "type": msg.metadata.message_type,
        "error": msg.has_error(),
        "records": {},
        "bytes": 0,  # payload: array bytes, bytes values, 8 per number, string lengths
    }
    if msg.has_error():
        return out
    for name, record in msg.content.items():
        entries = {}
        if isinstance(record, ArrayRecord):
            for key, arr in record.items():
                entries[key] = {
                    "kind": "array",
                    "dtype": arr.dtype,
                    "size": int(np.prod(arr.shape)),
                }
                out["bytes"] += len(arr.data)
        else:  # ConfigRecord or MetricRecord: scalars, lists, bytes
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                sizes = []
                for v in values:
                    out["bytes"] += len(v) if isinstance(v, bytes | str) else 8
                    if isinstance(v, bytes):
                        try:
                            a = bytes_to_ndarray(v)
                            sizes.append({"dtype": str(a.dtype), "size": int(a.size)})
                        except Exception:
                            sizes.append({"dtype": "bytes", "size": len(v)})
                    elif isinstance(v, str):
                        sizes.append({"dtype": "str", "size": len(v)})
                    else:
                        sizes.append({"dtype": type(v).__name__, "size": 1})
                if isinstance(value, list) and values and not isinstance(values[0], bytes | str):
                    # a list of numbers is one vector of len(value) values
                    sizes = [{"dtype": type(values[0]).__name__, "size": len(values)}]
                kind = "config" if isinstance(record, ConfigRecord) else "metric"
                entries[key] = {"kind": kind, "values": sizes}
        out["records"][name] = entries
    return out


def maybe_inspect(grid):
    """The grid itself, or an InspectingGrid when FEDPOSE_INSPECT_MESSAGES names a file."""
    path = os.environ.get(INSPECT_ENV)
    return InspectingGrid(grid, path) if path else grid
