"""engine=batched (fedsim/batched.py, fedsim/engines/batched.py) and client.num_threads=auto.

Parity tolerance (stated in docs/engines.md): the same config on ``batched`` and ``inline``
gives every round's global model within 1e-4 relative (max |a - b| / max |a| per tensor; float
summation order differs, bits do not match) and the same final accuracy within 0.5 points.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.batched import check_attack, check_model, is_data_hook
from fedsim.config import ConfigError
from fedsim.local import LocalAlgorithm, TrainHook, register_local_algorithm
from fedsim.threads import AUTO_MAX_PARAMS, check_threads, resolve_threads

RTOL = 1e-4
# uneven partitions (different step counts: masking), batches that do not divide the data (short
# batches: weights), sampled participation, clients with state (control variates, SGD buffers)
BASE = ["rounds=3", "num_clients=6", "partition=dirichlet", "partition.alpha=0.5", "participation.fraction=0.5",
        "client.batch_size=16", "client.num_threads=1"]


def _run_models(run, monkeypatch, *overrides, name):
    """(summary, rows, per-round global models) of a run."""
    import fedsim.server as server

    models, real = [], server.evaluate_model

    def spy(model, *a, **k):
        models.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return real(model, *a, **k)

    monkeypatch.setattr(server, "evaluate_model", spy)
    summary, rows, _ = run(*overrides, name=name)
    monkeypatch.setattr(server, "evaluate_model", real)
    return summary, rows, models


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


_PAIRS = itertools.count()


def _assert_parity(run, monkeypatch, *overrides, engine=("engine=batched",)):
    k = next(_PAIRS)  # one run directory per run: a directory holding results is not reused
    s_in, rows_in, m_in = _run_models(run, monkeypatch, *BASE, *overrides, name=f"inline{k}")
    s_b, rows_b, m_b = _run_models(run, monkeypatch, *BASE, *overrides, *engine, name=f"batched{k}")
    assert len(m_in) == len(m_b) == 4  # the initial model (the divergence reference), rounds 1-3
    for r, (a, b) in enumerate(zip(m_in, m_b)):
        assert _rel(a, b) < RTOL, f"round {r}: {_rel(a, b)}"
    assert abs(s_in["final_accuracy"] - s_b["final_accuracy"]) <= 0.005
    for a, b in zip(rows_in, rows_b):
        assert (a["sampled"], a["replied"], a["failed"], a["bytes_up"]) == (b["sampled"], b["replied"], b["failed"], b["bytes_up"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    return s_b, rows_b


def test_parity_fedavg_momentum_weight_decay_persisted_buffers_chunks(run, monkeypatch):
    s, rows = _assert_parity(run, monkeypatch, "client.momentum=0.9", "client.weight_decay=0.01",
                             "client.persist_optimizer=true", engine=("engine=batched", "engine.max_batch=2"))
    assert s["engine"] == "batched" and s["final_accuracy"] > 0.3


def test_parity_fedprox(run, monkeypatch):
    _assert_parity(run, monkeypatch, "strategy=fedprox", "strategy.proximal_mu=0.5", "client.steps=7")


def test_parity_scaffold_m_and_vr(run, monkeypatch):
    _assert_parity(run, monkeypatch, "strategy=scaffold_m")
    _assert_parity(run, monkeypatch, "strategy=scaffold_m_vr", "client.weight_decay=0.001")


def test_parity_data_and_update_attacks(run, monkeypatch):
    """Label flips, unreliable clients (batches skipped and blurred by a data hook), sign flips
    and Gaussian noise on the update: each drawn from the client's own generator, in order."""
    _, rows = _assert_parity(run, monkeypatch, "threat=mudhog_mix", "num_clients=20", "participation.fraction=1.0")
    assert rows[0]["replied"] == 20


# ---------------------------------------------------------------------------------------------
# refusals, before any client trains
# ---------------------------------------------------------------------------------------------
def test_refuses_what_it_cannot_batch(run):
    check_model(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ConfigError, match="BatchNorm.*engine=inline"):
        check_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(ConfigError, match="Dropout.*engine=inline"):
        run("model.dropout=0.5", "engine=batched")
    with pytest.raises(ConfigError, match="engine.client_timeout"):
        run("engine=batched", "engine.client_timeout=5")
    with pytest.raises(ConfigError, match="engine.max_batch"):
        run("engine.max_batch=4")  # inline has no batches
    with pytest.raises(ConfigError, match="engine.batched"):
        run("engine.batched=true")
    with pytest.raises(ConfigError, match="local algorithm 'custom_local'.*engine=inline"):
        run("engine=batched", "strategy._target_=test_batched.CustomLocalFedAvg")
    mod = "{_target_: defenses.privacy.PrivacyMod, transforms: [{_target_: defenses.privacy.Prune, p: 50}]}"
    with pytest.raises(ConfigError, match="client.mods.*engine=inline"):
        run("engine=batched", f"client.mods=[{mod}]", name="mods")


class _InLoop(TrainHook):
    def on_step(self, run):  # noqa: ANN001
        pass


class InLoopAttack:
    """An attack with a training-time hook acting inside the step (a projection)."""

    def hooks(self, rng):  # noqa: ANN001
        return [_InLoop()]


def test_data_hooks_accepted_in_loop_hooks_refused():
    from attacks.data import Unreliable

    check_attack(Unreliable(), "x")
    assert all(is_data_hook(h) for h in Unreliable().hooks(np.random.default_rng(0)))
    with pytest.raises(ConfigError, match="InLoopAttack.*_InLoop.*engine=inline"):
        check_attack(InLoopAttack(), "threat group 'g'")


@register_local_algorithm("custom_local")
class CustomLocal(LocalAlgorithm):
    """A local algorithm without a batched form."""


class CustomLocalFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201, D102
        config["local-algorithm"] = "custom_local"
        return super().configure_train(server_round, arrays, config, grid)


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def test_schedule_draws_client_train_batches():
    """Rows of each client's batches are client_train's, padded at weight 0; steps masked."""
    from types import SimpleNamespace

    from fedsim.batched import _schedule
    from fedsim.local import batches
    from fedsim.seeding import torch_gen

    jobs = [SimpleNamespace(y=torch.zeros(n), total=t, pid=p, run=SimpleNamespace(server_round=2))
            for p, (n, t) in enumerate([(7, 3), (3, 1), (0, 2)])]
    rows, weight, active = _schedule(jobs, 5, 4)
    assert active.tolist() == [[True, True, True], [True, False, True], [True, False, False]]
    for c, off in ((0, 0), (1, 7)):
        ref = list(batches(len(jobs[c].y), 4, jobs[c].total, torch_gen(5, "batches", 2, c)))
        for t, idx in enumerate(ref):
            assert rows[t, c, : len(idx)].tolist() == (idx + off).tolist()
            assert weight[t, c].tolist() == [1.0] * len(idx) + [0.0] * (4 - len(idx))
    assert weight[:, 2].sum() == 0  # no data: nothing real


def test_split_into_actor_chunks():
    from fedsim.engines.ray_batched import split

    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1, 2], 5) == [[1], [2]]


def test_num_threads_auto():
    small, big = nn.Linear(10, 10), nn.Linear(1000, AUTO_MAX_PARAMS // 1000 + 1)
    assert resolve_threads("auto", small) == 1
    assert resolve_threads("auto", big) == 0  # torch's default
    assert resolve_threads("auto", big, worker=True) == 1  # every Ray / Flower actor
    assert resolve_threads(3, small) == 3 and resolve_threads(0, small) == 0
    assert check_threads("auto") is None and check_threads(2) is None
    assert "auto" in check_threads("many") and check_threads(-1) and check_threads(True)


def test_num_threads_validated_and_default(cfg_of, run):
    from fedsim.engines.base import client_threads
    from fedsim.experiment import prepare

    assert cfg_of().client.num_threads == "auto"
    assert client_threads(prepare(cfg_of())) == 1
    with pytest.raises(ConfigError, match="client.num_threads"):
        prepare(cfg_of("client.num_threads=many"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run("rounds=1")  # the default (auto) on the small MLP
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_parity_ray_batched(run, monkeypatch):
    """engine=ray engine.batched=true: the round's clients split across 2 actors, one batch each."""
    pytest.importorskip("ray")
    import ray

    from fedsim.engines.ray import start_ray

    owned = start_ray({"init_args": {"num_cpus": 2}})
    try:
        s, rows = _assert_parity(run, monkeypatch, "strategy=scaffold_m", "participation.fraction=1.0",
                                 engine=("engine=ray", "engine.batched=true", "engine.num_actors=2"))
        assert s["engine"] == "ray" and rows[0]["replied"] == 6
    finally:
        if owned:
            ray.shutdown()
