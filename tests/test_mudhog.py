"""MUD-HoG, each step on constructed updates (no simulation)."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.common import RoundUpdates
from strategies.mudhog import (
    Decisions,
    Hogs,
    MudHoG,
    additive_noise_suspects,
    aggregation_weights,
    cosine,
    delayed_decision,
    largest_gap_split,
    sign_flip_suspects,
    targeted_suspects,
    unreliable_suspects,
    update_unreliable,
)

D = 40
RNG = np.random.default_rng(0)
BASE = RNG.normal(size=D)
BASE /= np.linalg.norm(BASE)


def benign(n: int, spread: float = 0.02, seed: int = 1) -> list[np.ndarray]:
    r = np.random.default_rng(seed)
    return [BASE + spread * r.normal(size=D) for _ in range(n)]


def test_largest_gap_split():
    assert largest_gap_split([10.0, 1.0, 11.0, 2.0]) == 6.0
    assert largest_gap_split([0.0, 1.0, 2.0]) == 0.5  # a tie keeps the first gap
    assert largest_gap_split([3.0]) == 0.0 and largest_gap_split([]) == 0.0


def test_hogs_long_sum_and_short_window():
    h = Hogs(window=3)
    for t in range(1, 6):
        h.add(7, np.full(2, float(t)))
    assert np.allclose(h.long[7], 15.0)
    assert np.allclose(h.short(7), 4.0)  # mean of 3, 4, 5
    frozen = Hogs(window=3, frozen=True)  # authors' code: stuck at the first window
    for t in range(1, 6):
        frozen.add(7, np.full(2, float(t)))
    assert np.allclose(frozen.short(7), 2.0) and np.allclose(frozen.long[7], 15.0)
    h2 = Hogs(window=3)
    h2.add(1, np.ones(2))
    assert np.allclose(h2.short(1), 1.0)  # fewer than `window` updates: their mean


def test_planted_sign_flipper_is_flagged():
    ids = list(range(10))
    short = dict(enumerate(benign(8) + [-BASE, -2 * BASE]))
    assert sign_flip_suspects(ids, short, set()) == {8, 9}
    # the median ignores confirmed malicious clients: 6 flippers among 10 but 5 are known
    short = dict(enumerate(benign(4) + [-BASE] * 6))
    assert sign_flip_suspects(ids, short, mal_ids={4, 5, 6, 7, 8}) == {4, 5, 6, 7, 8, 9}
    assert sign_flip_suspects(ids, short, mal_ids=set()) == {0, 1, 2, 3}  # without it: fooled


def unit(r: np.random.Generator) -> np.ndarray:
    v = r.normal(size=D)
    return v / np.linalg.norm(v)


def test_planted_noisy_clients_are_separated_by_the_gap_rule():
    r = np.random.default_rng(5)
    ben = benign(10, spread=0.02)  # a tight cluster (pairwise distances ~0.2 < eps)
    mild = [BASE + 0.6 * unit(r) for _ in range(2)]  # off-cluster but near: targeted / unreliable
    noisy = [BASE + 10.0 * unit(r) for _ in range(3)]  # far away: additive noise
    short = dict(enumerate(ben + mild + noisy))
    noise, other = additive_noise_suspects(list(short), short, eps=0.5, min_samples=3)
    assert noise == {12, 13, 14}
    assert other == {10, 11}  # suspicious, left for the targeted / unreliable steps


def test_majority_noise_option_reproduces_the_code():
    # 3 tight benign clients, 1 mild and 4 noisy ones: DBSCAN's noise label is the most common.
    r = np.random.default_rng(2)
    vecs = benign(3, spread=0.01) + [BASE + 0.6 * unit(r)] + [BASE + 10.0 * unit(r) for _ in range(4)]
    short = dict(enumerate(vecs))
    paper, paper_other = additive_noise_suspects(list(short), short, eps=0.5, min_samples=3)
    assert paper == {4, 5, 6, 7} and paper_other == {3}
    code, code_other = additive_noise_suspects(list(short), short, eps=0.5, min_samples=3, majority_includes_noise=True)
    assert code == set() and code_other == {0, 1, 2}  # the code takes the noise points as normal


def test_targeted_minority_cluster_on_long_hogs():
    r = np.random.default_rng(3)
    other = r.normal(size=D)
    long = {i: 5 * BASE + 0.1 * r.normal(size=D) for i in range(9)}
    long.update({i: 5 * BASE + 2 * other + 0.1 * r.normal(size=D) for i in (9, 10, 11)})
    assert targeted_suspects(list(long), long) == {9, 10, 11}
    assert targeted_suspects([0], long) == set()


def test_delayed_decision_confirms_after_delay_and_resets():
    ids = [0, 1, 2, 3]
    d = delayed_decision(Decisions(), ids, {0}, {1}, {2}, delay=2)
    assert d.mal_ids == set() and d.pre_mal == {0: 1, 1: 1, 2: 1}
    d = delayed_decision(d, ids, {0}, {1}, {2}, delay=2)
    assert d.flip_sign_ids == {0} and d.uatk_ids == {1} and d.mal_ids == {0, 1}
    assert d.tatk_ids == set()  # targeted needs 2 * delay rounds
    d = delayed_decision(d, ids, {0}, {1}, {2}, delay=2)
    d = delayed_decision(d, ids, {0}, {1}, {2}, delay=2)
    assert d.tatk_ids == {2} and d.mal_ids == {0, 1, 2}
    # a clean round resets the counter but keeps the decision; a second clean one clears it
    d = delayed_decision(d, ids, set(), {1}, {2}, delay=2)
    assert 0 in d.flip_sign_ids and d.pre_mal[0] == 0
    d = delayed_decision(d, ids, set(), {1}, {2}, delay=2)
    assert 0 not in d.flip_sign_ids and 0 not in d.mal_ids
    # the input is not modified (pure)
    base = Decisions()
    delayed_decision(base, ids, {0}, set(), set(), delay=2)
    assert base.pre_mal == {}


def test_noise_client_that_comes_and_goes_becomes_unreliable():
    ids = [5]
    d = Decisions()
    for sus in (True, True, False, True, False):
        d = delayed_decision(d, ids, set(), {5} if sus else set(), set(), delay=2)
    assert 5 in d.unreliable_ids and 5 not in d.uatk_ids and 5 not in d.mal_ids


def test_unreliable_by_cosine_gap_with_counter():
    r = np.random.default_rng(4)
    short = dict(enumerate(benign(8, spread=0.05)))
    short[8] = BASE + 1.5 * r.normal(size=D) / np.sqrt(D) * 3  # low-quality direction
    short[9] = -BASE  # malicious: excluded from the median and from the answer
    ids = list(short)
    assert cosine(short[8], BASE) < 0.8
    assert unreliable_suspects(ids, short, mal_ids={9}) == {8}
    d = Decisions()
    for _ in range(2):
        d = update_unreliable(d, ids, {8}, delay=2)
    assert 8 not in d.unreliable_ids  # counter 2, needs > delay
    d = update_unreliable(d, ids, {8}, delay=2)
    assert 8 in d.unreliable_ids and d.count_unreliable[8] == 3
    for _ in range(3):
        d = update_unreliable(d, ids, set(), delay=2)
    assert d.count_unreliable[8] == 0 and 8 in d.unreliable_ids  # removed on the next check
    d = update_unreliable(d, ids, set(), delay=2)
    assert 8 not in d.unreliable_ids


def test_aggregation_weights():
    d = Decisions(mal_ids={0}, unreliable_ids={3})
    w = aggregation_weights([0, 1, 2, 3, 4], d, round_targeted={1}, round_noise={2}, unreliable_weight=0.5)
    assert w.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0]


def _ru(vecs: list[np.ndarray]) -> RoundUpdates:
    n = len(vecs)
    return RoundUpdates(list(range(100, 100 + n)), np.stack(vecs), np.ones(n), [])


def test_strategy_flags_and_excludes_a_planted_flipper_and_noisy_client():
    s = MudHoG(preset="mnist", dbscan_min_samples=3)
    s.global_vec = np.zeros(D)
    r = np.random.default_rng(7)
    for rnd in range(1, 7):
        vecs = benign(8, seed=rnd) + [-BASE, BASE + 3 * unit(r)]
        new = s.aggregate_updates(rnd, _ru(vecs))
        if rnd <= 3:  # tau0 rounds of plain averaging
            assert np.allclose(new, np.mean(vecs, axis=0))
    assert s.flagged() == {108: "signflip", 109: "noise"}  # exactly the two planted clients
    # Step 3 (2-means on the long HoGs) always splits off a minority, so with no targeted attacker
    # it drops 3 benign clients from this round's aggregate without confirming them (as the
    # authors' server.py does); the aggregate is the mean of exactly the other 5 benign updates
    # (global_vec stays 0 here, so the new vector is the aggregated update itself).
    assert s.last_round["signflip"] == {108} and s.last_round["noise"] == {109}
    assert s.last_round["targeted"] == {102, 104, 107}
    kept = [0, 1, 3, 5, 6]
    np.testing.assert_allclose(new, np.mean([vecs[i] for i in kept], axis=0), rtol=0, atol=1e-12)
    assert cosine(new, BASE) > 0.99


def test_presets_and_bad_arguments():
    assert (MudHoG(preset="fashion_mnist").eps, MudHoG(preset="fashion_mnist").min_samples) == (1.3, 5)
    # CIFAR: eps 18 and min_samples 5, the value in effect in the authors' code (its 12 is never read)
    assert (MudHoG(preset="cifar10").eps, MudHoG(preset="cifar10").min_samples) == (18.0, 5)
    assert MudHoG(preset="cifar10", dbscan_min_samples=12).min_samples == 12
    assert MudHoG(dbscan_eps=2.0).eps == 2.0
    with pytest.raises(ValueError, match="preset"):
        MudHoG(preset="svhn")
    with pytest.raises(ValueError, match="short_hog"):
        MudHoG(short_hog="window")
