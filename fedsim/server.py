"""The ServerApp side: instantiate the strategy, drive ``strategy.start()``, evaluate, record.

``run_server`` is engine-agnostic: it gets a base Grid from the engine, wraps it in
:class:`fedsim.grid.FedsimGrid`, and uses ``start()``'s ``evaluate_fn`` (called before round 1
and after every round) as the round boundary: it evaluates centrally, writes the round record
and fixes the next round's participants.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fedsim import participation as participation_mod
from fedsim import threat
from fedsim.client import evaluate_model, import_strategy_module, resolve_device
from fedsim.data import load_federated
from fedsim.grid import FedsimGrid
from fedsim.models import build_model
from fedsim.results import Recorder

log = logging.getLogger("fedsim")


class RoundObserver(Protocol):
    """Adds fields to each round record and to the summary (e.g. detection scores)."""

    def on_round_end(self, server_round: int, strategy: Any, grid: FedsimGrid) -> dict[str, Any]: ...

    def on_finish(self, strategy: Any, grid: FedsimGrid) -> dict[str, Any]: ...


def train_config(cfg: dict[str, Any]) -> ConfigRecord:
    """The client-training defaults every train message carries; strategies may add to it."""
    c = cfg["client"]
    return ConfigRecord(
        {
            "lr": float(c["lr"]),
            "local-epochs": int(c["epochs"]),
            "local-steps": int(c["steps"] or 0),
            "batch-size": int(c["batch_size"]),
            "momentum": float(c["momentum"]),
            "weight-decay": float(c["weight_decay"]),
        }
    )


def record_participation(part: Any, fgrid: FedsimGrid, recorder: Recorder, run_dir: Path | None) -> None:
    """p_n and per-client realised participation: ``participation.json`` and the summary."""
    rounds = {r: st.participants for r, st in sorted(fgrid.stats.items()) if r >= 1}
    info = part.summary(rounds)
    recorder.extra_summary["participation"] = info
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "participation.json").write_text(json.dumps(info))


def run_server(grid: Grid, cfg: dict[str, Any], run_dir: Path | None, engine: str) -> dict[str, Any]:
    """Run the whole experiment against ``grid``; return the summary."""
    seed, rounds = int(cfg["seed"]), int(cfg["rounds"])
    import_strategy_module(cfg)
    ocfg = OmegaConf.create(cfg)
    data = load_federated(ocfg.dataset, ocfg.partition, cfg["num_clients"], seed)
    device = resolve_device(cfg.get("device", "auto"))
    model = build_model(cfg["model"], data.in_shape, data.num_classes, seed).to(device)
    strategy = instantiate(cfg["strategy"], _convert_="all")
    part = participation_mod.build(ocfg.participation, cfg["num_clients"], seed, {"data": data})
    reply_hooks, observers = threat.server_plugins(ocfg, data)
    if cfg.get("observer") is not None:  # e.g. the gradient-inversion observer (docs/inversion.md)
        hooks, obs = instantiate(cfg["observer"], _convert_="all").plugins(cfg, data)
        reply_hooks, observers = reply_hooks + hooks, observers + obs
    fgrid = FedsimGrid(grid, part, seed, hooks=reply_hooks, timeout=float(cfg["timeout"]))
    fgrid.discover()
    if hasattr(strategy, "bind_harness"):  # strategies that need N, p_n, ... (never ground truth)
        strategy.bind_harness(fgrid)
    recorder = Recorder(run_dir, cfg)
    x_test, y_test = data.test()
    every = int(cfg["eval"]["every"])
    t_round = [time.time()]

    def on_round_boundary(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        res: MetricRecord | None = None
        if server_round > 0:
            row: dict[str, Any] = {"round": server_round}
            if server_round % every == 0 or server_round == rounds:
                model.load_state_dict(arrays.to_torch_state_dict())
                loss, acc = evaluate_model(model, x_test, y_test, device, int(cfg["eval"]["batch_size"]))
                row.update(test_accuracy=acc, test_loss=loss)
                res = MetricRecord({"test_accuracy": acc, "test_loss": loss})
            st = fgrid.stats.get(server_round)
            if st is not None:
                row.update(
                    train_loss=st.train_loss,
                    sampled=st.sampled,
                    replied=st.replied,
                    failed=st.failed,
                    nonfinite=st.nonfinite,
                    bytes_down=st.bytes_down,
                    bytes_up=st.bytes_up,
                    participants=len(st.participants),
                )
                if st.failures:
                    row["failures"] = st.failures
            for obs in observers:
                row.update(obs.on_round_end(server_round, strategy, fgrid))
            row["seconds"] = time.time() - t_round[0]
            recorder.add(row)
        if server_round < rounds:
            fgrid.begin_round(server_round + 1)
        t_round[0] = time.time()
        return res

    result = strategy.start(
        grid=fgrid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        timeout=float(cfg["timeout"]),
        train_config=train_config(cfg),
        evaluate_config=ConfigRecord(),
        evaluate_fn=on_round_boundary,
    )
    for obs in observers:
        recorder.extra_summary.update(obs.on_finish(strategy, fgrid))
    record_participation(part, fgrid, recorder, run_dir)
    final = result.arrays.to_torch_state_dict() if result.arrays is not None else model.state_dict()
    return recorder.finish(final, engine)
