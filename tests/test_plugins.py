"""Plug points: a strategy defined only here, selected by _target_, and the FedProx local term."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.local import (
    LOCAL_ALGORITHMS,
    LocalAlgorithm,
    LocalRun,
    TrainHook,
    get_local_algorithm,
    register_local_algorithm,
    train_loop,
)
from strategies.common import RoundUpdates, UpdateStrategy, weighted_mean

CALLS: dict[str, int] = {"server": 0, "client": 0}


@register_local_algorithm("test-halfstep")
class HalfStep(LocalAlgorithm):
    """Client half: halves every gradient (so the update is half of plain SGD's, for one step)."""

    def on_backward(self, run: LocalRun) -> None:
        CALLS["client"] += 1
        for _, p in run.params():
            p.grad.mul_(0.5)

    def on_end(self, run: LocalRun, reply: RecordDict) -> None:
        reply["extra"] = ConfigRecord({"halved": True})


class MedianOfUpdates(UpdateStrategy):
    """Server half: coordinate-wise median of the updates; asks clients for 'test-halfstep'."""

    def __init__(self, server_lr: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.server_lr = server_lr

    def train_config_extra(self, server_round: int) -> dict[str, object]:
        return {"local-algorithm": "test-halfstep"}

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        CALLS["server"] += 1
        assert all(m.content.config_records["extra"]["halved"] for m in ru.replies)
        return self.global_vec + self.server_lr * np.median(ru.updates, axis=0)


def test_custom_strategy_from_test_module(run):
    CALLS.update(server=0, client=0)
    summary, rows, _ = run(f"strategy._target_={__name__}.MedianOfUpdates", "+strategy.server_lr=1.0")
    assert CALLS["server"] == 3 and CALLS["client"] > 0
    assert summary["final_accuracy"] > 0.3  # it learns


def test_weighted_mean():
    u = np.array([[1.0, 0.0], [3.0, 2.0]])
    assert np.allclose(weighted_mean(u, np.array([1.0, 3.0])), [2.5, 1.5])


def _quadratic_run(algo: TrainHook, mu: float, w0: torch.Tensor, g: torch.Tensor, lr: float, steps: int):
    """Train a linear model on constant data so the data gradient is known in closed form."""
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    run = LocalRun(
        model=model,
        global_params={"weight": g.clone()},
        content=RecordDict(),
        config=ConfigRecord({"proximal-mu": mu}),
        state=RecordDict(),
        device=torch.device("cpu"),
        lr=lr,
        total_steps=steps,
        partition_id=0,
        server_round=1,
        loss_fn=lambda out, y: 0.5 * ((out - y) ** 2).mean(),
    )
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0]])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_loop(run, x, y, [algo], opt, batch_size=1, gen=torch.Generator().manual_seed(0))
    return model.weight.detach().clone()


def test_fedprox_term_changes_update_as_formula_says():
    # F(w) = 0.5 (w . x - 0)^2 with x = e1 -> grad F = (w1, 0). Global point g.
    # One FedProx step: w' = w - lr * (grad F(w) + mu (w - g)) (Li et al. 2020, Eq. 2).
    w0, g, lr = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 1.0]]), 0.1
    for mu in (0.0, 0.5, 2.0):
        algo = get_local_algorithm(ConfigRecord({"proximal-mu": mu}))
        assert algo.name == ("fedprox" if mu > 0 else "sgd")
        got = _quadratic_run(algo, mu, w0, g, lr, steps=1)
        expect = w0 - lr * (torch.tensor([[w0[0, 0], 0.0]]) + mu * (w0 - g))
        assert torch.allclose(got, expect, atol=1e-6), (mu, got, expect)


def test_fedprox_pulls_towards_global_model():
    w0 = g = torch.tensor([[0.0, 3.0]])
    far = _quadratic_run(get_local_algorithm(ConfigRecord({"proximal-mu": 0.0})), 0.0, w0 + 2, g, 0.1, 50)
    near = _quadratic_run(get_local_algorithm(ConfigRecord({"proximal-mu": 1.0})), 1.0, w0 + 2, g, 0.1, 50)
    assert (near - g).norm() < (far - g).norm()


def test_unknown_local_algorithm_is_named():
    import pytest

    with pytest.raises(KeyError, match="nope"):
        get_local_algorithm(ConfigRecord({"local-algorithm": "nope"}))
    assert "sgd" in LOCAL_ALGORITHMS and "fedprox" in LOCAL_ALGORITHMS


def test_received_global_params_do_not_alias_the_trained_weights():
    """Regression (4668757): the global params a local algorithm sees must stay the received
    values while training changes the model, or FedProx's term and update attacks see 0."""
    from flwr.app import ArrayRecord

    from fedsim.client import _load_global

    model = torch.nn.Linear(3, 2)
    sent = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    got = _load_global(model, ArrayRecord(torch_state_dict=sent), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what a training step does in place
    assert all(torch.equal(got[k], sent[k]) for k in sent)
