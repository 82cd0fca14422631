"""FedAU and its baselines: the interval estimator, each aggregation rule, the strategies'
wiring, end-to-end equivalences, and a fixed-seed experiment showing the paper's effect."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsim.data.partition import label_dirichlet_indices
from fedsim.participation import Bernoulli, label_correlated_from_histograms
from fedsim.seeding import np_rng
from strategies.common import RoundUpdates
from strategies.fedau import (
    MIFA,
    AvgAll,
    AvgParticipating,
    FedAU,
    FedVarp,
    IntervalEstimator,
    KnownProb,
    average_all,
    average_participating,
    fedau_direction,
    fedvarp_direction,
    known_prob_direction,
    mifa_direction,
)

# --- the estimator -------------------------------------------------------------------------------


def _run_estimator(indicators: np.ndarray, cutoff=None) -> np.ndarray:
    """Weights read at every round (before observing it), for a [T, N] participation matrix."""
    est = IntervalEstimator(indicators.shape[1], cutoff)
    out = []
    for row in indicators:
        out.append(est.weights())
        est.observe(row)
    return np.array(out)


def test_estimator_converges_to_inverse_p_under_bernoulli():
    p = np.array([0.05, 0.1, 0.25, 0.5, 1.0])
    indicators = np_rng(0, "test-est").random((20000, len(p))) < p
    w = _run_estimator(indicators)[-1]
    assert np.allclose(w, 1 / p, rtol=0.1), w
    assert w[-1] == 1.0  # always there: every interval is 1


def test_first_participation_gets_weight_one_then_the_mean_interval():
    seq = np.array([0, 0, 0, 1, 0, 1, 1, 0], dtype=bool)[:, None]
    w = _run_estimator(seq)[:, 0]
    # rounds 1-4 (incl. the first participation at round 4): 1; interval 4 is recorded at round 4,
    # used from round 5; then intervals 2 and 1 -> means 3 and 7/3.
    assert w.tolist() == pytest.approx([1, 1, 1, 1, 4, 4, 3, 7 / 3])


def test_weight_does_not_depend_on_the_current_round():
    base = np_rng(1, "t").random((50, 4)) < 0.3
    flipped = base.copy()
    flipped[-1] = ~flipped[-1]
    assert np.array_equal(_run_estimator(base)[-1], _run_estimator(flipped)[-1])


def test_cutoff_caps_the_interval():
    never = np.zeros((30, 1), dtype=bool)
    w = _run_estimator(never, cutoff=10)[:, 0]
    assert w[:10].tolist() == [1.0] * 10 and np.all(w[10:] == 10.0)  # intervals of exactly K
    assert np.all(_run_estimator(never)[:, 0] == 1.0)  # K = inf: nothing is ever recorded
    rare = np_rng(2, "t").random((5000, 3)) < np.array([0.01, 0.02, 0.5])
    capped = _run_estimator(rare, cutoff=20)
    assert capped.max() <= 20
    assert capped[-1, 0] < 0.5 * (1 / 0.01)  # biased low for rare clients, bounded
    assert capped[-1, 2] == pytest.approx(_run_estimator(rare)[-1, 2], rel=0.05)  # frequent: unaffected


def _authors_reference(indicators: np.ndarray, k: float) -> np.ndarray:
    """IBM/fedau main.py's list-of-intervals bookkeeping, per client, as a reference."""
    t, n = indicators.shape
    out = np.ones((t, n))
    for c in range(n):
        cnt, intervals = 0, []
        for r in range(t):
            out[r, c] = np.mean(intervals) if intervals else 1.0
            if indicators[r, c]:
                intervals.append(cnt + 1)
                cnt = 0
            else:
                cnt += 1
                if cnt >= k:
                    intervals.append(cnt)
                    cnt = 0
    return out


@pytest.mark.parametrize("k", [math.inf, 1, 3, 7])
def test_estimator_matches_the_authors_bookkeeping(k):
    ind = np_rng(3, "t", k).random((300, 6)) < np.array([0.02, 0.1, 0.2, 0.4, 0.7, 1.0])
    assert np.allclose(_run_estimator(ind, None if math.isinf(k) else k), _authors_reference(ind, k))


def test_bad_cutoff_is_rejected():
    with pytest.raises(ValueError, match=r"strategy\.cutoff"):
        FedAU(cutoff=0)
    with pytest.raises(ValueError, match=r"strategy\.global_lr"):
        AvgAll(global_lr=0)


# --- directions ------------------------------------------------------------------------------------

U = np.array([[1.0, 2.0], [3.0, -2.0], [5.0, 0.0]])


def test_simple_directions():
    assert np.allclose(fedau_direction(U, np.array([1.0, 2.0, 3.0]), 10), (U[0] + 2 * U[1] + 3 * U[2]) / 10)
    assert np.allclose(average_participating(U), U.mean(0))
    assert np.allclose(average_participating(np.zeros((0, 2))), 0.0)
    assert np.allclose(average_all(U, 6), U.sum(0) / 6)
    assert np.allclose(
        known_prob_direction(U, np.array([0.5, 0.25, 1.0]), 4), (2 * U[0] + 4 * U[1] + U[2]) / 4
    )
    # FedAU with unit weights and everyone present is the unweighted mean (FedAvg, equal weights)
    assert np.allclose(fedau_direction(U, np.ones(3), 3), U.mean(0))


def test_mifa_keeps_latest_updates_and_steps_every_round():
    mem = np.zeros((4, 2))
    d1 = mifa_direction(mem, np.array([0, 2]), U[:2])
    assert np.allclose(d1, (U[0] + U[1]) / 4)
    d2 = mifa_direction(mem, np.array([2]), U[2:])  # client 2 overwritten, client 0 kept
    assert np.allclose(d2, (U[0] + U[2]) / 4)
    d3 = mifa_direction(mem, np.array([], dtype=int), np.zeros((0, 2)))  # nobody: still steps
    assert np.allclose(d3, d2)


def test_fedvarp_semantics():
    mem = np.zeros((4, 2))
    d1 = fedvarp_direction(mem, np.array([0, 1]), U[:2])
    assert np.allclose(d1, U[:2].mean(0))  # ybar = 0, stored y = 0
    assert np.allclose(mem[:2], U[:2])
    new = np.array([[0.0, 1.0]])
    d2 = fedvarp_direction(mem, np.array([1]), new)
    ybar = (U[0] + U[1]) / 4
    assert np.allclose(d2, ybar + (new[0] - U[1]))
    assert np.allclose(mem[1], new[0])
    assert np.allclose(fedvarp_direction(mem, np.array([], dtype=int), np.zeros((0, 2))), 0.0)


# --- strategy wiring -------------------------------------------------------------------------------


class _FakeGrid:
    """What bind_harness reads: nodes, node -> partition, the participation model."""

    def __init__(self, n: int, probs: np.ndarray | None = None) -> None:
        self.nodes = [1000 + 7 * i for i in range(n)]
        self.participation = SimpleNamespace(probabilities=lambda: probs, cfg=SimpleNamespace(name="fake"))

    def all_node_ids(self) -> list[int]:
        return list(self.nodes)

    def pid(self, node: int) -> int:
        return (node - 1000) // 7


def _bound(cls, n: int, probs=None, **kw):
    s = cls(**kw)
    s.bind_harness(_FakeGrid(n, probs))
    return s


def _step(strategy, x: np.ndarray, pids: list[int], updates: np.ndarray) -> np.ndarray:
    strategy.global_vec = x.copy()
    ru = RoundUpdates([1000 + 7 * p for p in pids], updates, np.ones(len(pids)), [])
    return strategy.aggregate_updates(1, ru)


def test_fedau_strategy_reads_weights_before_observing_and_maps_partitions():
    s = _bound(FedAU, 3, global_lr=2.0)
    x = np.zeros(2)
    x1 = _step(s, x, [2], U[:1])  # round 1: weight 1
    assert np.allclose(x1, 2.0 * U[0] / 3)
    _step(s, x, [0], U[:1])  # round 2
    x3 = _step(s, x, [2], U[1:2])  # round 3: client 2's recorded interval is 1 -> weight 1
    assert np.allclose(x3, 2.0 * U[1] / 3)
    x4 = _step(s, x, [0, 2], U[:2])  # round 4: client 0's interval 2; client 2's intervals 1, 2
    assert s.last_weights == {0: 2.0, 2: 1.5}
    assert np.allclose(x4, 2.0 * (2 * U[0] + 1.5 * U[1]) / 3)


def test_known_prob_reads_p_from_the_harness():
    s = _bound(KnownProb, 3, probs=np.array([0.5, 0.25, 0.1]))
    assert np.allclose(_step(s, np.ones(2), [1, 2], U[:2]), 1 + (U[0] / 0.25 + U[1] / 0.1) / 3)
    with pytest.raises(ValueError, match="no probabilities"):
        _bound(KnownProb, 3, probs=None)


def test_memory_strategies_keep_n_by_d_state():
    for cls in (MIFA, FedVarp):
        s = _bound(cls, 5)
        _step(s, np.zeros(2), [1, 3], U[:2])
        assert s.memory.shape == (5, 2) and np.allclose(s.memory[[1, 3]], U[:2])


# --- end to end ------------------------------------------------------------------------------------


def _final_state(run, *ov, name):
    _, rows, run_dir = run(*ov, "client.steps=2", name=name)
    return torch.load(run_dir / "model.pt"), rows


def test_full_participation_fedau_equals_unweighted_fedavg(run):
    """With everyone every round all weights are 1: x + eta_g (1/N) sum_n Delta_n, i.e. FedAvg with
    equal client weights (Flower's FedAvg weighted by a key that is equal for all clients:
    train_steps under a fixed step count), and the same as averaging over participants."""
    fedau, _ = _final_state(run, "participation=full", "strategy=fedau", name="fedau")
    avgp, _ = _final_state(run, "participation=full", "strategy=avg_participating", name="avgp")
    fedavg, _ = _final_state(
        run, "participation=full", "+strategy.weighted_by_key=train_steps", name="fedavg"
    )
    for k in fedau:
        assert torch.allclose(fedau[k], avgp[k], atol=1e-6)
        assert torch.allclose(fedau[k], fedavg[k], atol=1e-5)


def test_known_prob_with_constant_p_is_avg_all_with_a_larger_step(run):
    common = ("participation=bernoulli", "participation/probs=constant", "participation.probs.p=0.5")
    kp, rows = _final_state(run, *common, "strategy=known_prob", name="kp")
    aa, _ = _final_state(run, *common, "strategy=avg_all", "strategy.global_lr=2.0", name="aa")
    assert sum(r["participants"] for r in rows) < 4 * 3  # some clients sat out
    for k in kp:
        assert torch.allclose(kp[k], aa[k], atol=1e-6)


MARKOV = ("participation=markov", "participation/probs=constant", "participation.probs.p=0.5", "participation.q=0.5",
          "client.num_threads=1")


def test_strategies_run_under_markov_participation(run):
    """3 rounds of 4 clients under Markov participation (participants 3, 2, 2 with seed 0).

    * FedAU's weights are all 1 in rounds 1-3: a client's weight is the mean of its recorded
      intervals, and its first recorded interval is cnt + 1 = 1 (the count starts at 0), so
      FedAU (K = inf and K = 50) must equal x + (1/N) sum_S Delta_n, i.e. ``avg_all`` with
      ``global_lr=1`` (the N divisor, not |S|), and differ from ``avg_participating``;
    * MIFA and FedVarp learn (> 0.5 on digits; chance 0.1) and differ from averaging over the
      participants (their memory of absent clients' updates enters the step).
    """
    res = {}
    for name, extra in [("fedau", []), ("fedau_k50", []), ("avg_all", ["strategy.global_lr=1.0"]),
                        ("avg_participating", []), ("mifa", []), ("fedvarp", [])]:
        summary, rows, run_dir = run(*MARKOV, f"strategy={name}", *extra, name=name)
        assert [r["participants"] for r in rows] == [3, 2, 2]  # partial participation every round
        res[name] = (summary, torch.load(run_dir / "model.pt"))

    def gap(a, b):
        return max(float((res[a][1][k] - res[b][1][k]).abs().max()) for k in res[a][1])

    assert gap("fedau", "avg_all") < 1e-6 and gap("fedau_k50", "avg_all") < 1e-6
    assert gap("fedau", "avg_participating") > 1e-2
    for name in ("fedau", "mifa", "fedvarp"):
        assert res[name][0]["final_accuracy"] > 0.5, (name, res[name][0]["final_accuracy"])
    for name in ("mifa", "fedvarp"):
        assert gap(name, "avg_participating") > 1e-3, name


# --- the paper's effect ----------------------------------------------------------------------------


def _gaussian_mixture(seed: int, n: int = 6000, d: int = 10, classes: int = 10, sep: float = 0.6):
    rng = np_rng(seed, "test-gmm")
    means = rng.normal(0, sep, (classes, d))
    y = rng.integers(0, classes, n)
    x = means[y] + rng.normal(0, 1, (n, d))
    yte = np.repeat(np.arange(classes), 200)
    xte = means[yte] + rng.normal(0, 1, (len(yte), d))
    ones = lambda a: np.hstack([a, np.ones((len(a), 1))])  # noqa: E731
    return ones(x), y, ones(xte), yte


def simulate(
    strategy_cls, seed: int, clients: int = 60, rounds: int = 200, lr: float = 0.05, **kw
) -> np.ndarray:
    """Test accuracy per round of softmax regression trained federatedly with ``strategy_cls``.

    FedAU's set-up in miniature: per-client label mixes ~ Dir(0.1), p_n from FedAU's
    label-correlated scheme (alpha_p = 0.1, p_mean = 0.1, p_min = 0.02), Bernoulli
    participation, 5 local SGD steps of batch 16. The participation model, partitioner and the
    strategy objects are fedsim's own; only local training is vectorised here (numpy), so the
    whole run takes well under a second.
    """
    x, y, xte, yte = _gaussian_mixture(seed)
    parts = label_dirichlet_indices(y, clients, 0.1, seed)
    sizes = np.array([len(p) for p in parts])
    padded = np.zeros((clients, sizes.max()), dtype=np.int64)
    for i, p in enumerate(parts):
        padded[i, : len(p)] = p
    hist = np.stack([np.bincount(y[p], minlength=10) for p in parts])
    probs = label_correlated_from_histograms(hist, 0.1, 0.1, 0.02, np_rng(seed, "test-m"))
    cfg = SimpleNamespace(name="bernoulli", probs={"name": "explicit", "values": probs.tolist()})
    part = Bernoulli(cfg, clients, seed)
    strategy = _bound(strategy_cls, clients, probs=probs, **kw)
    w, eye, accs = np.zeros((x.shape[1], 10)), np.eye(10), []
    for r in range(1, rounds + 1):
        idx = np.asarray(part.active(r), dtype=np.int64)
        local = np.repeat(w[None], len(idx), 0)
        rng = np_rng(seed, "test-batches", r)
        for _ in range(5):
            b = padded[idx[:, None], (rng.random((len(idx), 16)) * sizes[idx][:, None]).astype(np.int64)]
            z = np.einsum("kbd,kdc->kbc", x[b], local)
            pr = np.exp(z - z.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            local -= lr * np.einsum("kbd,kbc->kdc", x[b], pr - eye[y[b]]) / 16
        strategy.global_vec = w.ravel().copy()
        ru = RoundUpdates(
            [1000 + 7 * int(p) for p in idx], (local - w).reshape(len(idx), w.size), np.ones(len(idx)), []
        )
        w = strategy.aggregate_updates(r, ru).reshape(w.shape)
        accs.append(float(((xte @ w).argmax(1) == yte).mean()))
    return np.array(accs)


def test_fedau_beats_averaging_over_participants_under_label_correlated_participation():
    """Wang & Ji's claim in miniature: when p_n is correlated with the label mix, averaging over
    participants optimises the p-weighted objective and loses test accuracy on a balanced test
    set; FedAU's 1/p_n estimates remove the bias and come close to the oracle (true 1/p_n).
    Measured on the mean test accuracy of the last 50 rounds, for two seeds."""
    last = {}
    for cls in (FedAU, AvgParticipating, KnownProb):
        last[cls.__name__] = np.array([simulate(cls, seed)[-50:].mean() for seed in (0, 2)])
    gain = last["FedAU"] - last["AvgParticipating"]
    assert np.all(gain > 0.01), last  # every seed
    assert gain.mean() > 0.03, last
    assert np.all(np.abs(last["FedAU"] - last["KnownProb"]) < 0.03), last
