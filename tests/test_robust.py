"""GeoMed (RFA) and FoolsGold on constructed updates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.common import RoundUpdates
from strategies.robust import FoolsGold, GeoMed, foolsgold_weights, geometric_median, output_layer_slice


def test_geometric_median_on_a_line_and_robustness():
    pts = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    z, it = geometric_median(pts, np.ones(5), maxiter=200, ftol=1e-12)
    assert abs(z[0] - 2.0) < 1e-3 and it > 1
    r = np.random.default_rng(0)
    cluster = r.normal(size=(20, 10)) * 0.1 + 1.0
    outliers = np.full((8, 10), 50.0)
    z, _ = geometric_median(np.vstack([cluster, outliers]), np.ones(28), maxiter=50)
    assert np.linalg.norm(z - 1.0) < 1.0  # the mean would be ~15 away
    assert np.linalg.norm(np.vstack([cluster, outliers]).mean(0) - 1.0) > 10


def test_geometric_median_objective_decreases_and_is_translation_equivariant():
    r = np.random.default_rng(1)
    pts, a = r.normal(size=(7, 5)), r.uniform(1, 3, 7)

    def obj(z):
        return float((a * np.linalg.norm(pts - z, axis=1)).sum())

    z1, _ = geometric_median(pts, a, maxiter=1)
    z4, _ = geometric_median(pts, a, maxiter=4, ftol=0.0)
    assert obj(z4) <= obj(z1) <= obj((a[:, None] * pts).sum(0) / a.sum()) + 1e-12
    shift = r.normal(size=5)
    zs, _ = geometric_median(pts + shift, a, maxiter=4, ftol=0.0)
    assert np.allclose(zs, z4 + shift)


def test_foolsgold_zeroes_identical_sybils():
    hist = np.zeros((5, 6))
    hist[0, 0], hist[1, 1], hist[2, 2] = 1.0, 1.0, 1.0  # honest: mutually orthogonal
    hist[3, 3:5] = hist[4, 3:5] = [1.0, 1.0]  # two identical sybils
    assert np.allclose(foolsgold_weights(hist), [1, 1, 1, 0, 0])
    # pardoning: an honest client that resembles one sybil a little keeps a positive weight
    hist[2, 3] = 0.3
    w = foolsgold_weights(hist)
    assert w[2] > 0.5 and w[3] == 0 and w[4] == 0


def _ru(vecs):
    n = len(vecs)
    return RoundUpdates(list(range(n)), np.stack(vecs), np.arange(1, n + 1, dtype=float), [])


def test_foolsgold_strategy_flags_sybils_and_normalises():
    r = np.random.default_rng(2)
    s = FoolsGold()
    s.global_vec = np.zeros(30)
    sybil = r.normal(size=30)
    for rnd in range(3):
        vecs = [r.normal(size=30) for _ in range(6)] + [sybil, sybil.copy()]
        new = s.aggregate_updates(rnd + 1, _ru(vecs))
    assert s.flagged() == {6: "sybil", 7: "sybil"}
    w = np.array([s.last_weights[i] for i in range(8)])
    assert np.allclose(new, (w[:, None] * np.stack(vecs)).sum(0) / 8)
    with pytest.raises(ValueError, match="normalize"):
        FoolsGold(normalize="mean")


def _template() -> ArrayRecord:
    """A 2-layer MLP's arrays in state_dict order: w1 [4, 3], b1 [4], w2 [2, 4], b2 [2] (d = 30)."""
    shapes = {"w1": (4, 3), "b1": (4,), "w2": (2, 4), "b2": (2,)}
    return ArrayRecord({k: Array(np.zeros(v, dtype=np.float32)) for k, v in shapes.items()})


def test_output_layer_slice_is_the_last_weight_matrix():
    assert output_layer_slice(_template()) == slice(16, 24)  # after w1 (12) and b1 (4); b2 excluded
    with pytest.raises(ValueError, match="strategy.similarity"):
        output_layer_slice(ArrayRecord({"b": Array(np.zeros(3, dtype=np.float32))}))


def test_foolsgold_output_layer_similarity_option():
    """Two sybils that agree only on the output layer's weights: invisible to the paper's
    similarity over all parameters, caught by the authors' code's output-layer similarity. The
    aggregate still sums every parameter of every update."""
    r = np.random.default_rng(5)
    common_out = r.normal(size=8)
    vecs = [r.normal(size=30) for _ in range(4)]
    for _ in range(2):
        v = 5.0 * r.normal(size=30)  # large, unrelated hidden-layer parts
        v[16:24] = common_out
        vecs.append(v)
    results = {}
    for similarity in ("all", "output"):
        s = FoolsGold(similarity=similarity)
        s.global_arrays, s.global_vec = _template(), np.zeros(30)
        new = s.aggregate_updates(1, _ru(vecs))
        w = np.array([s.last_weights[i] for i in range(6)])
        assert np.allclose(new, (w[:, None] * np.stack(vecs)).sum(0) / 6)
        results[similarity] = (s.flagged(), w, s.history[0].size)
    assert results["all"][0] == {} and results["all"][1][4:].min() > 0.5 and results["all"][2] == 30
    assert results["output"][0] == {4: "sybil", 5: "sybil"} and results["output"][2] == 8
    with pytest.raises(ValueError, match="strategy.similarity"):
        FoolsGold(similarity="last")


def test_geomed_strategy_resists_outliers():
    r = np.random.default_rng(3)
    s = GeoMed(weighted=False)
    s.global_vec = np.ones(10)
    vecs = [0.1 * r.normal(size=10) + 0.5 for _ in range(7)] + [np.full(10, -40.0)] * 3
    new = s.aggregate_updates(1, _ru(vecs))
    mean = 1.0 + np.mean(vecs, axis=0)
    assert np.linalg.norm(new - 1.5) < 0.1 * np.linalg.norm(mean - 1.5)  # 4 Weiszfeld steps
    s50 = GeoMed(weighted=False, maxiter=50, ftol=0.0)
    s50.global_vec = np.ones(10)
    assert np.linalg.norm(s50.aggregate_updates(1, _ru(vecs)) - 1.5) < 0.5


def test_foolsgold_output_similarity_through_the_harness(run):
    """The option reaches the strategy from the config and works on a real model's arrays."""
    summary, rows, _ = run("strategy=foolsgold", "strategy.similarity=output", "participation=full",
                           "client.num_threads=1")
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["replied"] == 4 for r in rows)
    assert summary["final_accuracy"] > 0.5  # digits, 4 clients, 3 rounds (chance 0.1)
