"""The in-process transport: every client trains in this process, one after another, on the
simulated clock. It is the embedded default and the reference the Flower engine must match."""

from __future__ import annotations

import time

import torch

from fedpose.engine.federation import Federation
from fedpose.fl.client import local_batches, local_train
from fedpose.fl.client_state import ClientStateStore
from fedpose.fl.faults import FaultPlan
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.observer import STATE_READ, STATE_WRITE, RunObserver


class LocalTransport:
    """Holds each client's request until the server asks for the reply, then trains it.

    Training lazily at `receive` keeps memory flat and gives the same result as training at
    `send`, because a request carries everything the client needs. A client that raises is
    reported as a failed reply, never as a crash of the server. Client state lives in files
    beside the checkpoint, so memory does not grow with the size of the federation.
    `observer` (set by the run lifecycle) sees the time spent reading and writing client state.
    """

    def __init__(self, federation: Federation, observer: RunObserver | None = None):
        self.fed = federation
        self.observer = observer or RunObserver()
        self.requests: dict[int, TrainRequest] = {}
        self.update_rows: dict[int, torch.Tensor] = {}  # client -> its row of an update matrix
        self.client_states = ClientStateStore(
            federation.cfg.run_dir / "checkpoints" / "client_state"
        )
        self.faults = FaultPlan(federation.cfg.system, federation.cfg.seed)

    def send(self, request: TrainRequest) -> None:
        self.requests[request.client_id] = request

    def receive(self, client_id: int) -> TrainReply:
        update_out = self._update_row(client_id)
        request = self.requests.pop(client_id)
        f = self.fed
        # outside the try: the runner's own storage failing is no client's fault; it stops the run
        t0 = time.perf_counter()
        client_state = self.client_states.get(client_id)
        self.observer.phase(STATE_READ, time.perf_counter() - t0)
        try:
            dataset = f.client_dataset(client_id)
            fault = self.faults.fault(request.round, client_id)
            if fault:
                return self.faults.faulty_reply(
                    fault,
                    request,
                    f.layout.slices[-1][2] if f.layout.agg_names else 0,
                    {n: request.weights[n].clone() for n in f.layout.avg_names},
                    len(dataset),
                )
            reply, state = local_train(
                f.model,
                local_batches(
                    dataset, request, f.cfg.fed, f.cfg.train.batch_size, f.cfg.data.workers
                ),
                request,
                client_state,
                f.cfg.train,
                f.layout,
                f.device,
                num_samples=len(dataset),
                update_out=update_out,
            )
        except Exception as e:  # any client failure must not stop the federation
            return TrainReply(
                client_id=client_id,
                version=request.version,
                error=f"client crashed: {type(e).__name__}: {e}",
            )
        t0 = time.perf_counter()
        self.client_states.put(client_id, state)
        self.observer.phase(STATE_WRITE, time.perf_counter() - t0)
        return reply

    def _update_row(self, client_id: int) -> torch.Tensor | None:
        """Where this client's update is written: a row of one matrix shared by the clients
        whose requests were waiting together (a synchronous round), rows in ascending client
        id, the order the server aggregates in. The server then takes that matrix as it is
        (fl/server.py: aggregate) instead of copying every update into a new one."""
        size = self.fed.layout.slices[-1][2] if self.fed.layout.agg_names else 0
        if client_id not in self.update_rows and size:
            waiting = sorted({client_id, *self.requests} - set(self.update_rows))
            matrix = torch.empty(len(waiting), size)
            self.update_rows.update(zip(waiting, matrix, strict=True))
        return self.update_rows.pop(client_id, None)

    def state_dict(self) -> dict:
        return self.client_states.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.client_states.load_state_dict(state)
