"""Every random stream of a run, named. Each is a pure function of the run seed and the keys that
identify one draw (round, client, epoch, item), so a run replays and resumes bit for bit.

A stream id is appended to the seed so that two purposes never share random numbers; the values
are arbitrary but fixed: changing one changes every result that depends on it.
"""

from __future__ import annotations

import numpy as np

# the per-client speeds and bandwidths of the simulated system (drawn once per run)
SYSTEM_PROFILE = 7001
# whether a client is available in a round, and whether a selected client drops out
AVAILABILITY = 1
DROPOUT = 2
# which of the available clients train in a round (or async dispatch)
SELECTION = 9001
# the label-skew and quantity-skew partitions
DIRICHLET_PARTITION = 1
QUANTITY_PARTITION = 2
# the equal subsets of each attribute value when clients are a multiple of the values
ATTRIBUTE_SUBSETS = 4
# the validation records held out of each client's training records (data.val_fraction)
VALIDATION = 3
# FedGH's random visit order: one seed per (run seed, round), spaced by a prime so that runs with
# neighbouring seeds never share an order
FEDGH_ORDER_STRIDE = 1_000_003


def stream(seed: int, stream_id: int, *keys: int) -> np.random.Generator:
    """The generator of one named stream for one draw (e.g. round, client)."""
    return np.random.default_rng([seed, stream_id, *keys])


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """A seed per (run seed, round, client): drives a client's data order and augmentation,
    reproducible without carrying RNG state."""
    return int(np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0])


def loader_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of a data loader in one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation of dataset item `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index])


def fedgh_order_seed(seed: int, round_: int) -> int:
    """A fresh, reproducible FedGH visit order every round."""
    return seed * FEDGH_ORDER_STRIDE + round_
