"""Torch intra-op threads per client worker (``client.num_threads``).

``client.num_threads`` is ``"auto"`` (the default), ``0`` (leave torch's default: one thread per
core) or a positive count. ``"auto"`` resolves as follows:

* a **client worker process** (each Ray actor of ``engine=ray``, each actor of Flower's
  runtime) uses **1** thread: several workers share the machine's cores, and intra-op threads
  of concurrent workers only fight for them;
* an **in-process** engine (``inline``, ``batched``) uses **1** thread when the model has fewer
  than :data:`AUTO_MAX_PARAMS` (1,000,000) trainable parameters, else torch's default.

Why: a small model's operations are a few microseconds each, shorter than it takes to wake
torch's thread pool, and on a machine where another process is busy those threads spin against
it; the issue that introduced this measured the default digits experiment at 37 s with torch's
default and 0.5 s with one thread under load (identical results). Models this small (the zoo's
MLP, LeNet-5, the MNIST CNNs) gain nothing from more threads at FL batch sizes; ResNet-18
(11 M parameters) keeps torch's default.

The thread count changes how matrix products are summed, so it changes the last bits of
results: runs that used the old default (torch's) can differ in the last bits from runs with
``auto``; pass ``client.num_threads=0`` for the old behaviour.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"
AUTO_MAX_PARAMS = 1_000_000  # models with fewer trainable parameters use one thread under "auto"


def check_threads(value: Any) -> str | None:
    """``None`` when ``value`` is a valid ``client.num_threads``, else what is wrong."""
    if value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"must be 'auto' or an integer >= 0 (got {value!r})"
    return None


def num_params(model: Any) -> int:
    """Trainable parameters of a torch module."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def resolve_threads(value: Any, model: Any = None, worker: bool = False) -> int:
    """Torch threads for a client process; 0 = leave torch's default (see the module docstring).

    ``worker``: the process is one of several client workers (a Ray or Flower actor).
    ``model``: the model the process trains (needed for ``"auto"`` in-process).
    """
    if value is None:
        value = AUTO
    if value != AUTO:
        return int(value)
    if worker or model is None:
        return 1
    return 1 if num_params(model) < AUTO_MAX_PARAMS else 0


def apply_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when ``n > 0`` (0 leaves the process's count alone)."""
    if n > 0:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


__all__ = ["AUTO", "AUTO_MAX_PARAMS", "check_threads", "num_params", "resolve_threads", "apply_threads"]
