"""Each attack transform alone: data, training-time, update and colluding attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.base import Chain
from attacks.colluding import ALIE, IPM, MinMax, alie_z, minmax_gamma
from attacks.data import (
    DegradeBatches,
    LabelFlip,
    MultiLabelFlip,
    PartialTraining,
    Unreliable,
    flip_labels,
    gaussian_blur,
    gaussian_kernel,
    pixel_noise,
)
from attacks.update import GaussianNoise, NonFinite, Scale, SignFlip, is_buffer


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- data attacks -----------------------------------------------------------------------------
def test_label_flip_changes_only_source_labels():
    y = torch.tensor([0, 1, 2, 3, 7, 1, 9])
    x = torch.randn(7, 1, 4, 4)
    x2, y2 = LabelFlip(1, 7).transform_data(x, y, rng())
    assert torch.equal(x2, x)
    assert y2.tolist() == [0, 7, 2, 3, 7, 7, 9]
    _, y3 = MultiLabelFlip().transform_data(x, y, rng())
    assert y3.tolist() == [0, 7, 7, 7, 7, 7, 9]
    assert flip_labels(y, [5], 0).tolist() == y.tolist()
    with pytest.raises(ValueError, match="target"):
        LabelFlip([1, 7], 7)


def test_gaussian_blur_keeps_shape_and_mean_and_smooths():
    k = gaussian_kernel(7, 30.0)
    assert k.shape == (7, 7) and torch.isclose(k.sum(), torch.tensor(1.0))
    assert (k.max() - k.min()) < 1e-3  # sigma 30 on a 7x7 kernel is nearly a box filter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 28, 28, generator=g)
    b = gaussian_blur(x, 7, 30.0)
    assert b.shape == x.shape
    assert b.std() < 0.3 * x.std()  # white noise averaged over ~49 pixels
    const = torch.full((1, 3, 8, 8), 2.5)
    assert torch.allclose(gaussian_blur(const, 5, 1.0), const, atol=1e-6)
    with pytest.raises(ValueError, match="images"):
        gaussian_blur(torch.randn(4, 10), 3, 1.0)


def test_pixel_noise_uses_the_given_rng():
    x = torch.zeros(100, 1, 8, 8)
    a, b, c = pixel_noise(x, 0.5, 0.0, rng(1)), pixel_noise(x, 0.5, 0.0, rng(1)), pixel_noise(x, 0.5, 0.0, rng(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.2 < float(a.std()) < 0.4  # E[s^2] = max_std^2 / 3 -> std ~ 0.29


def _run_hooks(attack, n_batches: int, seed: int = 0):
    """Feed ``n_batches`` batches through an attack's hooks; return the outputs (None = skipped)."""
    hooks = attack.hooks(rng(seed))
    outs = []
    for _ in range(n_batches):
        x, y = torch.ones(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
        out = (x, y)
        for h in hooks:
            out = h.on_batch(None, *out)
            if out is None:
                break
        outs.append(out)
    return outs


def test_partial_training_skips_the_right_fraction():
    outs = _run_hooks(PartialTraining(0.3), 2000)
    used = sum(o is not None for o in outs) / len(outs)
    assert abs(used - 0.3) < 0.04
    assert all(o is not None for o in _run_hooks(PartialTraining(1.0), 50))


def test_degrade_batches_blurs_a_fraction_and_is_seeded():
    def degraded(outs):
        return [not torch.equal(o[0], torch.ones(4, 1, 8, 8)) for o in outs]

    attack = DegradeBatches(0.5, method="noise", noise_max_std=0.5)
    flags = degraded(_run_hooks(attack, 1000))
    assert abs(np.mean(flags) - 0.5) < 0.06
    assert flags == degraded(_run_hooks(attack, 1000))  # same rng, same batches
    # blur of a constant image is the image itself: every batch comes back (numerically) unchanged
    outs = _run_hooks(DegradeBatches(1.0, method="blur", kernel_size=5), 20)
    assert all(torch.allclose(o[0], torch.ones(4, 1, 8, 8), atol=1e-6) for o in outs)


def test_unreliable_chains_partial_training_then_degradation():
    u = Unreliable(train_fraction=0.3, degrade_fraction=0.5, method="noise")
    assert [type(a).__name__ for a in u.attacks] == ["PartialTraining", "DegradeBatches"]
    outs = _run_hooks(u, 1000)
    used = [o for o in outs if o is not None]
    assert abs(len(used) / 1000 - 0.3) < 0.05
    noisy = [not torch.equal(o[0], torch.ones(4, 1, 8, 8)) for o in used]
    assert abs(np.mean(noisy) - 0.5) < 0.1


# --- update attacks -------------------------------------------------------------------------
def _delta():
    return {"fc.weight": torch.ones(3, 2), "bn.running_mean": torch.ones(2), "fc.bias": torch.full((3,), 2.0)}


def test_sign_flip_scales_and_leaves_buffers():
    out = SignFlip(scale=2.0).transform_update(_delta(), rng())
    assert torch.equal(out["fc.weight"], -2 * torch.ones(3, 2)) and torch.equal(out["fc.bias"], torch.full((3,), -4.0))
    assert torch.equal(out["bn.running_mean"], torch.ones(2))
    out = SignFlip(params_only=False).transform_update(_delta(), rng())
    assert torch.equal(out["bn.running_mean"], -torch.ones(2))
    assert is_buffer("layer1.0.bn1.num_batches_tracked") and not is_buffer("conv.weight")
    assert torch.equal(Scale(3.0).transform_update(_delta(), rng())["fc.weight"], 3 * torch.ones(3, 2))


def test_gaussian_noise_statistics_and_seeding():
    big = {"w": torch.zeros(200_000)}
    out = GaussianNoise(std=0.01, mean=0.0).transform_update(big, rng(3))["w"]
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 0.01) < 2e-4
    again = GaussianNoise(std=0.01).transform_update(big, rng(3))["w"]
    assert torch.equal(out, again)
    assert torch.equal(GaussianNoise(0.5).transform_update(_delta(), rng())["bn.running_mean"], torch.ones(2))


def test_nonfinite_and_chain():
    out = NonFinite("inf").transform_update(_delta(), rng())
    assert all(torch.isinf(v).all() for v in out.values())
    chained = Chain([LabelFlip(1, 7), SignFlip(1.0)])
    _, y = chained.transform_data(torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]), rng())
    assert y.tolist() == [7, 2]
    assert torch.equal(chained.transform_update({"w": torch.ones(2)}, rng())["w"], -torch.ones(2))


# --- colluding attacks ----------------------------------------------------------------------
def _benign(n: int = 8, d: int = 50, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    return [base + 0.3 * torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]


# Phi^-1 values computed independently (scipy.stats.norm.ppf), s = floor(n/2 + 1) - m:
# paper  Phi^-1((n - s)/n):           n=10,m=2: Phi^-1(0.6) = 0.2533471031; n=50,m=12: Phi^-1(0.72) = 0.5828415073
# honest Phi^-1((n - m - s)/(n - m)): n=10,m=2: Phi^-1(0.5) = 0;  n=50,m=12: Phi^-1(24/38) = 0.3360381404;
#                                     n=10,m=1: Phi^-1(4/9) = -0.1397102989
Z_PAPER_10_2, Z_PAPER_50_12, Z_HONEST_50_12, Z_HONEST_10_1 = 0.2533471031, 0.5828415073, 0.3360381404, -0.1397102989


def test_alie_z_rules_against_independent_values():
    assert alie_z(10, 2) == pytest.approx(Z_PAPER_10_2, abs=1e-9)
    assert alie_z(50, 12) == pytest.approx(Z_PAPER_50_12, abs=1e-9)
    assert alie_z(50, 12, "honest") == pytest.approx(Z_HONEST_50_12, abs=1e-9)
    assert alie_z(10, 2, "honest") == pytest.approx(0.0, abs=1e-12)
    assert alie_z(10, 1, "honest") == pytest.approx(Z_HONEST_10_1, abs=1e-9)
    with pytest.raises(ValueError, match="attack.z_rule"):
        alie_z(10, 2, "reimpl")
    with pytest.raises(ValueError, match="attack.z_rule"):
        ALIE(z_rule="nope")
    with pytest.raises(ValueError, match="attack.z_rule"):
        ALIE(z=1.0, z_rule="honest")  # a fixed z leaves nothing for the rule to do


def test_alie_is_mean_minus_z_sigma():
    benign, mal = _benign(), _benign(2, seed=9)  # n = 10, m = 2
    out = ALIE().apply(benign, mal, rng())
    x = torch.stack(benign)
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    assert len(out) == 2 and torch.allclose(out[0], mu - Z_PAPER_10_2 * sd)
    assert torch.allclose(out[1], out[0])
    assert torch.allclose(ALIE(z_rule="honest").apply(benign, mal, rng())[0], mu)  # z = 0 at n=10, m=2
    out_h = ALIE(z_rule="honest").apply(_benign(9), _benign(1, seed=9), rng())[0]  # n = 10, m = 1
    x9 = torch.stack(_benign(9))
    assert torch.allclose(out_h, x9.mean(0) - Z_HONEST_10_1 * x9.std(0, unbiased=False))
    assert torch.allclose(ALIE(z=1.0).apply(benign, mal, rng())[1], x.mean(0) - x.std(0, unbiased=False))
    own = ALIE(z=1.0, stats_from="malicious").apply(benign, mal, rng())[0]
    assert torch.allclose(own, torch.stack(mal).mean(0) - torch.stack(mal).std(0, unbiased=False))


def test_ipm_points_against_the_benign_mean():
    benign = _benign()
    out = IPM(epsilon=0.5).apply(benign, _benign(3, seed=5), rng())
    mu = torch.stack(benign).mean(0)
    assert len(out) == 3 and torch.allclose(out[2], -0.5 * mu)
    assert float(out[0] @ mu) < 0


def test_minmax_stays_within_the_benign_spread_at_the_largest_gamma():
    benign = _benign()
    b = torch.stack(benign)
    out = MinMax(dev="unit_vec").apply(benign, _benign(2, seed=4), rng())
    threshold = torch.cdist(b, b).max()
    mal = out[0]
    assert torch.linalg.norm(b - mal, dim=1).max() <= threshold + 1e-9
    mu = b.mean(0)
    p = -mu / torch.linalg.norm(mu)
    gamma = minmax_gamma(b, mu, p, 50.0, 1e-5)
    assert gamma > 0
    assert torch.linalg.norm(b - (mu + (gamma + 1e-3) * p), dim=1).max() > threshold  # maximal
    for dev in ("sign", "std"):
        o = MinMax(dev=dev).apply(benign, [benign[0]], rng())[0]
        assert torch.linalg.norm(b - o, dim=1).max() <= threshold + 1e-9
    assert MinMax().apply(benign[:1], [benign[0]], rng())[0] is benign[0]  # too few benign: unchanged
