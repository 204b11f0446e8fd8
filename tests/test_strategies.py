"""Server strategies against hand computations and against each other."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpose.config import FedConfig
from fedpose.fl.harmonize import harmonize
from fedpose.fl.strategies import STRATEGY_NAMES, build_strategy
from fedpose.fl.strategies.base import RoundInput


def _inputs(deltas, counts, ids=None, m=4, slices=None) -> RoundInput:
    deltas = torch.as_tensor(deltas, dtype=torch.float32)
    k, p = deltas.shape
    return RoundInput(
        deltas=deltas,
        counts=torch.as_tensor(counts, dtype=torch.float64),
        client_ids=list(range(k)) if ids is None else ids,
        num_clients=m,
        slices=slices if slices is not None else [("w", 0, p)],
    )


def _strategy(method: str, **kw):
    return build_strategy(FedConfig(method=method, **kw))


def _random_inputs(k=5, p=64, seed=0, **kw) -> RoundInput:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(k, p, generator=gen)
    counts = torch.randint(1, 50, (k,), generator=gen).double()
    return _inputs(d, counts, **kw)


def test_fedavg_is_the_weighted_mean():
    inp = _random_inputs()
    agg = _strategy("fedavg").aggregate(inp, {})
    n = inp.counts / inp.counts.sum()
    torch.testing.assert_close(agg.update, (n[:, None] * inp.deltas.double()).sum(0).float())
    assert agg.diagnostics["weights"] == pytest.approx(n.tolist())


def _fedadp_by_hand(deltas, counts, thetas_before, alpha=5.0):
    n = sum(counts)
    bar = [sum(c / n * d[i] for c, d in zip(counts, deltas, strict=True)) for i in range(2)]
    psi_raw, means = [], []
    for d, c, (mean, seen) in zip(deltas, counts, thetas_before, strict=True):
        cos = (d[0] * bar[0] + d[1] * bar[1]) / (math.hypot(*d) * math.hypot(*bar))
        theta = math.acos(cos)
        seen += 1
        mean += (theta - mean) / seen
        means.append([mean, seen])
        f = alpha * (1 - math.exp(-math.exp(-alpha * (mean - 1))))
        psi_raw.append(c * math.exp(f))
    return [x / sum(psi_raw) for x in psi_raw], means


def test_fedaw_weights_by_hand_over_two_rounds():
    strat = _strategy("fedaw")
    state = strat.initial_state()
    d1, c1 = [[1.0, 0.0], [0.0, 1.0]], [1.0, 3.0]
    agg = strat.aggregate(_inputs(d1, c1, ids=[0, 1]), state)
    psi1, means1 = _fedadp_by_hand(d1, c1, [[0.0, 0], [0.0, 0]])
    assert agg.diagnostics["weights"] == pytest.approx(psi1)
    assert agg.state["theta"]["0"] == pytest.approx(means1[0])
    # round 2: client 0 again (its running mean averages both rounds) and a new client 2
    d2, c2 = [[1.0, 1.0], [-1.0, 2.0]], [2.0, 2.0]
    agg2 = strat.aggregate(_inputs(d2, c2, ids=[0, 2]), agg.state)
    psi2, means2 = _fedadp_by_hand(d2, c2, [means1[0], [0.0, 0]])
    assert agg2.diagnostics["weights"] == pytest.approx(psi2)
    assert agg2.state["theta"]["0"] == pytest.approx(means2[0])
    assert agg2.state["theta"]["0"][1] == 2
    assert agg2.state["theta"]["1"] == pytest.approx(means1[1])  # absent clients keep theirs
    expected = sum(p * torch.tensor(d) for p, d in zip(psi2, d2, strict=True))
    torch.testing.assert_close(agg2.update, expected.float())
    json.dumps(agg2.state)


def test_feddyn_by_hand():
    strat = _strategy("feddyn", dyn_alpha=0.5)
    assert strat.client_rule == "dyn"
    # m = 4, α = 0.5. Round 1: Σ Δ = (4, 6); h = −0.5/4 (4, 6) = (−0.5, −0.75)
    # update = (4, 6)/2 − h/α = (2, 3) + (1, 1.5) = (3, 4.5)
    agg = strat.aggregate(_inputs([[1, 2], [3, 4]], [1, 1], m=4), strat.initial_state())
    torch.testing.assert_close(agg.state["h"], torch.tensor([-0.5, -0.75]))
    torch.testing.assert_close(agg.update, torch.tensor([3.0, 4.5]))
    # Round 2: Σ Δ = (2, 2); h = (−0.75, −1.0); update = (1, 1) + (1.5, 2.0) = (2.5, 3.0)
    agg = strat.aggregate(_inputs([[0, 2], [2, 0]], [5, 1], m=4), agg.state)
    torch.testing.assert_close(agg.state["h"], torch.tensor([-0.75, -1.0]))
    torch.testing.assert_close(agg.update, torch.tensor([2.5, 3.0]))


def test_fedgh_noproj_equals_fedaw():
    aw, gh = _strategy("fedaw"), _strategy("fedgh-noproj")
    s_aw, s_gh = aw.initial_state(), gh.initial_state()
    for seed in range(2):
        inp = _random_inputs(seed=seed)
        a, b = aw.aggregate(inp, s_aw), gh.aggregate(inp, s_gh)
        s_aw, s_gh = a.state, b.state
        torch.testing.assert_close(a.update, b.update)
        assert a.diagnostics["weights"] == pytest.approx(b.diagnostics["weights"])
        assert a.diagnostics["conflict_share"] == b.diagnostics["conflict_share"]


@pytest.mark.parametrize("variant", ["pcgrad", "symmetric"])
def test_fedgh_noaw_is_harmonize_with_sample_weights(variant):
    inp = _random_inputs(k=6)
    strat = _strategy("fedgh-noaw", gh_variant=variant)
    agg = strat.aggregate(inp, strat.initial_state())
    n = inp.counts / inp.counts.sum()
    ref = harmonize(inp.deltas, n, variant=variant, order="random", seed=0)  # round 0, seed 0
    torch.testing.assert_close(agg.update, ref)
    assert agg.diagnostics["weights"] == pytest.approx(n.tolist())


def test_fedgh_direct_equals_gram():
    for extra in ({}, {"gh_per_layer": True}, {"gh_rescale": True}, {"gh_variant": "symmetric"}):
        inp = _random_inputs(k=6, slices=[("a", 0, 20), ("b", 20, 64)])
        fast = _strategy("fedgh", gh_method="gram", **extra)
        slow = _strategy("fedgh", gh_method="direct", **extra)
        a = fast.aggregate(inp, fast.initial_state())
        b = slow.aggregate(inp, slow.initial_state())
        torch.testing.assert_close(a.update, b.update, rtol=1e-5, atol=1e-6)


def _two_layer_inputs():
    # layer a (2 columns): the clients conflict; layer b (2 columns): they agree, strongly
    d = [[1.0, 0.0, 10.0, 10.0], [-1.0, 1.0, 10.0, 9.0]]
    return _inputs(d, [1, 1], slices=[("a", 0, 2), ("b", 2, 4)])


def test_per_layer_differs_from_whole_model():
    inp = _two_layer_inputs()
    whole = _strategy("fedgh-noaw", gh_order="index")
    layer = _strategy("fedgh-noaw", gh_order="index", gh_per_layer=True)
    a = whole.aggregate(inp, whole.initial_state())
    b = layer.aggregate(inp, layer.initial_state())
    mean = inp.deltas.mean(0)
    torch.testing.assert_close(a.update, mean)  # whole model: no conflict, plain mean
    assert not torch.allclose(b.update, mean)
    # per layer = each tensor's columns harmonized on their own with the same weights
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    ref = torch.cat([harmonize(inp.deltas[:, s:e], w, order="index") for s, e in ((0, 2), (2, 4))])
    torch.testing.assert_close(b.update, ref)
    torch.testing.assert_close(b.update[:2], torch.tensor([0.25, 0.75]))  # the hand example
    assert a.diagnostics["conflict_share"] == 0.0


@pytest.mark.parametrize("per_layer", [False, True])
def test_rescale_restores_the_unprojected_norm(per_layer):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, generator=gen)
    d = torch.stack([base + 2 * torch.randn(64, generator=gen) for _ in range(5)])
    d[0] = -d[1] + 0.1 * torch.randn(64, generator=gen)  # make sure something gets projected
    inp = _inputs(d, [1, 2, 3, 4, 5], slices=[("a", 0, 30), ("b", 30, 64)])
    plain = _strategy("fedgh", gh_per_layer=per_layer)
    scaled = _strategy("fedgh", gh_per_layer=per_layer, gh_rescale=True)
    aw = _strategy("fedaw")
    u_plain = plain.aggregate(inp, plain.initial_state()).update
    u_scaled = scaled.aggregate(inp, scaled.initial_state()).update
    u_aw = aw.aggregate(inp, aw.initial_state()).update
    assert abs(float(u_plain.norm()) - float(u_aw.norm())) > 1e-3  # the projection changed it
    assert float(u_scaled.norm()) == pytest.approx(float(u_aw.norm()), rel=1e-5)
    cos = float(u_scaled @ u_plain / (u_scaled.norm() * u_plain.norm()))
    if not per_layer:
        assert cos == pytest.approx(1.0, abs=1e-6)  # same direction, only the length changes


def test_server_lr_scales_every_update():
    inp = _random_inputs()
    for name in STRATEGY_NAMES:
        one, half = _strategy(name), _strategy(name, server_lr=0.5)
        a = one.aggregate(inp, one.initial_state()).update
        b = half.aggregate(inp, half.initial_state()).update
        torch.testing.assert_close(b, 0.5 * a, msg=name)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_single_client_and_zero_updates_give_no_nan(name):
    for deltas, counts in (([[1.0, -2.0, 3.0]], [4.0]), ([[0.0] * 3, [0.0] * 3], [1.0, 2.0])):
        strat = _strategy(name)
        agg = strat.aggregate(_inputs(deltas, counts), strat.initial_state())
        assert torch.isfinite(agg.update).all()
        diag = json.loads(json.dumps(agg.diagnostics))  # JSON-serialisable
        assert len(diag["weights"]) == len(deltas)
        assert all(math.isfinite(x) for x in diag["weights"])
    # FedDyn adds −h/α even for one client; clipping shortens it to fed.clip_norm
    # (the adaptive server optimisers normalise the step coordinate by coordinate)
    if name not in ("feddyn", "fedavg-clip", "fedadam", "fedyogi", "fedadagrad"):
        one = strat.aggregate(_inputs([[1.0, -2.0]], [3.0]), strat.initial_state()).update
        assert one.tolist() == pytest.approx([1.0, -2.0])


def test_fedgh_diagnostics():
    inp = _inputs([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]], [1, 1, 1])
    strat = _strategy("fedgh")
    diag = strat.aggregate(inp, strat.initial_state()).diagnostics
    assert diag["conflict_share"] == pytest.approx(1 / 3)
    cos = torch.tensor(diag["cosine"])
    assert cos.shape == (3, 3)
    assert cos[0, 1] == pytest.approx(-1 / math.sqrt(2))
    assert sum(diag["weights"]) == pytest.approx(1.0)


def test_build_strategy_names():
    expected = {
        "fedavg": ("plain", False),
        "fedprox": ("prox", False),
        "fedbn": ("plain", True),
        "feddyn": ("dyn", False),
        "fedaw": ("plain", False),
        "fedgh": ("plain", False),
        "fedgh-noproj": ("plain", False),
        "fedgh-noaw": ("plain", False),
        "fedavg-clip": ("plain", False),
        "median": ("plain", False),
        "trimmed-mean": ("plain", False),
        "fedavgm": ("plain", False),
        "fedadam": ("plain", False),
        "fedyogi": ("plain", False),
        "fedadagrad": ("plain", False),
        "scaffold": ("scaffold", False),
    }
    assert set(expected) == set(STRATEGY_NAMES)
    for name, (rule, bn_local) in expected.items():
        strat = _strategy(name)
        assert strat.name == name
        assert (strat.client_rule, strat.keep_bn_local) == (rule, bn_local)
    assert _strategy("fedprox", prox_mu=0.3).mu == 0.3
    with pytest.raises(ValueError, match="fedavg, fedprox, fedbn, feddyn, fedaw, fedgh"):
        _strategy("fedsgd")
    with pytest.raises(ValueError, match="variant"):
        _strategy("fedgh", gh_variant="mgda")


def test_fedgh_update_norms_and_layer_conflicts():
    # two tensors: on "a" clients 0 and 1 pull apart, on "b" all three agree
    deltas = [[1.0, 0.0, 1.0, 1.0], [-1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 0.5]]
    slices = [("a", 0, 2), ("b", 2, 4)]
    inp = _inputs(deltas, [1, 1, 1], slices=slices)
    strat = _strategy("fedgh", gh_layer_stats=True)
    diag = strat.aggregate(inp, strat.initial_state()).diagnostics
    norms = torch.tensor(deltas).norm(dim=1).tolist()
    assert diag["update_norms"] == pytest.approx(norms)
    layers = diag["layer_conflict"]
    assert list(layers) == ["a", "b"]
    assert layers["a"]["conflict_share"] == pytest.approx(1 / 3)
    assert layers["b"]["conflict_share"] == 0.0
    assert layers["a"]["norms"] == pytest.approx([1.0, 1.0, 1.0])
    assert layers["b"]["norms"] == pytest.approx([math.sqrt(2), math.sqrt(5), math.sqrt(1.25)])
    # the statistics are only logged: the aggregate is the same without them
    plain = _strategy("fedgh")
    assert torch.equal(
        plain.aggregate(inp, plain.initial_state()).update,
        strat.aggregate(inp, strat.initial_state()).update,
    )
    assert "layer_conflict" not in plain.aggregate(inp, plain.initial_state()).diagnostics
