"""Participation models: long-run rates against p_n, FedAU's exact sampler semantics,
order independence, the probability generators, validation and what a run records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fedsim.config import ConfigError
from fedsim.participation import (
    Bernoulli,
    Cyclic,
    Markov,
    build,
    cyclic_blocks,
    label_correlated_from_histograms,
    markov_transitions,
    validate,
)
from fedsim.seeding import np_rng

P = np.array([0.02, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])


def _cfg(name: str, probs: dict | None = None, **kw) -> SimpleNamespace:
    base = {"fraction": 1.0, "min_clients": 1, "q": 0.05, "cycle": 100}
    base.update(kw)
    return SimpleNamespace(name=name, probs=probs or {"name": "explicit", "values": P.tolist()}, **base)


def _rates(model, rounds: int) -> np.ndarray:
    counts = np.zeros(model.n)
    for r in range(1, rounds + 1):
        counts[model.active(r)] += 1
    return counts / rounds


def test_bernoulli_long_run_rate_matches_p():
    rounds = 6000
    rate = _rates(Bernoulli(_cfg("bernoulli"), len(P), seed=0), rounds)
    tol = 4 * np.sqrt(P * (1 - P) / rounds) + 1e-9
    assert np.all(np.abs(rate - P) <= tol), (rate, P)


def test_markov_transitions_are_fedau_s_with_rescaling():
    up, down = markov_transitions(np.array([0.5, 0.1, 0.02]), q=0.05)
    assert up[0] == pytest.approx(0.05) and down[0] == pytest.approx(0.05)
    assert up[1] == pytest.approx(0.05) and down[1] == pytest.approx(0.45)
    # p = 0.02: q (1/p - 1) = 2.45 > 1, so both are divided by it.
    assert down[2] == pytest.approx(1.0) and up[2] == pytest.approx(0.05 / 2.45)
    p = np.array([0.5, 0.1, 0.02])
    assert np.allclose(up / (up + down), p)  # stationary probability is p in every case


def test_markov_long_run_rate_matches_p():
    model = Markov(_cfg("markov", q=0.05), len(P), seed=1)
    rate = _rates(model, 8000)
    assert np.all(np.abs(rate - P) <= 0.05), (rate, P)
    # a slow chain: consecutive states are strongly correlated (not Bernoulli)
    slow = Markov(_cfg("markov", probs={"name": "constant", "p": 0.5}, q=0.05), 50, seed=1)
    a, b = slow.state(100), slow.state(101)
    assert (a == b).mean() > 0.85


def test_markov_state_is_independent_of_query_order():
    cfg = _cfg("markov", q=0.2)
    stepwise = Markov(cfg, len(P), seed=3)
    seq = [stepwise.active(r) for r in range(1, 41)]
    direct = Markov(cfg, len(P), seed=3)
    assert direct.active(40) == seq[39]
    assert direct.active(7) == seq[6]  # backwards: recomputed from round 0
    assert [direct.active(r) for r in range(8, 41)] == seq[7:]
    other = Markov(cfg, len(P), seed=4)
    assert [other.active(r) for r in range(1, 41)] != seq


def _fedau_cyclic_reference(active: int, inactive: int, offset: int, rounds: int) -> list[bool]:
    """The authors' cyclic state machine, step by step (IBM/fedau WorkerSampler.cyclic_update)."""
    state, to_switch, out = False, offset, []
    for _ in range(rounds):
        if to_switch == 0:
            state = not state
            to_switch = active if state else inactive
        to_switch -= 1
        out.append(state)
    return out


def test_cyclic_closed_form_matches_the_state_machine_and_rate():
    model = Cyclic(_cfg("cyclic", cycle=20), len(P), seed=5)
    rounds = 400
    grid = np.zeros((rounds, len(P)), dtype=bool)
    for r in range(1, rounds + 1):
        grid[r - 1, model.active(r)] = True
    on, off = cyclic_blocks(P, 20)
    for n in range(len(P)):
        ref = _fedau_cyclic_reference(int(on[n]), int(off[n]), int(model.offset[n]), rounds)
        assert grid[:, n].tolist() == ref
    assert np.all(model.offset < off)
    # long run: active / (active + inactive), which is p_n up to rounding to whole rounds
    assert np.allclose(grid[100:].mean(0), on / (on + off), atol=0.03)
    assert np.all(np.abs(on / (on + off) - P) <= 1 / 20 + 1e-9)


def test_label_correlated_probabilities_follow_the_label_mix():
    hist = np.zeros((30, 3))
    hist[np.arange(30), np.arange(30) % 3] = 10  # one-hot label mixes: class = n % 3
    hist[-1] = 0  # an empty client
    p = label_correlated_from_histograms(hist, alpha=0.5, mean=0.2, p_min=0.01, rng=np_rng(0, "t"))
    m = np_rng(0, "t").dirichlet(0.5 * np.ones(3))
    expected = np.clip(m[np.arange(30) % 3] * 0.2 * 3, 0.01, 1.0)
    expected[-1] = 0.01
    assert np.allclose(p, expected)
    assert len(set(np.round(p[:-1], 9))) <= 3  # same label mix, same probability


def test_label_correlated_on_a_real_partition(cfg_of):
    from fedsim.data import load_federated

    cfg = cfg_of("participation=bernoulli", "partition=label_dirichlet", "num_clients=40")
    data = load_federated(cfg.dataset, cfg.partition, 40, 0)
    model = build(cfg.participation, 40, 0, {"data": data})
    p = model.probabilities()
    assert p.shape == (40,) and p.min() >= 0.02 and p.max() <= 1.0
    assert 0.03 < p.mean() < 0.3  # around p_mean = 0.1
    assert p.std() > 0.02  # heterogeneous


def test_label_dirichlet_partition_is_a_skewed_partition():
    from fedsim.data.partition import label_dirichlet_indices

    labels = np.repeat(np.arange(10), 300)
    parts = label_dirichlet_indices(labels, 100, alpha=0.1, seed=0, min_size=2)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 2 and sizes.max() < 10 * sizes.mean()
    top = np.array([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])
    assert np.median(top) > 0.6  # most clients are dominated by one label


def test_sampled_and_full_report_probabilities():
    assert np.allclose(build(_cfg("full"), 5, 0).probabilities(), 1.0)
    assert np.allclose(build(_cfg("sampled", fraction=0.4), 5, 0).probabilities(), 0.4)


@pytest.mark.parametrize(
    "override,key",
    [
        ("participation.q=0", "participation.q"),
        ("participation.cycle=0", "participation.cycle"),
        ("participation.probs.mean=0", "participation.probs.mean"),
        ("participation.probs.alpha=-1", "participation.probs.alpha"),
        ("+participation.probs.typo=1", "participation.probs.typo"),
        ("participation.probs.name=nope", "participation.probs.name"),
    ],
)
def test_bad_participation_config_names_the_key(cfg_of, override, key):
    cfg = cfg_of("participation=markov", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg.participation, cfg.num_clients)


def test_explicit_probs_need_one_per_client(cfg_of):
    cfg = cfg_of(
        "participation=bernoulli", "participation/probs=explicit", "participation.probs.values=[0.5,0.5]"
    )
    with pytest.raises(ConfigError, match=r"participation\.probs\.values"):
        validate(cfg.participation, cfg.num_clients)
    cfg = cfg_of("participation=bernoulli", "participation/probs=constant", "participation.probs.p=1.5")
    with pytest.raises(ConfigError, match=r"participation\.probs\.p"):
        validate(cfg.participation, cfg.num_clients)


def test_run_records_probabilities_and_realised_participation(run):
    summary, rows, run_dir = run(
        "participation=bernoulli", "participation/probs=uniform", "participation.probs.low=0.3",
        "participation.probs.high=0.9", "num_clients=6", "rounds=4",
    )  # fmt: skip
    info = json.loads((run_dir / "participation.json").read_text())
    assert info["model"] == "bernoulli" and info["rounds"] == 4
    assert len(info["probabilities"]) == 6 and all(0.3 <= p <= 0.9 for p in info["probabilities"])
    assert sum(info["counts"]) == sum(r["participants"] for r in rows)
    assert info["realised_rate"] == pytest.approx([c / 4 for c in info["counts"]])
    assert summary["participation"]["realised_rate"] == info["realised_rate"]
