"""Secure aggregation in-process: CountSketch Gram estimates, the coefficients they give, and a
server loop that never holds a client's update (fl/sketch.py, fl/secure.py,
engine/secure_local.py)."""

from __future__ import annotations

import pytest
import secure_sites
import torch
from fedtiny import tiny_config
from secure_sites import AVERAGING, SeededSites

from fedpose.config import ConfigError
from fedpose.engine import runner
from fedpose.engine.runner import run_federation
from fedpose.engine.secure_local import SecureLocalTransport
from fedpose.fl.gram import gram_matrix
from fedpose.fl.messages import TrainRequest
from fedpose.fl.secure import SecureTotals, finish_round, plan_round
from fedpose.fl.sketch import count_sketch, sketch_gram
from fedpose.fl.strategies import FedAvg, FedAW, FedDyn, FedGH
from fedpose.fl.strategies.base import RoundInput


def _updates(k: int = 5, p: int = 300, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=gen)
    # correlated and conflicting directions, so PCGrad projects
    d = torch.randn(k, p, generator=gen) + torch.linspace(-1.5, 1.5, k)[:, None] * base
    return (d * 1e-3).float()


def test_injective_sketch_gives_the_exact_gram_bits():
    d = _updates()
    y = torch.stack([count_sketch(row, 512, "s3cret") for row in d])
    assert torch.equal(sketch_gram(y, d.shape[1]), gram_matrix(d))


@pytest.mark.parametrize("strategy", [FedGH(order="random", seed=3), FedGH(rescale=True), FedAW()])
def test_coefficients_from_injective_sketches_equal_the_exact_ones(strategy):
    d = _updates()
    k, p = d.shape
    counts = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0], dtype=torch.float64)
    ids = list(range(k))
    state = strategy.initial_state()
    exact = strategy.aggregate(RoundInput(d, counts, ids, k, [("w", 0, p)]), state)
    y = torch.stack([count_sketch(row, 1024, "key") for row in d])
    plan = plan_round(strategy, y, p, counts, ids, k, state)
    from fedpose.fl.gram import weighted_sum

    update = weighted_sum(d, torch.tensor(plan.coef, dtype=torch.float64))
    assert torch.equal(update, exact.update)
    assert plan.state == exact.state
    if isinstance(strategy, FedGH):
        assert plan.coef == exact.diagnostics["coefficients"]


def test_sketch_gram_is_unbiased_over_keys():
    d = _updates(k=3, p=200).double()
    m, keys = 16, 1500
    est = torch.zeros(3, 3, dtype=torch.float64)
    sq = torch.zeros(3, 3, dtype=torch.float64)
    for key in range(keys):
        y = torch.stack([count_sketch(row, m, f"k{key}") for row in d])
        g = y @ y.T
        est += g
        sq += g * g
    mean = est / keys
    se = ((sq / keys - mean * mean) / keys).sqrt()
    exact = d @ d.T
    # an unbiased estimate lies within 4 standard errors (a biased hash, e.g. without random
    # signs, is off by the colliding cross terms, far more than that)
    assert bool(((mean - exact).abs() <= 4 * se).all()), (mean - exact) / se
    # and it is an estimate: one key's matrix differs from the exact one
    assert not torch.allclose(g, exact)


def test_sketch_needs_the_secret_and_depends_on_it():
    x = _updates(k=1)[0]
    assert not torch.equal(count_sketch(x, 32, "a"), count_sketch(x, 32, "b"))
    assert torch.equal(count_sketch(x, 32, "a"), count_sketch(x.clone(), 32, "a"))
    with pytest.raises(ValueError, match="secret"):
        count_sketch(x, 32, "")


@pytest.mark.parametrize("strategy", [FedAvg(server_lr=0.7), FedDyn(alpha=0.1, server_lr=0.9)])
def test_secure_sum_gives_the_plain_update(strategy):
    from fedpose.fl.gram import weighted_sum

    counts = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)
    state = {"h": torch.full((300,), 0.01)} if isinstance(strategy, FedDyn) else {}
    for _ in range(2):  # FedDyn's second round starts from the h of the first
        d = _updates(k=3)
        plain = strategy.aggregate(RoundInput(d, counts, [0, 1, 2], 5, []), state)
        plan = plan_round(strategy, None, 300, counts, [0, 1, 2], 5, state)
        total = weighted_sum(d, torch.tensor(plan.coef, dtype=torch.float64))
        secure = finish_round(strategy, plan, SecureTotals(total, {}, [0, 1, 2]), 5)
        assert torch.equal(secure.update, plain.update)
        assert secure.state.keys() == plain.state.keys()
        state = plain.state


def test_feddyn_and_fedavg_plans_need_no_sketch():
    counts = torch.tensor([1.0, 3.0], dtype=torch.float64)
    plan = plan_round(FedAvg(server_lr=0.5), None, 10, counts, [0, 1], 2, {})
    assert plan.coef == [0.125, 0.375]
    plan = plan_round(FedDyn(alpha=0.1), None, 10, counts, [0, 1], 2, {})
    assert plan.coef == [1.0, 1.0]


class _Spy:
    """Wraps the secure transport and records everything the server loop receives from it."""

    def __init__(self, inner: SecureLocalTransport):
        self.inner = inner
        self.received: list = []

    def send(self, request):
        self.inner.send(request)

    def receive(self, client_id):
        reply = self.inner.receive(client_id)
        self.received.append(reply)
        return reply

    def secure_sum(self, client_ids, coef, avg_weights, control_coef=None):
        out = self.inner.secure_sum(client_ids, coef, avg_weights, control_coef)
        self.received.append(("sum", len(client_ids)))
        return out

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _run(tmp_path, synth_dir, name, *overrides, spy=None):
    cfg = tiny_config(tmp_path / name, synth_dir, f"name={name}", *overrides)
    factory = None
    if spy is not None:

        def factory(federation):
            spy.append(_Spy(runner.local_transport(federation)))
            return spy[-1]

    return run_federation(cfg, transport_factory=factory)


@pytest.mark.parametrize("method", ["fedgh"])
def test_secure_run_equals_the_plain_run_with_an_injective_sketch(tmp_path, synth_dir, method):
    plain = _run(tmp_path, synth_dir, "plain", f"fed.method={method}")
    spies: list[_Spy] = []
    secure = _run(
        tmp_path,
        synth_dir,
        "secure",
        f"fed.method={method}",
        "fed.secure=true",
        "fed.sketch_width=65536",  # > P: the sketch is injective, the Gram matrix exact
        "fed.sketch_secret=consortium",
        spy=spies,
    )
    for name, w in plain.weights.items():
        assert torch.equal(w, secure.weights[name]), name
    # what the server side received: no update, only counts, scalars and width-m sketches
    p = secure.layout.slices[-1][2]
    replies = [r for r in spies[0].received if not isinstance(r, tuple)]
    assert len(replies) == 2 * 4
    for r in replies:
        assert r.delta is None and r.control_delta is None and r.averaged == {}
        if method == "fedgh":
            assert r.sketch.shape == (65536,)
        else:
            assert r.sketch is None
    assert ("sum", 4) in spies[0].received
    assert all(isinstance(x, tuple) or x.sketch is None or x.sketch.numel() != p for x in replies)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fed.method=median"], "cannot run under secure aggregation"),
        (["fed.mode=async"], "synchronous rounds only"),
        (["fed.gh_per_layer=true"], "one sketch per tensor"),
        (["fed.sketch_width=0"], "fed.sketch_width"),
    ],
)
def test_secure_config_problems(tmp_path, synth_dir, overrides, message):
    from fedpose.engine.run import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(tiny_config(tmp_path, synth_dir, "fed.secure=true", *overrides))


def test_secure_fedgh_in_process_needs_the_secret(tmp_path, synth_dir):
    with pytest.raises(ValueError, match="sketch secret"):
        _run(tmp_path, synth_dir, "nosecret", "fed.secure=true")


def test_round_diagnostics_are_zero_for_an_injective_sketch_and_not_for_a_narrow_one():
    from fedpose.tools.secure_study import round_diagnostics

    d = _updates(k=4, p=400)
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    inputs = RoundInput(d, counts, [0, 1, 2, 3], 4, [("w", 0, 400)])
    strategy = FedGH()
    rows = round_diagnostics(strategy, inputs, strategy.initial_state(), [8, 512], keys=2)
    wide = [r for r in rows if r["width"] == 512]
    narrow = [r for r in rows if r["width"] == 8]
    assert all(r["cos_err_max"] == 0 and r["flip_share"] == 0 for r in wide)
    assert all(abs(r["step_cos_err"]) < 1e-12 for r in wide)
    assert any(r["cos_err_max"] > 0.01 for r in narrow)
    assert wide[0]["projections_exact"] > 0  # the updates conflict: PCGrad decisions exist


def test_pcgrad_decisions_follow_the_sign_of_the_inner_products():
    from fedpose.fl.harmonize import pcgrad_decisions

    g = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.1], [0.2, 0.1, 1.0]], dtype=torch.float64)
    hits = pcgrad_decisions(g, order="index")
    # client 0 visits 1 (conflict) then 2; client 1 visits 0 (conflict) then 2; 2 none
    assert hits.tolist() == [[True, False], [True, False], [False, False]]


@pytest.mark.parametrize("method, opt", [("fedadam", "sgd"), ("fedgh", "adam")])
def test_server_optimisers_step_on_the_secure_sum(method, opt):
    from fedpose.config import FedConfig
    from fedpose.fl.gram import weighted_sum
    from fedpose.fl.strategies import build_strategy

    fed = FedConfig(method=method, server_opt=opt, server_lr=0.1, num_clients=3)
    plain_s, secure_s = build_strategy(fed), build_strategy(fed)
    counts = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)
    plain_state, secure_state = plain_s.initial_state(), secure_s.initial_state()
    for seed in range(2):  # the second round reads the optimiser's moments
        d = _updates(k=3, seed=seed)
        plain = plain_s.aggregate(RoundInput(d, counts, [0, 1, 2], 3, [("w", 0, 300)]), plain_state)
        y = torch.stack([count_sketch(row, 1024, "key") for row in d])  # injective: exact Gram
        plan = plan_round(secure_s, y, 300, counts, [0, 1, 2], 3, secure_state)
        total = weighted_sum(d, torch.tensor(plan.coef, dtype=torch.float64))
        secure = finish_round(secure_s, plan, SecureTotals(total, {}, [0, 1, 2]), 3)
        assert torch.equal(secure.update, plain.update)
        plain_state, secure_state = plain.state, secure.state
    assert "server_opt" in secure_state


def test_secure_scaffold_passes_the_config_checks(tmp_path, synth_dir):
    from fedpose.engine.run import check_config

    check_config(tiny_config(tmp_path, synth_dir, "fed.secure=true", "fed.method=scaffold"))


def _same(a, b) -> bool:
    """Strategy states equal to the bit: tensors, numbers and dicts of them."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", list(AVERAGING))
def test_every_averaging_strategy_is_the_plain_one_under_secure_aggregation(name):
    """FedAvg, FedProx, FedDyn's server step, the server optimisers and SCAFFOLD: the in-process
    secure run (sites keep their updates, the server gets the exact sums) takes the plain run's
    steps bit for bit, and the server loop never holds an update or a control variate change."""
    layout = secure_sites.layout()
    plain = secure_sites.server(secure_sites.config(*AVERAGING[name]), SeededSites(layout))
    plain.run()
    spy = _Spy(SecureLocalTransport(SeededSites(layout), layout, None, ""))
    secure = secure_sites.server(secure_sites.config(*AVERAGING[name], "fed.secure=true"), spy)
    secure.run()

    for tensor, w in plain.weights.items():
        assert torch.equal(w, secure.weights[tensor]), tensor
    assert _same(plain.state.strategy, secure.state.strategy)
    if name.startswith("scaffold"):
        assert plain.state.strategy["c"].abs().sum() > 0  # the control variate did move
    replies = [r for r in spy.received if not isinstance(r, tuple)]
    assert len(replies) == 3 * secure_sites.ROUNDS
    assert all(
        r.delta is None and r.control_delta is None and r.sketch is None and r.averaged == {}
        for r in replies
    )
    assert spy.received.count(("sum", 3)) == secure_sites.ROUNDS


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold", "feddyn"])
def test_a_dropout_in_the_secure_sum_gives_the_survivors_step(name):
    """When a site drops out during the secure sum (fl/secure.py's finish_round), the step is
    the plain strategy's over the survivors: a round with the site refused in phase 1."""
    layout = secure_sites.layout()
    cfg = secure_sites.config(*AVERAGING[name])
    strategy_plain = secure_sites.server(cfg, SeededSites(layout)).strategy
    strategy_secure = secure_sites.server(cfg, SeededSites(layout)).strategy
    replies = [
        secure_sites.site_reply(
            TrainRequest(k, 0, 0, dict(secure_sites.tiny_net().state_dict()), 0, rule="scaffold"),
            layout,
        )
        for k in (0, 1, 3)
    ]
    counts = torch.tensor([float(r.num_samples) for r in replies], dtype=torch.float64)
    survivors = [0, 2]  # client 1 (the second reply) is lost during the sum
    deltas = torch.stack([r.delta for r in replies])
    controls = torch.stack([r.control_delta for r in replies])
    state = strategy_plain.initial_state()
    plain = strategy_plain.aggregate(
        RoundInput(
            deltas[survivors], counts[survivors], [0, 3], 4, layout.slices, controls[survivors]
        ),
        state,
    )
    plan = plan_round(strategy_secure, None, deltas.shape[1], counts, [0, 1, 3], 4, state)
    from fedpose.fl.gram import weighted_sum

    kept_coef = torch.tensor([plan.coef[i] for i in survivors], dtype=torch.float64)
    totals = SecureTotals(weighted_sum(deltas[survivors], kept_coef), {}, [0, 3])
    if plan.control_coef is not None:
        kept_control = torch.tensor([plan.control_coef[i] for i in survivors], dtype=torch.float64)
        totals.control = weighted_sum(controls[survivors], kept_control)
    secure = finish_round(strategy_secure, plan, totals, 4)
    assert torch.allclose(secure.update, plain.update, rtol=1e-6, atol=1e-9)
    assert _same(secure.state.keys(), plain.state.keys())
    for key, value in plain.state.items():
        assert torch.allclose(secure.state[key], value, rtol=1e-6, atol=1e-9), key
    if name != "feddyn":
        assert secure.diagnostics["survivor_scale"] > 1.0
