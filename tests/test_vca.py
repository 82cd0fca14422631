"""Merge rules of gossip learning (strategies/vca.py) on tensors; topologies; init helpers."""

from __future__ import annotations

import pytest
import torch

from strategies import vca
from strategies.gossip import consensus_distance, mean_state, xavier_init
from strategies.topology import build_topology, check_topology

M = 8


def xavier_states(m: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """m independent Xavier-initialised two-layer nets (weights + biases + a BN buffer)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        w1, w2 = torch.empty(256, 400), torch.empty(10, 256)
        torch.nn.init.xavier_uniform_(w1, generator=g)
        torch.nn.init.xavier_uniform_(w2, generator=g)
        out.append(
            {
                "fc1.weight": w1,
                "fc1.bias": torch.rand(256, generator=g) - 0.5,
                "fc2.weight": w2,
                "fc2.bias": torch.rand(10, generator=g) - 0.5,
                "bn.running_var": torch.rand(256, generator=g) + 0.5,
                "bn.num_batches_tracked": torch.tensor(7),
            }
        )
    return out


def var(t: torch.Tensor) -> float:
    return float(vca.layer_variance(t))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8])
def test_plain_shrinks_variance_by_beta_formula(beta: float) -> None:
    own, *rec = xavier_states(M + 1)
    out = vca.merge(own, rec, beta=beta, rule="plain")
    expected = beta**2 + (1 - beta) ** 2 / M
    for k in ("fc1.weight", "fc2.weight"):
        ratio = var(out[k]) / var(own[k])
        assert ratio == pytest.approx(expected, rel=0.08), (k, ratio, expected)
    assert expected < 0.65  # the effect is large, not a rounding artefact


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_vca_keeps_variance(beta: float) -> None:
    own, *rec = xavier_states(M + 1, seed=1)
    out = vca.merge(own, rec, beta=beta, rule="vca")
    for k in ("fc1.weight", "fc2.weight"):
        target = sum(var(r[k]) for r in rec) / M  # "auto": mean variance of the received models
        assert var(out[k]) == pytest.approx(target, rel=1e-5)
        assert var(out[k]) == pytest.approx(var(own[k]), rel=0.03)
        # the rescale is about the merged tensor's mean: the mean is unchanged
        plain = vca.merge(own, rec, beta=beta, rule="plain")
        assert float(out[k].mean()) == pytest.approx(float(plain[k].mean()), abs=1e-7)
        # and the direction of the merged tensor is kept (a positive rescale about the mean)
        a, b = out[k] - out[k].mean(), plain[k] - plain[k].mean()
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.9999


def test_beta_one_keeps_own_and_beta_zero_is_the_mean() -> None:
    own, *rec = xavier_states(4, seed=2)
    out1 = vca.merge(own, rec, beta=1.0, rule="plain")
    for k in own:
        assert torch.equal(out1[k], own[k])
    out0 = vca.merge(own, rec, beta=0.0, rule="plain")
    mean = torch.stack([r["fc1.weight"] for r in rec]).mean(0)
    assert torch.allclose(out0["fc1.weight"], mean, atol=1e-6)
    # beta = 1 under VCA "auto": the own model rescaled to the received models' mean variance
    out1v = vca.merge(own, rec, beta=1.0, rule="vca")
    t = sum(var(r["fc2.weight"]) for r in rec) / len(rec)
    assert var(out1v["fc2.weight"]) == pytest.approx(t, rel=1e-5)


def test_biases_and_bn_buffers() -> None:
    own, *rec = xavier_states(M + 1, seed=3)
    plain = vca.merge(own, rec, beta=0.5, rule="plain")
    out = vca.merge(own, rec, beta=0.5, rule="vca")
    # biases: averaged, not rescaled (default scope = weights, as the C++ code)
    assert torch.equal(out["fc1.bias"], plain["fc1.bias"])
    assert not torch.equal(out["fc1.bias"], own["fc1.bias"])
    # scope=all rescales them too (DFL_torch)
    allv = vca.merge(own, rec, beta=0.5, rule="vca", scope="all")
    t = sum(var(r["fc1.bias"]) for r in rec) / M
    assert var(allv["fc1.bias"]) == pytest.approx(t, rel=1e-5)
    # BN buffers: never averaged nor rescaled, under every rule
    for o in (plain, out, allv):
        assert torch.equal(o["bn.running_var"], own["bn.running_var"])
        assert torch.equal(o["bn.num_batches_tracked"], own["bn.num_batches_tracked"])


def test_vca_targets_self_and_follow_beta() -> None:
    own, *rec = xavier_states(5, seed=4)
    own = dict(own)
    own["fc1.weight"] = own["fc1.weight"] * 2.0  # own variance 4x the others'
    beta = 0.3
    s = vca.merge(own, rec, beta=beta, rule="vca", target="self")
    assert var(s["fc1.weight"]) == pytest.approx(var(own["fc1.weight"]), rel=1e-5)  # before merging
    f = vca.merge(own, rec, beta=beta, rule="vca", target="follow_beta")
    others = sum(var(r["fc1.weight"]) for r in rec) / len(rec)
    assert var(f["fc1.weight"]) == pytest.approx(beta * var(own["fc1.weight"]) + (1 - beta) * others, rel=1e-5)


def test_eps_under_corrects_small_variances() -> None:
    """The DFL_torch eps = 1e-4 is not small against LeNet-scale variances; the default is."""
    g = torch.Generator().manual_seed(5)
    small = torch.randn(120, 400, generator=g) * 0.0316  # var 1e-3: LeNet fc1 after a beta=0.5, m=8 merge
    target = 4e-3
    assert var(vca.rescale_to_variance(small, target)) == pytest.approx(target, rel=1e-6)
    port = var(vca.rescale_to_variance(small, target, eps=1e-4)) / target
    assert 0.9 < port < 0.95  # ~7 % short


def test_no_received_model_leaves_own_and_bad_options_fail() -> None:
    own = xavier_states(1)[0]
    for rule in vca.MERGES:
        out = vca.merge(own, [], beta=0.5, rule=rule)
        assert all(torch.equal(out[k], own[k]) for k in own)
    with pytest.raises(ValueError, match="merge"):
        vca.merge(own, [own], rule="avg")
    with pytest.raises(ValueError, match="beta"):
        vca.merge(own, [own], beta=1.5)
    with pytest.raises(ValueError, match="target"):
        vca.merge(own, [own], rule="vca", target="others")


def test_helpers_mean_consensus_xavier() -> None:
    a, b = xavier_states(2, seed=6)
    m = mean_state([a, b])
    assert torch.allclose(m["fc1.weight"], (a["fc1.weight"] + b["fc1.weight"]) / 2, atol=1e-7)
    assert consensus_distance([a, a]) == 0.0
    d = consensus_distance([a, b])
    keys = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    half = torch.cat([(a[k] - b[k]).reshape(-1).double() for k in keys]).norm() / 2
    assert d == pytest.approx(float(half), rel=1e-9)
    x = xavier_init(a, torch.Generator().manual_seed(0))
    bound = (6 / (400 + 256)) ** 0.5
    assert float(x["fc1.weight"].abs().max()) <= bound and var(x["fc1.weight"]) == pytest.approx(bound**2 / 3, rel=0.02)
    assert torch.count_nonzero(x["fc1.bias"]) == 0 and torch.equal(x["bn.running_var"], a["bn.running_var"])


@pytest.mark.parametrize(
    "cfg,degree",
    [
        ({"name": "ring"}, (2, 2)),
        ({"name": "complete"}, (19, 19)),
        ({"name": "random_regular", "degree": 4}, (4, 4)),
        ({"name": "small_world", "k": 4, "p": 0.2}, None),
        ({"name": "erdos_renyi", "p": 0.5}, None),
    ],
)
def test_topologies_seeded_connected_symmetric(cfg: dict, degree: tuple | None) -> None:
    import networkx as nx

    t1, t2 = build_topology(cfg, 20, 0), build_topology(cfg, 20, 0)
    assert t1.neighbors == t2.neighbors
    g = nx.Graph([(i, j) for i, js in t1.neighbors.items() for j in js])
    assert nx.is_connected(g) and g.number_of_nodes() == 20
    assert all(i in t1.neighbors[j] for i, js in t1.neighbors.items() for j in js)
    if degree is not None:
        assert t1.degree_stats()[1:] == degree
    if cfg["name"] in ("random_regular", "erdos_renyi", "small_world"):
        assert build_topology(cfg, 20, 1).neighbors != t1.neighbors


def test_erdos_renyi_disconnected_refused_or_redrawn() -> None:
    with pytest.raises(ValueError, match="disconnected"):
        build_topology({"name": "erdos_renyi", "p": 0.08, "connect": "refuse"}, 30, 0)
    t = build_topology({"name": "erdos_renyi", "p": 0.08, "connect": "redraw", "max_tries": 500}, 30, 0)
    assert t.draws > 1
    with pytest.raises(ValueError, match="degree"):
        check_topology({"name": "random_regular", "degree": 3}, 11)
    with pytest.raises(ValueError, match="strategy.topology.degree: not used"):
        check_topology({"name": "ring", "degree": 3}, 11)
