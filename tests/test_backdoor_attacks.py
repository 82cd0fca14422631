"""Backdoor attacks as pure functions / hooks on tensors (no simulation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from attacks.backdoor import (
    DBA,
    PGD,
    BadNets,
    EdgeCase,
    ModelReplacement,
    Neurotoxin,
    dba_pieces,
    load_edge_images,
    neurotoxin_mask,
    poison_batch,
    project_l2,
    replacement_scale,
    square_pixels,
    stamp,
    triggered_testset,
)
from attacks.base import Chain
from fedsim.local import LocalRun, PlainSGD, train_loop


def test_square_trigger_stamps_exactly_its_pixels():
    x = torch.zeros(3, 1, 28, 28)
    out = stamp(x, square_pixels(28, 28, size=4, position="bottom-right", margin=1), value=1.0)
    expected = torch.zeros(28, 28)
    expected[23:27, 23:27] = 1.0
    assert torch.equal(out[:, 0], expected.expand(3, 28, 28))
    assert torch.equal(x, torch.zeros_like(x))  # input untouched
    tl = stamp(x, square_pixels(28, 28, 3, "top-left", 0), 2.0)
    assert tl[0, 0, :3, :3].eq(2.0).all() and tl[0, 0].sum() == 2.0 * 9


def test_stamp_max_uses_per_channel_white():
    x = torch.randn(4, 3, 8, 8)
    out = stamp(x, [(0, 0)], "max")
    assert torch.allclose(out[:, :, 0, 0], x.amax(dim=(0, 2, 3)).expand(4, 3))


def test_dba_pieces_union_is_the_full_trigger():
    pieces = dba_pieces(4, rows=1, cols=4, gap=2)
    # Xie et al.'s MNIST pattern: rows 0 and 3, columns 0-3 and 6-9
    full = {(r, c) for r in (0, 3) for c in (*range(0, 4), *range(6, 10))}
    assert set().union(*map(set, pieces)) == full
    assert all(len(p) == 4 for p in pieces) and sum(len(p) for p in pieces) == len(full)  # disjoint
    dba = DBA(target=2)
    assert set(dba.test_pixels(28, 28)) == full
    dba.bind(member_index=5, attack_index=0)
    assert dba.train_pixels(28, 28) == pieces[1]
    by_round = DBA(piece="round")
    by_round.bind(member_index=0, attack_index=6)
    assert by_round.train_pixels(28, 28) == pieces[2]


def test_poison_batch_fraction_and_testset():
    x, y = torch.zeros(64, 1, 28, 28), torch.arange(64) % 10
    xp, yp = poison_batch(x, y, square_pixels(28, 28), target=7, n_poison=20, value=1.0)
    assert (yp[:20] == 7).all() and torch.equal(yp[20:], y[20:])
    assert xp[:20, 0, 23:27, 23:27].eq(1).all() and xp[20:].eq(0).all()
    xb, yb = triggered_testset(x, y, square_pixels(28, 28), target=7, value=1.0)
    assert len(yb) == int((y != 7).sum()) and (yb == 7).all() and xb[:, 0, 23:27, 23:27].eq(1).all()
    assert BadNets(target=7).backdoor_testset(x, y)[1].eq(7).all()


def _run(model, steps, lr=0.1):
    return LocalRun(model=model, global_params={k: v.detach().clone() for k, v in model.state_dict().items()},
                    content=RecordDict(), config=ConfigRecord(), state=RecordDict(), device=torch.device("cpu"),
                    lr=lr, total_steps=steps, partition_id=0, server_round=1)


def test_pgd_stays_inside_its_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(64, 1, 4, 4) * 5, torch.randint(0, 4, (64,))
    run = _run(model, steps=25, lr=1.0)
    g = [run.global_params[n].clone() for n, _ in run.params()]
    attack = PGD(eps=0.5, project_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_loop(run, x, y, [PlainSGD()] + attack.hooks(np.random.default_rng(0)), opt, 8, torch.Generator().manual_seed(0))
    dist = torch.sqrt(sum(((p.detach() - c) ** 2).sum() for (_, p), c in zip(run.params(), g)))
    assert float(dist) <= 0.5 + 1e-5
    unprojected = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    unprojected.load_state_dict(run.global_params)
    run2 = _run(unprojected, steps=25, lr=1.0)
    opt2 = torch.optim.SGD(unprojected.parameters(), lr=1.0)
    train_loop(run2, x, y, [PlainSGD()], opt2, 8, torch.Generator().manual_seed(0))
    assert float(torch.sqrt(sum(((p.detach() - c) ** 2).sum() for (_, p), c in zip(run2.params(), g)))) > 0.5  # it had to project


def test_project_l2_pure():
    p, c = [torch.tensor([3.0, 4.0])], [torch.zeros(2)]
    assert project_l2(p, c, 1.0) == pytest.approx(5.0)
    assert torch.allclose(p[0], torch.tensor([0.6, 0.8]))
    q = [torch.tensor([0.3, 0.4])]
    project_l2(q, c, 1.0)
    assert torch.allclose(q[0], torch.tensor([0.3, 0.4]))  # inside: unchanged


def test_model_replacement_scales_as_specified():
    assert replacement_scale(1000, 100) == 10.0
    delta = {"w": torch.ones(3), "b": torch.full((2,), -2.0)}
    out = ModelReplacement(scale=4.0).transform_update(delta, np.random.default_rng(0))
    assert torch.equal(out["w"], torch.full((3,), 4.0)) and torch.equal(out["b"], torch.full((2,), -8.0))
    assert ModelReplacement().transform_update(delta, None) is delta  # 'auto': the server half scales
    assert ModelReplacement(scale=3.0).server_hook({0}, None) is None
    with pytest.raises(ValueError, match="attack.scale"):
        ModelReplacement(scale=-1)


def test_neurotoxin_mask_excludes_top_k():
    g = [torch.tensor([[0.1, -5.0], [0.2, 0.3]]), torch.tensor([4.0, -0.05, 0.0, 0.01, 0.02, 0.03])]
    masks = neurotoxin_mask(g, ratio=0.2)  # 10 coordinates: the top 2 |g| (5.0 and 4.0) are excluded
    assert torch.equal(masks[0], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(masks[1], torch.tensor([0.0, 1, 1, 1, 1, 1]))
    assert all(m.all() for m in neurotoxin_mask(g, 0.0))


def test_neurotoxin_hook_freezes_the_masked_coordinates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 4, (40,))
    attack = Chain([Neurotoxin(ratio=0.25), BadNets(target=1, size=1, margin=0)])
    rng = np.random.default_rng(0)
    xa, ya = attack.transform_data(x, y, rng)
    run = _run(model, steps=5)
    hooks = attack.hooks(rng)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_loop(run, xa, ya, [PlainSGD()] + hooks, opt, 8, torch.Generator().manual_seed(0))
    nt = next(h for h in hooks if hasattr(h, "masks"))
    frozen = sum(int((m == 0).sum()) for m in nt.masks)
    assert frozen == int(0.25 * sum(p.numel() for _, p in run.params()))
    for (n, p), m in zip(run.params(), nt.masks):
        changed = p.detach() != run.global_params[n]
        assert not (changed & (m == 0)).any()  # masked coordinates never move


def test_edge_case_data_and_testset():
    train, test = load_edge_images(None, (1, 28, 28))
    assert train.shape[1:] == (1, 28, 28) and len(train) + len(test) == 179  # sklearn digits' "7"s
    assert 0 <= float(train.min()) and float(train.max()) <= 1
    assert train[:, :, :4].abs().sum() == 0  # centred in the 20x20 box, like MNIST
    x = torch.rand(300, 1, 28, 28) * 3 - 1  # standardised-looking data in [-1, 2]
    y = torch.randint(2, 10, (300,))
    attack = EdgeCase(target=1, num_edge=50, num_clean=100)
    xa, ya = attack.transform_data(x, y, np.random.default_rng(0))
    assert len(ya) == 150 and int((ya == 1).sum()) == 50
    assert float(xa.min()) >= float(x.min()) - 1e-6 and float(xa.max()) <= float(x.max()) + 1e-6
    xb, yb = attack.backdoor_testset(x, y)
    assert len(yb) == len(test) and (yb == 1).all()


def test_edge_case_npz_path(tmp_path):
    p = tmp_path / "edge.npz"
    np.savez(p, x=(np.random.default_rng(0).random((10, 28, 28)) * 255).astype(np.uint8))
    train, test = load_edge_images(str(p), (1, 28, 28))
    assert len(train) == 5 and len(test) == 5
    with pytest.raises(ValueError, match="attack.path"):
        EdgeCase(path=str(tmp_path / "missing.npz"))
