"""Multi-metrics, FLAME, norm clipping and weak DP as pure functions on arrays."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.clipping import clip_updates
from strategies.flame import cosine_distances, flame_admitted, median_clip
from strategies.multimetric import multimetric_features, multimetric_scores, multimetric_select


def test_multimetric_hand_computed_four_clients():
    # g1 = (1,0), g2 = (0,1), g3 = (-1,0), g4 = (2,0); by hand:
    # (1 - cos)^2 sums: 0+... -> [5, 3, 9, 5]; Manhattan sums [5, 7, 7, 7]; norm differences [1, 1, 1, 3]
    g = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    f = multimetric_features(g)
    assert np.allclose(f, [[5, 5, 1], [3, 7, 1], [9, 7, 1], [5, 7, 3]])
    # np.cov = (1/3) [[19, 1, -1], [1, 3, 1], [-1, 1, 3]], det 144 -> inverse (1/48) [[8,-4,4],[-4,56,-20],[4,-20,56]]
    # x^T S^-1 x = [1296, 2448, 2736, 2448] / 48
    assert np.allclose(multimetric_scores(f), [27.0, 51.0, 57.0, 51.0])
    assert multimetric_select(multimetric_scores(f), 0.3).tolist() == [0]  # int(0.3 * 4) = 1 kept
    assert multimetric_select(multimetric_scores(f), 0.5).tolist() == [0, 1]


def _planted(seed: int = 0, n: int = 10, d: int = 50):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=d)
    benign = base + 0.1 * rng.normal(size=(n - 1, d))
    outlier = -3.0 * base + 0.1 * rng.normal(size=d)  # other direction, far, and 3x the norm
    return np.vstack([benign, outlier])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multimetric_outlier_last_on_every_metric_and_cluster_kept(seed):
    v = _planted(seed)
    f = multimetric_features(v)
    for col in range(3):  # cosine, Manhattan, norm difference: each alone ranks the outlier last
        assert int(np.argmax(f[:, col])) == 9
    # the whitened score need not rank a lone extreme outlier last (it dominates the covariance,
    # which shrinks its own Mahalanobis length); it is still far from the 30 % kept
    scores = multimetric_scores(f)
    assert scores[9] > np.sort(scores)[2]
    kept = multimetric_select(scores, 0.3)
    assert len(kept) == 3 and 9 not in kept


def test_multimetric_singular_covariance_uses_pinv():
    v = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]])  # identical clients: a rank-1 covariance
    scores = multimetric_scores(multimetric_features(v))
    assert np.isfinite(scores).all() and int(np.argmax(scores)) == 4


def test_flame_admits_the_benign_cluster():
    v = np.vstack([_planted(0)[:9], _planted(0)[9:], -_planted(1)[:2]])
    admitted = set(flame_admitted(cosine_distances(v)).tolist())
    # the majority cluster (min_cluster_size = 12 // 2 + 1 = 7) holds only benign clients;
    # HDBSCAN may leave a few loosely attached benign ones out as noise, as in FLAME
    assert admitted <= set(range(9)) and len(admitted) >= 7
    d = cosine_distances(v)
    assert np.allclose(d, d.T) and np.allclose(np.diag(d), 0)


def test_median_clip_and_norm_clip():
    u = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = median_clip(u, np.linalg.norm(u, axis=1), 1.0)
    assert np.allclose(out, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]])
    mask = np.array([True, False])  # second coordinate is a buffer: never clipped
    c = clip_updates(u, mask, 2.0)
    assert np.allclose(c, [[2.0, 4.0], [0.3, 0.4], [0.0, 0.0]])


def _round(updates: np.ndarray, n_examples=None):
    from strategies.common import RoundUpdates

    n = len(updates)
    return RoundUpdates(list(range(100, 100 + n)), updates, np.asarray(n_examples or [1.0] * n), [])


def _bind(strategy, global_vec: np.ndarray, buffer: int = 1):
    from flwr.app import Array, ArrayRecord

    d = len(global_vec) - buffer
    strategy.global_arrays = ArrayRecord({"fc.weight": Array(global_vec[:d].astype(np.float32)),
                                          "bn.running_mean": Array(global_vec[d:].astype(np.float32))})
    strategy.global_vec = global_vec.astype(np.float64)


def test_multimetric_strategy_scores_parameters_only_and_averages_the_kept():
    from strategies.multimetric import MultiMetrics

    hand = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    buffers = np.array([[0.0], [50.0], [-70.0], [9.0]])  # wild BatchNorm statistics: must not count
    mm = MultiMetrics(use_weights=False)
    _bind(mm, np.zeros(3))
    new = mm.aggregate_updates(1, _round(np.hstack([hand, buffers])))
    assert mm.last_kept == [100] and mm.last_dropped == [101, 102, 103]  # the hand-computed choice
    assert set(mm.flagged()) == {101, 102, 103}
    assert np.allclose(new, [1.0, 0.0, 0.0])  # client 0's whole model, buffer included
    # the authors' default scores the full weights x + Delta: a shifted global changes the geometry
    mw = MultiMetrics(use_weights=True)
    _bind(mw, np.array([10.0, 0.0, 0.0]))
    mw.aggregate_updates(1, _round(np.hstack([hand, buffers])))
    weights = hand + np.array([10.0, 0.0])  # x + Delta over the parameters, buffers left out
    expected = multimetric_select(multimetric_scores(multimetric_features(weights)), 0.3)
    assert mw.last_kept == [100 + int(i) for i in expected]
    assert mw.last_scores[100] == pytest.approx(multimetric_scores(multimetric_features(weights))[0])
    assert mw.last_scores[100] != pytest.approx(27.0)  # not the update-based score


def test_flame_strategy_flags_the_outlier_and_clips():
    from strategies.flame import Flame

    v = _planted(0)
    f = Flame(noise_lambda=0.0, cluster_on="updates")
    _bind(f, np.zeros(v.shape[1] + 1))
    upd = np.hstack([v, np.zeros((len(v), 1))])
    new = f.aggregate_updates(1, _round(upd))
    assert 109 in f.flagged()
    norms = np.linalg.norm(v, axis=1)
    kept = [i for i in range(10) if 100 + i not in f.flagged()]
    expected = median_clip(upd[kept], norms[kept], float(np.median(norms))).mean(0)
    assert np.allclose(new, expected)
    noisy = Flame(noise_lambda=0.001, cluster_on="updates", seed=3)
    _bind(noisy, np.zeros(v.shape[1] + 1))
    out = noisy.aggregate_updates(1, _round(upd))
    assert out[-1] == expected[-1] and not np.allclose(out[:-1], expected[:-1])  # noise on parameters only
