"""The client's local training loop and its plug points.

Two kinds of plug-ins hook into the same loop through :class:`TrainHook`:

* **local algorithms** (plain SGD, FedProx, SCAFFOLD, FedAvg-M, ...) that a strategy names in its
  train config under ``"local-algorithm"``; a strategy module registers its client half with
  :func:`register_local_algorithm` beside its server class, so one file plugs in both halves;
* **training-time attacks** (PGD projection, Neurotoxin masking) supplied by the threat model.

A hook sees a :class:`LocalRun`: the model, the received global parameters, the message
content and config, and ``context.state`` (the client's private memory across rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

__all__ = [
    "LocalRun",
    "TrainHook",
    "LocalAlgorithm",
    "register_local_algorithm",
    "get_local_algorithm",
    "LOCAL_ALGORITHMS",
    "train_loop",
]


@dataclass
class LocalRun:
    """What one local training call knows. Hooks may read and write it."""

    model: nn.Module
    global_params: dict[str, torch.Tensor]  # received global state_dict (detached, on device)
    content: RecordDict  # the received message content (extra arrays a strategy sent)
    config: ConfigRecord  # the received train config
    state: RecordDict  # context.state: private client memory across rounds
    device: torch.device
    lr: float
    total_steps: int
    partition_id: int
    server_round: int
    step: int = 0
    steps_taken: int = 0  # optimizer steps actually taken (a batch a hook skipped is not one)
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    extras: dict[str, Any] = field(default_factory=dict)  # scratch space shared by hooks

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters by name (the ones the optimizer steps)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


class TrainHook:
    """Hooks into the local loop; every method is optional (the defaults do nothing)."""

    def on_start(self, run: LocalRun) -> None:
        """Before the first step."""

    def on_batch(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Transform a batch, or return ``None`` to skip it (it uses up one of the
        ``total_steps`` iterations but is no optimizer step: ``run.steps_taken`` omits it)."""
        return x, y

    def loss(self, run: LocalRun, loss: torch.Tensor) -> torch.Tensor:
        """Add terms to the loss (e.g. FedProx's proximal term)."""
        return loss

    def on_backward(self, run: LocalRun) -> None:
        """After ``loss.backward()``, before the optimizer step: edit ``p.grad`` in place."""

    def on_step(self, run: LocalRun) -> None:
        """After the optimizer step (e.g. a projection)."""

    def on_end(self, run: LocalRun, reply: RecordDict) -> None:
        """After the last step: add records to the reply, update ``run.state``."""


class LocalAlgorithm(TrainHook):
    """A named local algorithm: the client half of a strategy."""

    name: str = "sgd"


LOCAL_ALGORITHMS: dict[str, type[LocalAlgorithm]] = {}


def register_local_algorithm(name: str) -> Callable[[type[LocalAlgorithm]], type[LocalAlgorithm]]:
    """Class decorator: make a local algorithm selectable by ``config["local-algorithm"]``."""

    def deco(cls: type[LocalAlgorithm]) -> type[LocalAlgorithm]:
        cls.name = name
        LOCAL_ALGORITHMS[name] = cls
        return cls

    return deco


def get_local_algorithm(config: ConfigRecord) -> LocalAlgorithm:
    """The local algorithm a train config asks for.

    ``"local-algorithm"`` names it; without it, a positive ``"proximal-mu"`` (what Flower's own
    FedProx strategy sends) selects FedProx, anything else plain SGD.
    """
    name = config.get("local-algorithm")
    if name is None:
        name = "fedprox" if float(config.get("proximal-mu", 0.0)) > 0 else "sgd"
    if name not in LOCAL_ALGORITHMS:
        raise KeyError(
            f"local algorithm '{name}' is not registered (known: {sorted(LOCAL_ALGORITHMS)}); "
            "import the module that registers it"
        )
    return LOCAL_ALGORITHMS[name]()


@register_local_algorithm("sgd")
class PlainSGD(LocalAlgorithm):
    """Plain local SGD (FedAvg's local solver, McMahan et al. 2017)."""


@register_local_algorithm("fedprox")
class FedProxLocal(LocalAlgorithm):
    """FedProx's local objective (Li et al., MLSys 2020, Eq. 2):

    h_k(w; w^t) = F_k(w) + (mu / 2) * ||w - w^t||^2,

    so each step's gradient gains mu * (w - w^t). ``mu`` comes from ``config["proximal-mu"]``.
    """

    def on_start(self, run: LocalRun) -> None:
        self.mu = float(run.config.get("proximal-mu", 0.0))

    def loss(self, run: LocalRun, loss: torch.Tensor) -> torch.Tensor:
        if self.mu == 0.0:
            return loss
        prox = sum(((p - run.global_params[n]) ** 2).sum() for n, p in run.params())
        return loss + 0.5 * self.mu * prox


def batches(
    n: int, batch_size: int, steps: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` index batches over a dataset of size ``n``: seeded reshuffle every epoch."""
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def steps_for(n: int, batch_size: int, epochs: int, steps: int | None) -> int:
    """Number of local steps: a fixed count, or ``epochs`` passes over ``n`` samples."""
    if steps is not None:
        return int(steps)
    return int(epochs) * max(1, -(-n // batch_size))


def train_loop(
    run: LocalRun,
    x: torch.Tensor,
    y: torch.Tensor,
    hooks: list[TrainHook],
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    """Run ``run.total_steps`` SGD steps with the hooks; return the mean training loss."""
    model = run.model
    model.train()
    for h in hooks:
        h.on_start(run)
    total, counted = 0.0, 0
    for step, idx in enumerate(batches(len(y), batch_size, run.total_steps, gen)):
        run.step = step
        xb, yb = x[idx].to(run.device, non_blocking=True), y[idx].to(run.device, non_blocking=True)
        skipped = False
        for h in hooks:
            out = h.on_batch(run, xb, yb)
            if out is None:
                skipped = True
                break
            xb, yb = out
        if skipped:
            continue
        run.batch = (xb, yb)
        loss = run.loss_fn(model(xb), yb)
        for h in hooks:
            loss = h.loss(run, loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for h in hooks:
            h.on_backward(run)
        optimizer.step()
        for h in hooks:
            h.on_step(run)
        total += float(loss.detach())
        counted += 1
    run.batch, run.steps_taken = None, counted
    return total / max(counted, 1)
