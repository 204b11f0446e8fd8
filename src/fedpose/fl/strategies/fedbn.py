"""FedBN (Li et al. 2021): every BatchNorm module stays on its client; the server is FedAvg.

The server already leaves BatchNorm tensors out of the deltas when `keep_bn_local` is set, so
the aggregation itself is FedAvg over the remaining parameters.
"""

from __future__ import annotations

from fedpose.fl.strategies.fedavg import FedAvg


class FedBN(FedAvg):
    name = "fedbn"
    keep_bn_local = True
