"""The ServerApp side: instantiate the strategy, drive ``strategy.start()``, evaluate, record.

``run_server`` is engine-agnostic: it gets a base Grid from the engine, wraps it in
:class:`fedsim.grid.FedsimGrid`, and uses ``start()``'s ``evaluate_fn`` (called before round 1
and after every round) as the round boundary: it evaluates centrally, writes the round record
and fixes the next round's participants.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fedsim import checkpoint, threat, tracking
from fedsim import participation as participation_mod
from fedsim.client import evaluate_model, import_strategy_module, resolve_device
from fedsim.data import load_federated
from fedsim.grid import FedsimGrid, RoundStats
from fedsim.health import RunHealth
from fedsim.models import build_model
from fedsim.results import Recorder, write_json

log = logging.getLogger("fedsim")


class RoundObserver(Protocol):
    """Adds fields to each round record and to the summary (e.g. detection scores).

    An observer may also define ``on_global_model(server_round, model) -> dict``: called in every
    evaluated round with the model loaded with the round's global weights, and
    ``on_resume(rows)``: called once when a run resumes from a checkpoint, with the round records
    so far, to rebuild any run-long tally it reports in ``on_finish``.
    """

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
        write_json(Path(run_dir) / "participation.json", info)


def _resume_point(cfg: dict[str, Any], run_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The checkpoint to continue from (``output.resume=true`` and one exists), else ``None``."""
    out = cfg.get("output", {})
    if run_dir is None or not out.get("resume"):
        return None
    if not (Path(run_dir) / checkpoint.CHECKPOINT_DIR / "state.json").is_file():
        return None
    return checkpoint.load(Path(run_dir))


def run_server(grid: Grid, cfg: dict[str, Any], run_dir: Path | None, engine: str) -> dict[str, Any]:
    """Run the whole experiment against ``grid``; return the summary.

    With ``output.checkpoint_every=k`` a checkpoint is written after every k-th round (see
    :mod:`fedsim.checkpoint`); with ``output.resume=true`` and a checkpoint in ``run_dir`` the
    run continues after the checkpoint's round and ends as the uninterrupted run would.
    """
    seed, rounds = int(cfg["seed"]), int(cfg["rounds"])
    out = cfg.get("output", {})
    ckpt_every = int(out.get("checkpoint_every", 0) or 0)
    resumed = _resume_point(cfg, run_dir)
    import_strategy_module(cfg)
    ocfg = OmegaConf.create(cfg)
    data = load_federated(ocfg.dataset, ocfg.partition, cfg["num_clients"], seed)
    device = resolve_device(cfg.get("device", "auto"))
    model = build_model(cfg["model"], data.in_shape, data.num_classes, seed).to(device)
    if (cfg.get("init") or {}).get("checkpoint"):  # a pre-trained start
        from fedsim.init_model import load_checkpoint

        load_checkpoint(model, cfg["init"]["checkpoint"])
    strategy = instantiate(cfg["strategy"], _convert_="all")
    part = participation_mod.build(ocfg.participation, cfg["num_clients"], seed, {"data": data})
    part = threat.wrap_participation(part, ocfg)  # attackers sampled in their attack rounds, if asked
    reply_hooks, observers = threat.server_plugins(ocfg, data)
    if cfg.get("observer") is not None:  # e.g. the gradient-inversion observer (docs/inversion.md)
        hooks, obs = instantiate(cfg["observer"], _convert_="all").plugins(cfg, data)
        reply_hooks, observers = reply_hooks + hooks, observers + obs
    fgrid = FedsimGrid(grid, part, seed, hooks=reply_hooks, timeout=float(cfg["timeout"]))
    fgrid.discover()
    if hasattr(strategy, "bind_harness"):  # strategies that need N, p_n, ... (never ground truth)
        strategy.bind_harness(fgrid)
    health = RunHealth(float(out.get("divergence_factor", 10.0)))
    contexts = checkpoint.contexts_of(grid)
    if (ckpt_every or resumed) and contexts is None:
        raise ValueError(f"output.checkpoint_every/resume: engine {engine} does not expose client contexts")
    start_round, rows, elapsed = 0, None, 0.0
    initial = ArrayRecord(model.state_dict())
    if resumed is not None:
        state, tensors = resumed
        start_round, rows, elapsed = int(state["round"]), state["rows"], float(state.get("wall_time", 0.0))
        health.load_state_dict(state["health"])
        initial_metrics = state.get("initial", {})
        fgrid.stats = {int(r): RoundStats(**st) for r, st in state["stats"].items()}
        checkpoint.load_strategy_state(strategy, tensors["strategy"])
        for pid, t in tensors["clients"].items():
            contexts[fgrid.pid_to_node[int(pid)]].state = checkpoint.decode_state(t)
        initial = checkpoint.model_of(tensors)
        log.info("resuming after round %d from %s", start_round, Path(run_dir) / checkpoint.CHECKPOINT_DIR)
    recorder = Recorder(run_dir, cfg, rows=rows)
    if resumed is not None:
        recorder.extra_summary.update(initial_metrics)
        for obs in observers:  # observers with run-long tallies rebuild them from the saved rows
            if hasattr(obs, "on_resume"):
                obs.on_resume(recorder.rows)
    recorder.t0 -= elapsed
    x_test, y_test = data.test()
    every = int(cfg["eval"]["every"])
    t_round = [time.time()]
    last_arrays = [initial]

    def save_checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        states = {fgrid.pid(n): ctx.state for n, ctx in contexts.items()}
        harness = {
            "rows": recorder.rows,
            "stats": {str(r): dataclasses.asdict(st) for r, st in fgrid.stats.items() if r <= server_round},
            "health": health.state_dict(),
            "initial": {k: recorder.extra_summary.get(k) for k in ("initial_test_accuracy", "initial_test_loss")},
            "wall_time": time.time() - recorder.t0,
        }
        checkpoint.save(Path(run_dir), server_round, arrays, strategy, states, harness)
        recorder.write_tables()  # metrics.csv up to date with the checkpoint

    def evaluate_arrays(arrays: ArrayRecord, max_samples: int | None = None) -> tuple[float, float]:
        """(loss, accuracy) of any model on the test set (its first ``max_samples`` examples)."""
        model.load_state_dict(arrays.to_torch_state_dict())
        n = len(y_test) if max_samples is None else int(max_samples)
        return evaluate_model(model, x_test[:n], y_test[:n], device, int(cfg["eval"]["batch_size"]))

    def on_round_boundary(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        res: MetricRecord | None = None
        last_arrays[0] = arrays
        if server_round == 0:  # the initial model's loss: divergence's reference (fedsim.health)
            model.load_state_dict(arrays.to_torch_state_dict())
            loss0, acc0 = evaluate_model(model, x_test, y_test, device, int(cfg["eval"]["batch_size"]))
            health.set_initial_loss(loss0)
            recorder.extra_summary.update(initial_test_accuracy=acc0, initial_test_loss=loss0)
        if server_round > start_round:
            row: dict[str, Any] = {"round": server_round}
            if server_round % every == 0 or server_round == rounds:
                model.load_state_dict(arrays.to_torch_state_dict())
                loss, acc = evaluate_model(model, x_test, y_test, device, int(cfg["eval"]["batch_size"]))
                row.update(test_accuracy=acc, test_loss=loss)
                for obs in observers:  # observers that evaluate the global model (backdoor accuracy)
                    if hasattr(obs, "on_global_model"):
                        row.update(obs.on_global_model(server_round, model))
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
            if hasattr(strategy, "round_metrics"):  # strategies holding several models (gossip nodes)
                row.update(strategy.round_metrics(server_round, evaluate_arrays if "test_accuracy" in row else None))
            for obs in observers:
                row.update(obs.on_round_end(server_round, strategy, fgrid))
            row["seconds"] = time.time() - t_round[0]
            health.update(row)
            recorder.add(row)
            if ckpt_every and run_dir is not None and server_round % ckpt_every == 0 and server_round < rounds:
                save_checkpoint(server_round, arrays)
        if server_round < rounds:
            fgrid.begin_round(server_round + 1)
        t_round[0] = time.time()
        return res

    runner = strategy if start_round == 0 else checkpoint.offset_strategy(strategy, start_round)
    trackers = tracking.build(cfg, run_dir, start_round)
    recorder.round_callbacks.extend(t.on_round for t in trackers)
    try:
        result = runner.start(
            grid=fgrid,
            initial_arrays=initial,
            num_rounds=rounds - start_round,
            timeout=float(cfg["timeout"]),
            train_config=train_config(cfg),
            evaluate_config=ConfigRecord(),
            evaluate_fn=on_round_boundary,
        )
        for obs in observers:
            recorder.extra_summary.update(obs.on_finish(strategy, fgrid))
        record_participation(part, fgrid, recorder, run_dir)
    except Exception as err:
        recorder.fail(err, engine)
        raise
    finally:
        for t in trackers:
            t.close()
    recorder.extra_summary.update(health.summary())
    final_arrays = result.arrays if result.arrays is not None else last_arrays[0]
    summary = recorder.finish(final_arrays.to_torch_state_dict(), engine)
    if run_dir is not None:  # finished: summary.json now marks it; the checkpoint is spent
        checkpoint.remove(Path(run_dir))
    return summary
