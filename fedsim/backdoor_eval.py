"""Backdoor accuracy, a round metric the harness computes from the threat config.

The harness alone knows each attack's trigger and target: every threat group whose attack has a
part with ``backdoor_testset(x_test, y_test) -> (x_bd, y_bd)`` (BadNets and DBA: the test
samples whose label is not the target, with the full trigger, labelled with the target;
edge-case: the held-out edge samples) gets its test set built once. Each evaluated round the
global model's accuracy on it is written to ``metrics.jsonl`` as ``backdoor_accuracy``; with
several backdoor groups also ``backdoor_accuracy/<group>`` per group (``backdoor_accuracy`` is
then their mean). ``summary.json`` gets the final values and ``backdoor_accuracy_max``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsim.client import evaluate_model, resolve_device


class BackdoorObserver:
    """Round observer: backdoor accuracy of the global model per backdoor group."""

    def __init__(self, attacks: dict[str, Any], data: Any, cfg: Any) -> None:
        x, y = data.test()
        self.sets = {name: a.backdoor_testset(x, y) for name, a in attacks.items()}
        for name, (xb, _) in self.sets.items():
            if len(xb) == 0:
                raise ValueError(f"threat group '{name}': its backdoor test set is empty")
        self.batch_size = int(cfg["eval"]["batch_size"])
        self.device = resolve_device(cfg.get("device", "auto"))
        self.history: list[dict[str, Any]] = []

    def on_global_model(self, server_round: int, model: nn.Module) -> dict[str, Any]:
        """Backdoor accuracy of ``model`` (loaded with the round's global weights)."""
        accs = {}
        with torch.no_grad():
            for name, (xb, yb) in self.sets.items():
                accs[name] = evaluate_model(model, xb, yb, self.device, self.batch_size)[1]
        row: dict[str, Any] = {"backdoor_accuracy": sum(accs.values()) / len(accs)}
        if len(accs) > 1:
            row.update({f"backdoor_accuracy/{k}": v for k, v in accs.items()})
        self.history.append({"round": server_round, **row})
        return row

    def on_round_end(self, server_round: int, strategy: Any, grid: Any) -> dict[str, Any]:
        return {}

    def on_resume(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run: the history (for ``backdoor_accuracy_max``) from the rounds recorded."""
        self.history = [{"round": r["round"], **{k: v for k, v in r.items() if k.startswith("backdoor_accuracy")}}
                        for r in rows if r.get("backdoor_accuracy") is not None]

    def on_finish(self, strategy: Any, grid: Any) -> dict[str, Any]:
        if not self.history:
            return {}
        last = {k: v for k, v in self.history[-1].items() if k != "round"}
        return {**last, "backdoor_accuracy_max": max(h["backdoor_accuracy"] for h in self.history)}
