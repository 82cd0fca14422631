"""Merge rules of decentralized (gossip) learning, as pure functions on state dicts.

Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems", arXiv 2404.04616 (2024); spec ``../shared/specs/algorithms.md`` Sec. 5.2,
checked against the authors' C++ simulator (twoentartian/DFL2,
``simulator_opti_model_update.hpp``: ``train_50_average_50``, ``train_0_average_100``,
``train_50_average_50_fix_variance_auto`` / ``_self``) and their PyTorch port
(twoentartian/DFL_torch, ``py_src/model_variance_correct.py``).

Node i with own model w_i and received models w_1..w_m (m >= 1), per tensor l:

* **plain**:  w[l] = beta * w_i[l] + (1 - beta) * (1/m) sum_j w_j[l]
  (beta = 0.5 is the authors' ``train_50_average_50``, beta = 0 ``train_0_average_100``).
* **vca**: the same blend, then each correctable tensor is rescaled about its own mean so its
  (population) variance equals a target t:

      mu = mean(w[l]),  c = Var(w[l]),  w[l] <- (w[l] - mu) * sqrt((t + eps) / (c + eps)) + mu

  with the target (``target``)

  * ``"auto"`` (default; C++ ``fix_variance_auto``, DFL_torch ``FollowOthers``):
    t = (1/m) sum_j Var(w_j[l]), the mean variance of the received models;
  * ``"self"``: t = Var(w_i[l]) of the node's own model **before** merging (C++
    ``fix_variance_self`` reads ``self_old_variance`` before the blend). DFL_torch's
    ``FollowSelfVariance`` is handed the already merged model, so there t = c and the correction
    is a no-op; we implement the C++ meaning;
  * ``"follow_beta"``: t = beta * Var(w_i[l]) + (1 - beta) * (1/m) sum_j Var(w_j[l])
    (DFL_torch ``FollowConservative``; its in-place blend hands it the merged model's variance
    too; we take the own variance before merging, as for ``"self"``).

Why the correction: averaging m *uncorrelated* tensors of equal variance s^2 gives variance
(beta^2 + (1 - beta)^2 / m) s^2, which drives weights far below the scale their initialisation
intends; FL never sees this because all clients start from one model.

Which tensors (``scope``):

* ``"weights"`` (default, C++: Caffe rescales ``blobs[0]`` only): weight tensors, i.e. float
  tensors named ``*weight`` with at least 2 dimensions (conv kernels, linear matrices); biases
  and 1-d norm scales are averaged but not rescaled;
* ``"all"`` (DFL_torch): every float tensor with more than one element.

BatchNorm buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) are never averaged
nor rescaled: the node keeps its own (DFL_torch excludes them from both). Other non-float
tensors are kept from the own model too.

``eps``: DFL_torch adds 1e-4 inside the square root; the C++ code adds nothing. Xavier-scale
variances of LeNet-5's layers are ~1e-3..1e-2 (fc1: 2/(400+120) = 3.8e-3) and a beta = 0.5 merge
of 8 neighbours shrinks them ~3.5x, so 1e-4 is not small against them and the port under-corrects
(c = 1e-3, t = 4e-3 gives 0.93 t; with deeper shrinkage, e.g. c = 4e-4, 0.82 t). Our default, 1e-12, only guards a division by zero.
Variance is the population variance (C++ ``calculate_variance`` divides by n; DFL_torch uses
torch's unbiased ``var``; the factor n/(n-1) cancels in the ratio up to eps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "MERGES",
    "TARGETS",
    "SCOPES",
    "is_bn_buffer",
    "is_correctable",
    "layer_variance",
    "rescale_to_variance",
    "blend",
    "merge",
]

MERGES = ("plain", "vca")
TARGETS = ("auto", "self", "follow_beta")
SCOPES = ("weights", "all")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
DEFAULT_EPS = 1e-12

State = Mapping[str, torch.Tensor]


def is_bn_buffer(name: str) -> bool:
    """True for BatchNorm running statistics (never averaged, never rescaled)."""
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def is_mergeable(name: str, t: torch.Tensor) -> bool:
    """Tensors that are averaged: floating point and not a BN buffer."""
    return t.is_floating_point() and not is_bn_buffer(name)


def is_correctable(name: str, t: torch.Tensor, scope: str = "weights") -> bool:
    """Whether VCA rescales this tensor (see the module docstring for ``scope``)."""
    if not is_mergeable(name, t) or t.numel() <= 1:
        return False
    if scope == "all":
        return True
    if scope == "weights":
        return name.rsplit(".", 1)[-1].endswith("weight") and t.dim() >= 2
    raise ValueError(f"scope: '{scope}' is not one of {SCOPES}")


def layer_variance(t: torch.Tensor) -> torch.Tensor:
    """Population variance of all elements of ``t`` (float64 scalar)."""
    return t.detach().to(torch.float64).var(unbiased=False)


def rescale_to_variance(t: torch.Tensor, target: torch.Tensor | float, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """(t - mean) * sqrt((target + eps) / (Var(t) + eps)) + mean, in t's dtype."""
    x = t.detach().to(torch.float64)
    mu = x.mean()
    cur = x.var(unbiased=False)
    scale = torch.sqrt((torch.as_tensor(target, dtype=torch.float64) + eps) / (cur + eps))
    return ((x - mu) * scale + mu).to(t.dtype)


def blend(own: State, received: Sequence[State], beta: float) -> dict[str, torch.Tensor]:
    """beta * own + (1 - beta) * mean(received) on mergeable tensors; the rest kept from ``own``.

    With no received model the own model is returned unchanged (a node averages only when its
    buffer holds models, as in the authors' simulators).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (got {beta})")
    out: dict[str, torch.Tensor] = {}
    m = len(received)
    for name, w in own.items():
        if m == 0 or not is_mergeable(name, w):
            out[name] = w.detach().clone()
            continue
        acc = torch.zeros_like(w, dtype=torch.float64)
        for r in received:
            if r[name].shape != w.shape:
                raise ValueError(f"received tensor '{name}' has shape {tuple(r[name].shape)}, own {tuple(w.shape)}")
            acc += r[name].detach().to(torch.float64)
        mixed = beta * w.detach().to(torch.float64) + (1.0 - beta) * acc / m
        out[name] = mixed.to(w.dtype)
    return out


def merge(
    own: State,
    received: Sequence[State],
    beta: float = 0.5,
    rule: str = "plain",
    target: str = "auto",
    scope: str = "weights",
    eps: float = DEFAULT_EPS,
) -> dict[str, torch.Tensor]:
    """One node's merge step: ``plain`` blend or variance-corrected ``vca`` (module docstring)."""
    if rule not in MERGES:
        raise ValueError(f"merge: '{rule}' is not one of {MERGES}")
    if target not in TARGETS:
        raise ValueError(f"target: '{target}' is not one of {TARGETS}")
    if scope not in SCOPES:
        raise ValueError(f"scope: '{scope}' is not one of {SCOPES}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (got {eps})")
    out = blend(own, received, beta)
    if rule == "plain" or not received:
        return out
    m = len(received)
    for name, w in own.items():
        if not is_correctable(name, w, scope):
            continue
        others = sum(layer_variance(r[name]) for r in received) / m
        if target == "auto":
            t = others
        elif target == "self":
            t = layer_variance(w)
        else:  # follow_beta
            t = beta * layer_variance(w) + (1.0 - beta) * others
        out[name] = rescale_to_variance(out[name], t, eps)
    return out
