"""The federated round loop: select → send → collect → aggregate → evaluate → log → checkpoint.

The loop talks to clients only through a Transport (in-process or Flower), so both engines run
exactly this code. Replies are sorted by client id before aggregation (FedGH is order-sensitive)
and every random choice is seeded by (seed, round, client): the same config and seed give the
same numbers, and a resumed run continues bit for bit.

Synchronous mode: each round the selected clients train from the current model; the round takes
as long as its slowest client (or the timeout, when one drops out).
Asynchronous mode (FedBuff, Nguyen et al. 2022): up to `concurrency` clients train at once, each
from the version it was sent; whenever `buffer_size` (M) updates have arrived the server
aggregates them and immediately hands the freed slots new work, to the idle clients that waited
longest (ties in seeded order) or, under `utility`, by Oort's ranking. Arrival order follows the
simulated clock, so it is reproducible on every transport. A client that replied twice is in the
buffer twice, and each reply gets its own weight.

Staleness: reply k counts n_k (1 + s_k)^−a in the strategy's weights, and the strategy's update
is scaled by Σ n_k (1 + s_k)^−a / Σ n_k. For FedAvg that is FedBuff's step Σ_k (n_k/n) s(τ_k) Δ_k
((1/M) Σ s(τ_k) Δ_k with equal n_k), not renormalised: a stale buffer moves the model less.
`fed.staleness_renormalise` drops the scaling. In synchronous rounds every discount is 1.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fedpose.bounded import loads_json
from fedpose.config import FedConfig, SystemConfig
from fedpose.fl import secure
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.observer import AGGREGATION, CHECKPOINT, EVALUATION, REPLY_CHECKS, RunObserver
from fedpose.fl.params import ModelLayout, rows_of_one_matrix, unflatten_add_, weighted_average
from fedpose.fl.reply_check import (
    NORM_HISTORY,
    check_reply,
    model_norm,
    norm_problem,
    norm_reference,
)
from fedpose.fl.selection import Selector
from fedpose.fl.strategies.base import RoundInput, Strategy
from fedpose.fl.system import SystemModel
from fedpose.metrics.track import Tracker
from fedpose.model.io import field_problem, load_checkpoint, save_checkpoint, tensors_problem
from fedpose.run_dir import append_line, read_regular, write_file
from fedpose.seeding import client_seed


class Transport(Protocol):
    """How the server reaches clients: `send` starts work, `receive` waits for the reply."""

    def send(self, request: TrainRequest) -> None: ...

    def receive(self, client_id: int) -> TrainReply: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Pending:
    """A client at work in asynchronous mode."""

    client_id: int
    version: int
    seq: int  # dispatch number: seeds the client's work
    finish: float  # simulated time its reply arrives (or its timeout, when it dropped out)
    dropped: bool


@dataclass
class ServerState:
    round: int = 0  # completed rounds (sync) or aggregations (async); also the model version
    clock: float = 0.0  # simulated seconds
    strategy: dict = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    buffer: list[TrainReply] = field(default_factory=list)
    snapshots: dict[int, dict] = field(default_factory=dict)  # async: versions still in use
    dispatched: int = 0  # async: how many requests have been sent, seeds the next one
    norms: list[float] = field(default_factory=list)  # recently accepted update norms
    updates_applied: int = 0  # aggregations that changed the model
    futile: int = 0  # async: arrivals in a row that brought no usable update
    last_turn: dict[int, int] = field(default_factory=dict)  # async: client -> its last dispatch
    failed_attempts: int = 0  # sync: round attempts in which no update could be used


# The global model may grow to this multiple of the initial model's norm before the run is
# stopped as exploded: training moves a model's norm by a few times, never by 10^4
MAX_MODEL_GROWTH = 1e4


class FederationError(RuntimeError):
    """The federation cannot go on: every client failed, no update can arrive, or the model
    became non-finite. Nothing untrained or non-finite is saved."""


class FederatedServer:
    """The round loop over a Transport. It reads the `fed` and `system` sections of the config,
    the seed and the clients' batch size (the simulated time of `fed.local_steps`); `identity`
    is what its checkpoints must match to be resumed (model/io.py: run_identity)."""

    def __init__(
        self,
        fed: FedConfig,
        system: SystemConfig,
        weights: dict[str, torch.Tensor],
        layout: ModelLayout,
        strategy: Strategy,
        transport: Transport,
        client_sizes: list[int],
        evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None,
        run_dir: Path | None = None,
        *,
        seed: int = 0,
        batch_size: int = 1,
        identity: dict[str, str] | None = None,
        observer: RunObserver | None = None,
        track: list[str] | tuple[str, ...] = (),
    ):
        self.fed = fed
        self.seed = seed
        self.batch_size = batch_size
        self.identity = dict(identity or {})
        self.observer = observer or RunObserver()
        self.weights = {n: t.clone() for n, t in weights.items()}
        self.layout = layout
        self.strategy = strategy
        self.transport = transport
        self.client_sizes = client_sizes
        self.evaluate = evaluate
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.system = SystemModel(system, fed.num_clients, seed)
        self.selector = Selector(
            fed.selection,
            fed.clients_per_round,
            seed,
            fed.deadline,
            fed.utility_explore,
            fed.utility_round_time,
            fed.utility_penalty,
        )
        self.state = ServerState(strategy=strategy.initial_state())
        # the yardstick no client can move: the norm check's reference never exceeds it, and a
        # model that outgrows it by MAX_MODEL_GROWTH is stopped as exploded
        self.scale = model_norm(self.weights, layout.agg_names)
        self.model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        # observes every record right after metrics.jsonl gets it (CSV, TensorBoard)
        self.tracker = Tracker(self.run_dir, track) if self.run_dir and track else None

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observer.phase(phase, time.perf_counter() - t0)

    # ----------------------------------------------------------------------------- timing model
    def expected_time(self, client: int) -> float:
        fed = self.fed
        if fed.local_steps > 0:
            samples = fed.local_steps * self.batch_size
        else:
            samples = fed.local_epochs * self.client_sizes[client]
        return self.system.round_time(client, samples, self.model_bytes)

    def timeout(self) -> float:
        """How long the server waits for a client that never answers."""
        if self.fed.deadline > 0:
            return self.fed.deadline
        return 2.0 * max(self.expected_time(k) for k in range(self.fed.num_clients))

    def _request(
        self, client: int, version: int, seq: int, weights: dict[str, torch.Tensor]
    ) -> TrainRequest:
        return TrainRequest(
            client_id=client,
            version=version,
            round=seq,
            weights=weights,
            seed=client_seed(self.seed, seq, client),
            rule=self.strategy.client_rule,
            coef=self.strategy.client_coef,
            control=self.strategy.client_control(self.state.strategy),
        )

    # ----------------------------------------------------------------------------- aggregation
    def aggregate(self, replies: list[TrainReply], staleness: list[int]) -> dict:
        """Apply one aggregation of sound replies (sorted by client id) to the global model."""
        replies = sorted(replies, key=lambda r: r.client_id)
        a = self.fed.staleness_exponent
        samples = torch.tensor([float(r.num_samples) for r in replies], dtype=torch.float64)
        discount = torch.tensor([(1.0 + s) ** (-a) for s in staleness], dtype=torch.float64)
        counts = samples * discount
        step = 1.0
        if not self.fed.staleness_renormalise and float(samples.sum()) > 0:
            step = float(counts.sum() / samples.sum())
        if self.fed.secure:
            return self._aggregate_secure(replies, counts)
        # the in-process transport hands over a round's updates as the rows of one matrix,
        # in this order: aggregated as it is, without a copy
        deltas = rows_of_one_matrix([r.delta for r in replies])
        if deltas is None:
            # each update moves into the matrix and its reply lets go of it: the server holds
            # K + 1 updates at most, not the replies' K plus a stacked copy of K
            deltas = torch.empty(
                len(replies), replies[0].delta.numel(), dtype=replies[0].delta.dtype
            )
            for row, reply in zip(deltas, replies, strict=True):
                row.copy_(reply.delta)
                reply.delta = None
        for reply in replies:
            reply.delta = None
        controls = None
        if any(r.control_delta is not None for r in replies):  # SCAFFOLD's c_k⁺ − c_k
            controls = torch.zeros_like(deltas)
            for row, reply in zip(controls, replies, strict=True):
                if reply.control_delta is not None:
                    row.copy_(reply.control_delta)
                reply.control_delta = None
        inputs = RoundInput(
            deltas=deltas,
            counts=counts,
            client_ids=[r.client_id for r in replies],
            num_clients=self.fed.num_clients,
            slices=self.layout.slices,
            controls=controls,
        )
        t0 = time.perf_counter()
        result = self.strategy.aggregate(inputs, self.state.strategy)
        if step != 1.0:
            result.update.mul_(step)
        unflatten_add_(self.weights, self.layout, result.update)
        if self.layout.avg_names:
            packed = [r.averaged_flat for r in replies]
            self.weights.update(
                weighted_average(
                    [r.averaged for r in replies],
                    self.layout.avg_names,
                    counts.tolist(),
                    packed=None if any(p is None for p in packed) else packed,
                )
            )
        self._check_model()
        self.state.updates_applied += 1
        agg_seconds = time.perf_counter() - t0
        self.state.strategy = result.state
        diag = dict(result.diagnostics)
        diag["agg_seconds"] = agg_seconds
        if step != 1.0:
            diag["staleness_step"] = step
        return diag

    def _aggregate_secure(self, replies: list[TrainReply], counts: torch.Tensor) -> dict:
        """Secure aggregation (fl/secure.py): the replies hold counts and sketches, never an
        update; the coefficients come from the sketches, the update from the transport's
        secure sum of c_k Δ_k (over the sites still there at its end). Synchronous rounds
        only, so no staleness step."""
        t0 = time.perf_counter()
        ids = [r.client_id for r in replies]
        if len(replies) < 2:
            # the sum of one update is that update: the round passes without aggregation
            return {"weights": [], "conflict_share": None, "secure": "skipped: fewer than 2"}
        sketches = (
            torch.stack([r.sketch for r in replies]) if secure.needs_sketch(self.strategy) else None
        )
        p = self.layout.slices[-1][2] if self.layout.agg_names else 0
        plan = secure.plan_round(
            self.strategy, sketches, p, counts, ids, self.fed.num_clients, self.state.strategy
        )
        totals = self.transport.secure_sum(ids, plan.coef, plan.avg_weights, plan.control_coef)
        result = secure.finish_round(self.strategy, plan, totals, self.fed.num_clients)
        unflatten_add_(self.weights, self.layout, result.update)
        self.weights.update(totals.averaged)
        self._check_model()
        self.state.updates_applied += 1
        self.state.strategy = result.state
        diag = {**result.diagnostics, **totals.diagnostics}
        return {**diag, "secure": True, "agg_seconds": time.perf_counter() - t0}

    def _check_model(self) -> None:
        """Stop the run before the round is logged or checkpointed when the aggregated model
        is not finite or has exploded (both the plain and the secure path)."""
        # the aggregated tensors' norm doubles as their finiteness check (float32 values
        # squared in float64 cannot overflow); the other float tensors are checked in one pass
        norm = model_norm(self.weights, self.layout.agg_names)
        others = [
            w.reshape(-1)
            for n, w in self.weights.items()
            if n not in self.layout.agg_set and w.is_floating_point()
        ]
        if math.isfinite(norm) and (not others or bool(torch.isfinite(torch.cat(others)).all())):
            bad = []
        else:  # the slow path names the tensors
            bad = [
                n
                for n, w in self.weights.items()
                if w.is_floating_point() and not bool(torch.isfinite(w).all())
            ]
        if bad:
            # raised before the round is logged or checkpointed: the last good files stay
            raise FederationError(
                f"round {self.state.round + 1}: the aggregated model is not finite ({bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; {self.strategy.name}, "
                f"fed.server_lr = {self.fed.server_lr}); nothing was written"
            )
        if self.scale > 0 and norm > MAX_MODEL_GROWTH * self.scale:
            raise FederationError(
                f"round {self.state.round + 1}: the aggregated model exploded (norm {norm:.3g}, "
                f"{norm / self.scale:.3g} times the initial model's {self.scale:.3g}; "
                f"{self.strategy.name}, fed.server_lr = {self.fed.server_lr}); "
                f"nothing was written"
            )

    # ----------------------------------------------------------------------------- the loops
    def run(self, progress: Callable[[int, dict], None] | None = None) -> dict:
        """Run the rounds left; `progress` (when given: the caller's own step at the end of a
        round), then the observer's round_done see each one's record. Returns the last record."""
        if self.fed.mode == "async":
            return self._run_async(progress)
        if self.fed.mode != "sync":
            raise ValueError(f"unknown fed.mode {self.fed.mode!r}: use sync or async")
        return self._run_sync(progress)

    def _round_done(self, progress, record: dict) -> None:
        if progress:
            progress(self.state.round, record)
        self.observer.round_done(self.state.round, record)

    def _run_sync(self, progress) -> dict:
        fed = self.fed
        record: dict = {}
        while self.state.round < fed.rounds:
            t = self.state.round
            wall0 = time.perf_counter()
            for attempt in range(fed.round_retries + 1):
                selected, dropped, rejected, replies = self._sync_round(t)
                if replies or not rejected:
                    break
                self.state.failed_attempts += 1
                if attempt == fed.round_retries:
                    first = min(rejected)
                    raise FederationError(
                        f"round {t + 1}: every selected client failed "
                        f"({len(rejected)} rejected, {len(dropped)} dropped out; "
                        f"{attempt} retries, fed.round_retries); first: client {first}: "
                        f"{rejected[first]}"
                    )
                self.state.clock += self.timeout()  # the failed attempt's wait
            if replies:
                with self._timed(AGGREGATION):
                    diag = self.aggregate(replies, [0] * len(replies))
            else:
                diag = {"weights": [], "conflict_share": None, "agg_seconds": 0.0}
            self.state.round += 1
            record = self._log(
                selected, dropped, rejected, replies, [0] * len(replies), diag, wall0
            )
            self._round_done(progress, record)
        self._check_trained()
        return record

    def _sync_round(self, t: int) -> tuple[list[int], list[int], dict[int, str], list[TrainReply]]:
        """Send round t's work, collect and check the replies; advance the clock."""
        available = self.system.available(t)
        selected = self.selector.select(available, t, self.client_sizes, self.expected_time)
        dropped = [k for k in selected if self.system.drops(t, k)]
        for k in selected:
            if k not in dropped:
                self.transport.send(self._request(k, t, t, self.weights))
        arrived = [self._receive(k) for k in selected if k not in dropped]
        replies, rejected = self._accept(arrived)
        for reply in replies:
            self.selector.observe(reply.client_id, reply.train_loss, reply.train_loss_sq)
        times = [self.expected_time(r.client_id) for r in replies]
        waited = self.timeout() if (dropped or rejected) else 0.0
        self.state.clock += max(times + [waited, 0.0])
        return selected, dropped, rejected, replies

    def _receive(self, client: int) -> TrainReply:
        reply = self.transport.receive(client)
        self.observer.trained(reply)
        return reply

    def _accept(self, arrived: list[TrainReply]) -> tuple[list[TrainReply], dict[int, str]]:
        """Split replies into sound ones and {client: reason} for the refused ones."""
        with self._timed(REPLY_CHECKS):
            return self._check_replies(arrived)

    def _check_replies(self, arrived: list[TrainReply]) -> tuple[list[TrainReply], dict[int, str]]:
        rejected: dict[int, str] = {}
        sound: list[tuple[TrainReply, float]] = []
        width = self.fed.sketch_width if secure.needs_sketch(self.strategy) else None
        for reply in arrived:
            problem, norm = (
                secure.check_secure_reply(reply, width)
                if self.fed.secure
                else check_reply(reply, self.layout, self.weights)
            )
            if problem:
                rejected[reply.client_id] = problem
            else:
                sound.append((reply, norm))
        reference = norm_reference(self.state.norms, [n for _, n in sound], self.scale)
        replies = []
        for reply, norm in sound:
            problem = norm_problem(norm, reference, self.fed.max_norm_ratio)
            if problem:
                rejected[reply.client_id] = problem
            else:
                replies.append(reply)
                if math.isfinite(norm):  # secure FedAvg has no sketch, hence no norm
                    self.state.norms = (self.state.norms + [norm])[-NORM_HISTORY:]
        return replies, rejected

    def _check_trained(self) -> None:
        if self.state.updates_applied == 0:
            raise FederationError(
                f"no client update arrived in {self.state.round} rounds (every selected client "
                f"dropped out or failed); the model is untrained and was not saved"
            )

    def _run_async(self, progress) -> dict:
        fed = self.fed
        st = self.state
        record: dict = {}
        if st.round == 0 and not st.pending and not st.snapshots:
            st.snapshots[0] = {n: t.clone() for n, t in self.weights.items()}
        self._fill_async()
        wall0 = time.perf_counter()
        selected: list[int] = []
        dropped: list[int] = []
        rejected: dict[int, str] = {}
        patience = 20 * fed.num_clients * (fed.round_retries + 1)
        first_failure: str | None = None
        while st.round < fed.rounds:
            if not st.pending:
                raise FederationError("asynchronous mode: no client is available to train")
            st.pending.sort(key=lambda p: (p.finish, p.client_id))
            job = st.pending.pop(0)
            st.clock = max(st.clock, job.finish)
            selected.append(job.client_id)
            if job.dropped:
                dropped.append(job.client_id)
                accepted = []
            else:
                accepted, refused = self._accept([self._receive(job.client_id)])
                rejected.update(refused)
                for k, why in refused.items():
                    first_failure = first_failure or f"client {k}: {why}"
                for reply in accepted:
                    st.buffer.append(reply)
                    self.selector.observe(job.client_id, reply.train_loss, reply.train_loss_sq)
            st.futile = 0 if accepted else st.futile + 1
            if st.futile >= patience:
                raise FederationError(
                    f"asynchronous mode: no update can arrive: the last {st.futile} clients all "
                    f"dropped out or failed (system.dropout = {self.system.cfg.dropout}"
                    + (f"; first failure: {first_failure})" if first_failure else ")")
                )
            if len(st.buffer) >= fed.buffer_size:
                buffer = sorted(st.buffer, key=lambda r: r.client_id)
                staleness = [st.round - r.version for r in buffer]
                with self._timed(AGGREGATION):
                    diag = self.aggregate(buffer, staleness)
                st.buffer = []
                st.round += 1
                st.snapshots[st.round] = {n: t.clone() for n, t in self.weights.items()}
                self._fill_async()
                record = self._log(selected, dropped, rejected, buffer, staleness, diag, wall0)
                selected, dropped, rejected = [], [], {}
                wall0 = time.perf_counter()
                self._round_done(progress, record)
            else:
                self._fill_async()
        self._check_trained()
        return record

    def _fill_async(self) -> None:
        """Give idle clients work until `concurrency` are busy, and forget unused versions."""
        st = self.state
        busy = {p.client_id for p in st.pending}
        slots = self.fed.concurrency - len(busy)
        if slots > 0:
            idle = [k for k in self.system.available(st.dispatched) if k not in busy]
            picks = self.selector.select(
                idle,
                st.dispatched,
                self.client_sizes,
                self.expected_time,
                m=slots,
                last_turn=st.last_turn,
            )
            for k in picks:
                seq = st.dispatched
                st.dispatched += 1
                st.last_turn[k] = seq
                dropped = self.system.drops(seq, k)
                finish = st.clock + (self.timeout() if dropped else self.expected_time(k))
                st.pending.append(Pending(k, st.round, seq, finish, dropped))
                if not dropped:
                    self.transport.send(self._request(k, st.round, seq, st.snapshots[st.round]))
        in_use = {p.version for p in st.pending} | {st.round}
        st.snapshots = {v: w for v, w in st.snapshots.items() if v in in_use}

    # ----------------------------------------------------------------------------- logging
    def _log(self, selected, dropped, rejected, replies, staleness, diag, wall0) -> dict:
        fed = self.fed
        t = self.state.round
        losses = [r.train_loss for r in replies]
        counts = [r.num_samples for r in replies]
        train_loss = (
            sum(c * loss for c, loss in zip(counts, losses, strict=True)) / sum(counts)
            if replies
            else None
        )
        record = {
            "round": t,
            "method": self.strategy.name,
            "mode": fed.mode,
            "selected": sorted(selected),
            "aggregated": [r.client_id for r in replies],
            "dropped": sorted(dropped),
            "rejected": {str(k): v for k, v in sorted(rejected.items())},
            "train_loss": _finite(train_loss),
            "client_loss": {str(r.client_id): _finite(r.train_loss) for r in replies},
            "staleness": list(staleness),
            "sim_time": self.state.clock,
            "failed_attempts": self.state.failed_attempts,
            **{k: v for k, v in diag.items()},
        }
        if self.evaluate is not None and (t % max(fed.eval_every, 1) == 0 or t == fed.rounds):
            with self._timed(EVALUATION):
                record.update(self.evaluate(self.weights))
        record["wall_seconds"] = time.perf_counter() - wall0
        if self.run_dir is not None:
            append_line(self.run_dir / "metrics.jsonl", json.dumps(record))
            if self.tracker is not None:
                self.tracker.log(record)
            if t % max(fed.checkpoint_every, 1) == 0 or t == fed.rounds:
                with self._timed(CHECKPOINT):
                    self.save_checkpoint()
        return record

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        state = {
            "weights": self.weights,
            "server": self.state,
            "selector": self.selector.state_dict(),
            "transport": self.transport.state_dict(),
        }
        save_checkpoint(self.checkpoint_dir(), state, self.identity)

    def load_checkpoint(self, force: bool = False) -> tuple[bool, list[str]]:
        """Continue from the run's newest sound checkpoint: (found one, warnings)."""
        assert self.run_dir is not None
        payload, warnings = read_checkpoint(
            self.run_dir, self.identity, force, weights=self.weights, mode=self.fed.mode
        )
        if payload is None:
            return False, warnings
        self.restore(payload)
        return True, warnings

    def restore(self, payload: dict) -> None:
        """Continue from a checkpoint read by `read_checkpoint`: the model, the loop's state,
        the selector and the transport; metrics.jsonl loses the rounds after the checkpoint and
        asynchronous work in flight is sent again (so the transport must be ready)."""
        self.weights = payload["weights"]
        self.state = payload["server"]
        st = self.state
        if self.fed.mode == "sync":
            # an asynchronous checkpoint resumed in sync mode (--force): work in flight is moot
            st.pending, st.buffer, st.snapshots = [], [], {}
        elif st.round not in st.snapshots:
            # a synchronous checkpoint resumed in async mode (--force): the current model is
            # the version new work starts from
            st.snapshots[st.round] = {n: t.clone() for n, t in self.weights.items()}
        self.selector.load_state_dict(payload["selector"])
        self.transport.load_state_dict(payload["transport"])
        # metrics written after the checkpoint belong to rounds that will run again
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            keep = [
                line
                for line in read_regular(metrics).decode(errors="replace").splitlines()
                if _round_of(line) is not None and _round_of(line) <= self.state.round
            ]
            write_file(metrics, "".join(line + "\n" for line in keep))
        # asynchronous work in flight at the checkpoint is sent again, from the same version
        for job in self.state.pending:
            if not job.dropped:
                self.transport.send(
                    self._request(
                        job.client_id, job.version, job.seq, self.state.snapshots[job.version]
                    )
                )


def read_checkpoint(
    run_dir: Path,
    identity: dict[str, str],
    force: bool = False,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    mode: str = "sync",
) -> tuple[dict | None, list[str]]:
    """The newest sound server checkpoint of a run and warnings about the ones passed over;
    (None, warnings) without one. It reads only: the run folder is left as it is. With
    `weights` (the model it must fit) each checkpoint is checked against the schema
    (checkpoint_problem); one that fails counts as damaged."""
    schema = None
    if weights is not None:

        def schema(payload: dict) -> str | None:
            return checkpoint_problem(payload, weights, mode)

    return load_checkpoint(
        Path(run_dir) / "checkpoints", CHECKPOINT_CLASSES, identity, force=force, schema=schema
    )


def checkpoint_problem(payload: dict, weights: dict[str, torch.Tensor], mode: str) -> str | None:
    """What a federated checkpoint's state lacks or holds of the wrong type (None: sound);
    `weights` is the model it must fit, `mode` the run's fed.mode."""
    for key in ("weights", "server", "selector", "transport"):
        if key not in payload:
            return f"key {key!r} is missing"
    problem = tensors_problem("weights", payload["weights"], weights)
    if problem:
        return problem
    st = payload["server"]
    if not isinstance(st, ServerState):
        return f"key 'server': expected the server state, found {type(st).__name__}"
    checks = [
        field_problem("selector", payload["selector"], dict),
        field_problem("transport", payload["transport"], dict),
        field_problem("server.round", st.round, int),
        field_problem("server.clock", st.clock, (int, float)),
        field_problem("server.dispatched", st.dispatched, int),
        field_problem("server.updates_applied", st.updates_applied, int),
        field_problem("server.futile", st.futile, int),
        field_problem("server.failed_attempts", st.failed_attempts, int),
        field_problem("server.strategy", st.strategy, dict),
        field_problem("server.norms", st.norms, list),
        field_problem("server.pending", st.pending, list),
        field_problem("server.buffer", st.buffer, list),
        field_problem("server.snapshots", st.snapshots, dict),
        field_problem("server.last_turn", st.last_turn, dict),
    ]
    checks += [field_problem(f"server.norms[{i}]", n, (int, float)) for i, n in enumerate(st.norms)]
    checks += [_pending_problem(i, job, st.snapshots, mode) for i, job in enumerate(st.pending)]
    checks += [
        None if isinstance(r, TrainReply) else f"key 'server.buffer[{i}]': expected a client reply"
        for i, r in enumerate(st.buffer)
    ]
    checks += [
        tensors_problem(f"server.snapshots[{v}]", snapshot, weights)
        for v, snapshot in st.snapshots.items()
    ]
    return next((p for p in checks if p), None)


def _pending_problem(i: int, job: object, snapshots: dict, mode: str) -> str | None:
    if not isinstance(job, Pending) or isinstance(job.version, bool):
        return f"key 'server.pending[{i}]': expected a pending job"
    if mode == "async" and job.version not in snapshots:
        return f"key 'server.pending[{i}]': version {job.version!r} has no snapshot"
    return None


CHECKPOINT_CLASSES = {"ServerState": ServerState, "Pending": Pending, "TrainReply": TrainReply}


def _round_of(line: str) -> int | None:
    """The round of one metrics.jsonl line; None for a line a kill left torn or damaged."""
    try:
        record = loads_json(line, "metrics.jsonl")
    except ValueError:
        return None
    value = record.get("round") if isinstance(record, dict) else None
    return value if isinstance(value, int) else None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
