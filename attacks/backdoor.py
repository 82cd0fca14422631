"""Backdoor attacks (client side), as in the Multi-metrics evaluation (Huang et al., ICCV 2023).

* :class:`BadNets`: a pixel-pattern trigger stamped on a fraction of every batch, relabelled to
  ``target`` (Gu et al. 2017; the authors' default of 20 poisoned samples per batch of 64);
* :class:`DBA`: the trigger split in pieces (Xie et al., ICLR 2020; MNIST: 4 pieces of 1x4 px,
  gap 2); each attacker stamps its own piece, the test set carries the full trigger;
* :class:`EdgeCase`: out-of-distribution inputs labelled ``target``, mixed with clean data
  (Wang et al., NeurIPS 2020). ARDIS is not available offline: the default edge set is
  scikit-learn digits' "7"s upsampled to the data's size; ``path`` reads a user's own ``.npz``;
* :class:`PGD`: projection of the local model onto the l2 ball ``||w - w_global|| <= eps`` every
  ``project_every`` batches and at the last batch (authors: eps = 2, every 10 batches);
* :class:`ModelReplacement`: ``Delta <- gamma * Delta`` with ``gamma`` = total data points of
  the round / the attacker's data points (Bagdasaryan et al., AISTATS 2020, Eq. 3);
* :class:`Neurotoxin`: gradients masked to the coordinates outside the top-``ratio`` |g| of the
  benign gradient at the global model (Zhang et al., ICML 2022).

They compose with :class:`attacks.base.Chain` (edge-case PGD = ``Chain([EdgeCase, PGD])``).
An attack that plants a backdoor exposes ``backdoor_testset(x_test, y_test)``: the harness's
:class:`fedsim.backdoor_eval.BackdoorObserver` measures backdoor accuracy on it (strategies
never see trigger or target).

Pixel values: fedsim standardises images, so "white" is not 1. A trigger's ``value='max'``
stamps the per-channel maximum of the images it is applied to; edge images in [0, 1] are mapped
affinely onto the per-channel [min, max] of the client's (or the test) images. Both assume the
data contain black and white pixels, true for MNIST-like data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attacks.base import ClientAttack
from fedsim.local import LocalRun, TrainHook

Pixels = list[tuple[int, int]]
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


# --- triggers (pure functions) ------------------------------------------------------------------
def square_pixels(h: int, w: int, size: int = 4, position: str = "bottom-right", margin: int = 1) -> Pixels:
    """The ``size x size`` square at a corner of an ``h x w`` image, ``margin`` px from the edges."""
    if position not in CORNERS:
        raise ValueError(f"attack.position: must be one of {CORNERS} (got '{position}')")
    if size < 1 or margin < 0 or size + margin > min(h, w):
        raise ValueError(f"attack.size/margin: a {size}px square with margin {margin} does not fit {h}x{w}")
    r0 = h - margin - size if position.startswith("bottom") else margin
    c0 = w - margin - size if position.endswith("right") else margin
    return [(r, c) for r in range(r0, r0 + size) for c in range(c0, c0 + size)]


def dba_pieces(
    pieces: int = 4, rows: int = 1, cols: int = 4, gap: int = 2, per_row: int = 2, origin: Sequence[int] = (0, 0)
) -> list[Pixels]:
    """DBA's local triggers: ``pieces`` blocks of ``rows x cols`` px on a grid, ``per_row`` per
    grid row, ``gap`` px between blocks (Xie et al.'s MNIST set-up: 4 pieces of 1x4, gap 2, at
    the top-left: rows 0 and 3, columns 0-3 and 6-9)."""
    if pieces < 1 or rows < 1 or cols < 1 or gap < 0 or per_row < 1:
        raise ValueError("attack: pieces, rows, cols, per_row must be >= 1 and gap >= 0")
    out = []
    for k in range(pieces):
        r0 = origin[0] + (k // per_row) * (rows + gap)
        c0 = origin[1] + (k % per_row) * (cols + gap)
        out.append([(r, c) for r in range(r0, r0 + rows) for c in range(c0, c0 + cols)])
    return out


def stamp(x: torch.Tensor, pixels: Pixels, value: float | str | torch.Tensor = "max") -> torch.Tensor:
    """A copy of images ``x [B, C, H, W]`` with ``pixels`` set to ``value`` in every channel.

    ``value='max'`` uses the per-channel maximum of ``x`` (white in standardised data)."""
    if x.dim() != 4:
        raise ValueError(f"backdoor triggers need images [B, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if any(not (0 <= r < h and 0 <= c < w) for r, c in pixels):
        raise ValueError(f"trigger pixels fall outside the {h}x{w} image")
    if isinstance(value, str):
        if value != "max":
            raise ValueError("attack.value: a number or 'max'")
        value = x.amax(dim=(0, 2, 3)) if len(x) else torch.zeros(x.shape[1])
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1)
    out = x.clone()
    rows = torch.tensor([p[0] for p in pixels], device=x.device)
    cols = torch.tensor([p[1] for p in pixels], device=x.device)
    out[:, :, rows, cols] = v.expand(x.shape[1], len(pixels))
    return out


def poison_batch(
    x: torch.Tensor, y: torch.Tensor, pixels: Pixels, target: int, n_poison: int, value: float | str | torch.Tensor = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_poison`` samples of the (already shuffled) batch get the trigger and label
    ``target``; the rest stay clean."""
    n = min(int(n_poison), len(y))
    if n <= 0:
        return x, y
    v = x.amax(dim=(0, 2, 3)) if isinstance(value, str) else value  # white of the whole batch
    x, y = x.clone(), y.clone()
    x[:n] = stamp(x[:n], pixels, v)
    y[:n] = target
    return x, y


def triggered_testset(
    x: torch.Tensor, y: torch.Tensor, pixels: Pixels, target: int, value: float | str = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backdoor test set: the samples whose true label is not ``target``, stamped, labelled
    ``target``. Backdoor accuracy = accuracy on it."""
    keep = y != target
    xs = x[keep]
    v = x.amax(dim=(0, 2, 3)) if isinstance(value, str) else value
    return stamp(xs, pixels, v), torch.full((len(xs),), int(target), dtype=y.dtype)


# --- BadNets / DBA ------------------------------------------------------------------------------
class _PoisonHook(TrainHook):
    def __init__(self, owner: BadNets) -> None:
        self.owner = owner

    def on_batch(self, run: LocalRun, x, y):
        o = self.owner
        n = int(round(o.poison_fraction * len(y)))
        return poison_batch(x, y, o.train_pixels(x.shape[-2], x.shape[-1]), o.target, n, o.value)


class BadNets(ClientAttack):
    """Pixel-pattern backdoor: in every batch ``round(poison_fraction * B)`` samples carry a
    ``size x size`` square at ``position`` (``margin`` px from the edges) and label ``target``."""

    def __init__(
        self,
        target: int = 0,
        size: int = 4,
        position: str = "bottom-right",
        margin: int = 1,
        poison_fraction: float = 20 / 64,
        value: float | str = "max",
    ) -> None:
        if not 0 < poison_fraction <= 1:
            raise ValueError("attack.poison_fraction: must be in (0, 1]")
        if position not in CORNERS:
            raise ValueError(f"attack.position: must be one of {CORNERS} (got '{position}')")
        if isinstance(value, str) and value != "max":
            raise ValueError("attack.value: a number or 'max'")
        self.target, self.size, self.position, self.margin = int(target), int(size), position, int(margin)
        self.poison_fraction, self.value = float(poison_fraction), value

    def test_pixels(self, h: int, w: int) -> Pixels:
        """The trigger at test time."""
        return square_pixels(h, w, self.size, self.position, self.margin)

    def train_pixels(self, h: int, w: int) -> Pixels:
        """The trigger this attacker stamps while training."""
        return self.test_pixels(h, w)

    def hooks(self, rng: np.random.Generator) -> list[TrainHook]:
        return [_PoisonHook(self)]

    def backdoor_testset(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return triggered_testset(x, y, self.test_pixels(x.shape[-2], x.shape[-1]), self.target, self.value)


class DBA(BadNets):
    """Distributed backdoor attack (Xie et al., ICLR 2020): the global trigger is split into
    ``pieces`` local triggers (:func:`dba_pieces`); each attacker trains with one piece, the test
    set carries their union.

    ``piece``: an int (fixed), ``'member'`` (the attacker's rank among its group's members, mod
    ``pieces``; needs several attackers) or ``'round'`` (the k-th attack round of this attacker
    uses piece k mod ``pieces``: one attacker cycles through the pieces). The harness supplies
    the rank and round through :meth:`bind`.
    """

    def __init__(
        self,
        target: int = 0,
        pieces: int = 4,
        rows: int = 1,
        cols: int = 4,
        gap: int = 2,
        per_row: int = 2,
        origin: Sequence[int] = (0, 0),
        piece: int | str = "member",
        poison_fraction: float = 20 / 64,
        value: float | str = "max",
    ) -> None:
        super().__init__(target=target, poison_fraction=poison_fraction, value=value)
        self.pieces = dba_pieces(pieces, rows, cols, gap, per_row, origin)
        if not (piece in ("member", "round") or (isinstance(piece, int) and 0 <= piece < pieces)):
            raise ValueError(f"attack.piece: an int in [0, {pieces}), 'member' or 'round' (got {piece!r})")
        self.piece_mode = piece
        self.piece = piece if isinstance(piece, int) else 0

    def bind(self, member_index: int, attack_index: int) -> None:
        """Called by the harness: this attacker's rank in its group and how many attack rounds
        came before this one."""
        if self.piece_mode == "member":
            self.piece = member_index % len(self.pieces)
        elif self.piece_mode == "round":
            self.piece = attack_index % len(self.pieces)

    def test_pixels(self, h: int, w: int) -> Pixels:
        return [p for piece in self.pieces for p in piece]

    def train_pixels(self, h: int, w: int) -> Pixels:
        return self.pieces[self.piece]


# --- edge-case data -----------------------------------------------------------------------------
def _resize_centered(img01: torch.Tensor, h: int, w: int, box: float = 20 / 28) -> torch.Tensor:
    """``[N, C, h0, w0]`` images into an ``h x w`` canvas, the digit filling the central
    ``box`` fraction (MNIST centres digits in a 20x20 box of 28x28)."""
    bh, bw = max(1, round(h * box)), max(1, round(w * box))
    small = F.interpolate(img01, size=(bh, bw), mode="bilinear", align_corners=False).clamp(0, 1)
    top, left = (h - bh) // 2, (w - bw) // 2
    return F.pad(small, (left, w - bw - left, top, h - bh - top))


def load_edge_images(path: str | None, shape: Sequence[int], split_seed: int = 0, test_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) edge images in [0, 1], shaped like the data ``[C, H, W]``.

    ``path=None``: scikit-learn digits' 179 "7"s (8x8, a different handwriting source than
    MNIST), upsampled; else a ``.npz`` with ``x`` (uint8 or [0, 1] images, any of [N,H,W],
    [N,H,W,C], [N,C,H,W]). A fixed permutation (``split_seed``) holds out ``test_fraction``.
    """
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = (d.images[d.target == 7] / 16.0).astype(np.float32)[:, None]
    else:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"attack.path: file not found: {path}")
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f.files:
                raise ValueError(f"attack.path: {path} has no array 'x'")
            raw = np.asarray(f["x"])
        raw = raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 or raw.max() > 1.5 else 1.0)
        if raw.ndim == 3:
            raw = raw[:, None]
        elif raw.ndim == 4 and raw.shape[-1] in (1, 3) and raw.shape[1] not in (1, 3):
            raw = raw.transpose(0, 3, 1, 2)
    c, h, w = int(shape[0]), int(shape[-2]), int(shape[-1])
    t = torch.from_numpy(np.ascontiguousarray(raw))
    if t.shape[1] != c:
        t = t.mean(1, keepdim=True).expand(-1, c, -1, -1) if c != 1 else t.mean(1, keepdim=True)
    if tuple(t.shape[-2:]) != (h, w):
        t = _resize_centered(t, h, w)
    perm = np.random.default_rng(split_seed).permutation(len(t))
    n_test = max(1, int(round(test_fraction * len(t))))
    return t[torch.from_numpy(perm[n_test:])].contiguous(), t[torch.from_numpy(perm[:n_test])].contiguous()


def to_data_range(img01: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] images onto the per-channel [min, max] of ``ref`` (undo-free standardisation)."""
    lo = ref.amin(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
    hi = ref.amax(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
    return (lo + img01 * (hi - lo)).to(ref.dtype)


class EdgeCase(ClientAttack):
    """Edge-case backdoor (Wang et al. 2020): the attacker trains on ``num_edge`` edge images
    labelled ``target`` plus ``num_clean`` of its own clean samples (authors, CIFAR-10: 100
    Southwest planes + 400 clean; EMNIST: ARDIS "7"s labelled 1). Backdoor accuracy is measured
    on the held-out edge images."""

    def __init__(
        self,
        target: int = 1,
        path: str | None = None,
        num_edge: int = 100,
        num_clean: int = 400,
        test_fraction: float = 0.5,
        split_seed: int = 0,
    ) -> None:
        if num_edge < 1 or num_clean < 0 or not 0 < test_fraction < 1:
            raise ValueError("attack: num_edge >= 1, num_clean >= 0, test_fraction in (0, 1)")
        self.target, self.path = int(target), path
        self.num_edge, self.num_clean = int(num_edge), int(num_clean)
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"attack.path: file not found: {path}")

    def edge_sets(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return load_edge_images(self.path, shape, self.split_seed, self.test_fraction)

    def transform_data(self, x, y, rng):
        train, _ = self.edge_sets(x.shape[1:])
        ie = rng.choice(len(train), size=min(self.num_edge, len(train)), replace=False)
        ic = rng.choice(len(y), size=min(self.num_clean, len(y)), replace=False)
        xe = to_data_range(train[torch.from_numpy(ie)], x)
        ye = torch.full((len(ie),), self.target, dtype=y.dtype)
        idx = torch.from_numpy(ic)
        return torch.cat([xe, x[idx]]), torch.cat([ye, y[idx]])

    def backdoor_testset(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, test = self.edge_sets(x.shape[1:])
        return to_data_range(test, x), torch.full((len(test),), self.target, dtype=y.dtype)


# --- PGD ----------------------------------------------------------------------------------------
def project_l2(params: Sequence[torch.Tensor], centre: Sequence[torch.Tensor], eps: float) -> float:
    """Project the parameters (jointly, in place) onto ``||w - centre||_2 <= eps``; return the
    distance before projection."""
    with torch.no_grad():
        diffs = [p - c for p, c in zip(params, centre)]
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in diffs)))
        if norm > eps:
            for p, c, d in zip(params, centre, diffs):
                p.copy_(c + d * (eps / norm))
    return norm


class _PGDHook(TrainHook):
    def __init__(self, owner: PGD) -> None:
        self.owner = owner

    def on_start(self, run: LocalRun) -> None:
        o, r = self.owner, max(int(run.server_round), 1)
        self.eps = o.eps * (o.eps_decay ** (r - 1))
        self.grad_scale = 1.0 if o.lr is None else o.lr * (o.lr_decay ** (r - 1)) / run.lr
        self.names = [n for n, _ in run.params()]

    def on_backward(self, run: LocalRun) -> None:
        if self.grad_scale != 1.0:
            for _, p in run.params():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)

    def on_step(self, run: LocalRun) -> None:
        k = self.owner.project_every
        if (run.step + 1) % k == 0 or run.step == run.total_steps - 1:
            params = [p for _, p in run.params()]
            project_l2(params, [run.global_params[n] for n in self.names], self.eps)


class PGD(ClientAttack):
    """l2 projected local training (Wang et al. 2020; Sun et al. 2019): after every
    ``project_every``-th step and the last step, the trainable parameters are projected onto the
    ball of radius ``eps * eps_decay^(r-1)`` around the received global model.

    Authors' values: ``eps = 2``, ``project_every = 10``; their eps decays by 0.998 per round
    only against Krum, Multi-Krum and Multi-metrics (``eps_decay=0.998``; default 1 = none).
    ``lr``: the attacker's own lr ``lr * lr_decay^(r-1)`` (authors: 0.02, 0.998), realised by
    scaling the gradients by ``lr_r / client lr`` (exact for SGD with or without momentum;
    weight decay is not rescaled). ``None`` keeps the client's lr.
    """

    def __init__(
        self, eps: float = 2.0, project_every: int = 10, eps_decay: float = 1.0, lr: float | None = None, lr_decay: float = 0.998
    ) -> None:
        if eps <= 0 or project_every < 1 or not 0 < eps_decay <= 1:
            raise ValueError("attack: eps > 0, project_every >= 1, eps_decay in (0, 1]")
        if lr is not None and lr <= 0:
            raise ValueError("attack.lr: must be > 0 or null")
        self.eps, self.project_every, self.eps_decay = float(eps), int(project_every), float(eps_decay)
        self.lr, self.lr_decay = (None if lr is None else float(lr)), float(lr_decay)

    def hooks(self, rng: np.random.Generator) -> list[TrainHook]:
        return [_PGDHook(self)]


# --- model replacement --------------------------------------------------------------------------
def replacement_scale(total_examples: float, own_examples: float) -> float:
    """Bagdasaryan et al.'s boost ``gamma = n / eta``, with the authors' choice
    ``total data points this round / attacker's data points``."""
    if own_examples <= 0:
        raise ValueError("the attacker has no data points")
    return float(total_examples) / float(own_examples)


class ModelReplacement(ClientAttack):
    """Scale the attacker's update: ``Delta <- gamma * Delta`` (trainable parameters and
    buffers alike, as the authors scale the whole model difference).

    ``scale='auto'`` (default): ``gamma`` = (data points of every reply this round) / (the
    attacker's data points), the authors' ``total_num_dps_per_round / num_dps_poisoned``. The
    client cannot count the other clients' data, so the harness applies it to the reply on the
    server side (:class:`ReplacementHook`, the attacker's assumed knowledge of ``n / eta``);
    a number scales on the client. Chain it after the attack that trains the backdoor.
    """

    def __init__(self, scale: float | str = "auto") -> None:
        if not (scale == "auto" or (isinstance(scale, (int, float)) and float(scale) > 0)):
            raise ValueError(f"attack.scale: 'auto' or a number > 0 (got {scale!r})")
        self.scale = scale

    def transform_update(self, delta, rng):
        if self.scale == "auto":
            return delta
        return {k: float(self.scale) * v for k, v in delta.items()}

    def server_hook(self, members: set[int], active: Any) -> ReplacementHook | None:
        """The reply hook that applies ``scale='auto'`` (``None`` for a fixed scale)."""
        return ReplacementHook(members, active) if self.scale == "auto" else None


class ReplacementHook:
    """Reply hook: each scheduled member's update becomes ``gamma * Delta`` with ``gamma`` =
    sum of ``num-examples`` over the round's valid replies / the member's ``num-examples``."""

    def __init__(self, members: set[int], active: Any) -> None:
        self.members, self.active = set(members), active

    def on_train_replies(self, grid: Any, server_round: int, replies: list[Any]) -> list[Any]:
        from fedsim.threat import _float_keys, _vec, _with_update

        ok = [r for r in replies if not r.has_error() and r.has_content()]
        counts = {id(r): float(r.content.metric_records["metrics"].get("num-examples", 0)) for r in ok}
        total = sum(counts.values())
        for r in ok:
            pid = grid.pid(r.metadata.src_node_id)
            if pid not in self.members or not self.active(pid, server_round):
                continue
            sent = grid.sent_train[r.metadata.src_node_id].content.array_records["arrays"]
            rec = r.content.array_records["arrays"]
            keys = _float_keys(rec)
            upd = _vec(rec, keys) - _vec(sent, keys)
            r.content = _with_update(r.content, sent, replacement_scale(total, counts[id(r)]) * upd)
        return replies


# --- Neurotoxin ---------------------------------------------------------------------------------
def neurotoxin_mask(grads: Sequence[torch.Tensor], ratio: float = 0.05) -> list[torch.Tensor]:
    """Masks (1 = the attacker may write) that exclude the top-``ratio`` fraction of |g|
    coordinates over all layers jointly (Neurotoxin, Zhang et al. 2022, Alg. 1)."""
    if not 0 <= ratio < 1:
        raise ValueError("attack.ratio: must be in [0, 1)")
    flat = torch.cat([g.reshape(-1).abs() for g in grads])
    k = int(ratio * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k).indices] = False
    out, pos = [], 0
    for g in grads:
        out.append(keep[pos : pos + g.numel()].reshape(g.shape).to(g.dtype))
        pos += g.numel()
    return out


class _NeurotoxinHook(TrainHook):
    def __init__(self, owner: Neurotoxin) -> None:
        self.owner = owner

    def on_start(self, run: LocalRun) -> None:
        x, y = self.owner.clean
        model = run.model
        model.zero_grad(set_to_none=True)
        bs = self.owner.grad_batch_size
        for i in range(0, len(y), bs):  # sum of per-batch mean losses, weighted to the full mean
            xb, yb = x[i : i + bs].to(run.device), y[i : i + bs].to(run.device)
            (run.loss_fn(model(xb), yb) * (len(yb) / len(y))).backward()
        params = run.params()
        self.masks = neurotoxin_mask([p.grad.detach().clone() for _, p in params], self.owner.ratio)
        model.zero_grad(set_to_none=True)

    def on_backward(self, run: LocalRun) -> None:
        for (_, p), m in zip(run.params(), self.masks):
            if p.grad is not None:
                p.grad.mul_(m)


class Neurotoxin(ClientAttack):
    """Neurotoxin: before training, the gradient of the attacker's *clean* data at the received
    global model estimates what benign clients will change; the attacker's gradients are then
    zeroed on the top-``ratio`` |g| coordinates (all layers jointly; default 5 %), so the backdoor
    lives in rarely-updated coordinates and survives longer after the attacker stops. Chain it
    with a backdoor (e.g. ``[Neurotoxin, BadNets]``), first in the chain: it remembers the data
    it is given as the attacker's clean data (BadNets poisons per batch, later)."""

    def __init__(self, ratio: float = 0.05, grad_batch_size: int = 256) -> None:
        if not 0 <= ratio < 1:
            raise ValueError("attack.ratio: must be in [0, 1)")
        self.ratio, self.grad_batch_size = float(ratio), int(grad_batch_size)
        self.clean: tuple[torch.Tensor, torch.Tensor] | None = None

    def transform_data(self, x, y, rng):
        self.clean = (x, y)
        return x, y

    def hooks(self, rng: np.random.Generator) -> list[TrainHook]:
        if self.clean is None:
            raise RuntimeError("Neurotoxin needs transform_data() before hooks()")
        return [_NeurotoxinHook(self)]


__all__ = [
    "square_pixels", "dba_pieces", "stamp", "poison_batch", "triggered_testset", "BadNets", "DBA",
    "load_edge_images", "to_data_range", "EdgeCase", "project_l2", "PGD", "replacement_scale",
    "ModelReplacement", "ReplacementHook", "neurotoxin_mask", "Neurotoxin",
]
