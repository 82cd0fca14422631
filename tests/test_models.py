"""Every model builds for the shapes it supports and gives [batch, classes] logits."""

from __future__ import annotations

import pytest
import torch

from fedsim.models import CNN, MLP, LeNet5, ResNet18, build_model


@pytest.mark.parametrize(
    "cls,shape,kw",
    [
        (MLP, (60,), {}),
        (MLP, (1, 8, 8), {"hidden": [32], "dropout": 0.1}),
        (LeNet5, (1, 8, 8), {}),
        (LeNet5, (1, 28, 28), {"activation": "sigmoid"}),
        (LeNet5, (3, 32, 32), {"pool": "avg"}),
        (CNN, (1, 28, 28), {}),
        (CNN, (3, 32, 32), {}),
        (CNN, (1, 8, 8), {}),
        (ResNet18, (3, 32, 32), {}),
        (ResNet18, (3, 32, 32), {"norm": "group", "width": 16}),
    ],
)
def test_forward_shape(cls, shape, kw):
    model = cls(in_shape=shape, num_classes=7, **kw)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_lenet_28x28_is_classic():
    m = LeNet5(in_shape=(1, 28, 28), num_classes=10)
    assert m.classifier[0].in_features == 16 * 5 * 5


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    cfg = {"_target_": "fedsim.models.MLP", "hidden": [8]}
    state = torch.random.get_rng_state()
    a = build_model(cfg, (4,), 3, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    b, c = build_model(cfg, (4,), 3, seed=1), build_model(cfg, (4,), 3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_bad_activation_is_named():
    with pytest.raises(ValueError, match="model.activation"):
        MLP(in_shape=(4,), num_classes=2, activation="swishy")
