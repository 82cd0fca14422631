"""Assemble and run one experiment from a composed config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.config import to_container, validate

log = logging.getLogger("fedsim")


class _DropExpected(logging.Filter):
    """Hide Flower's warning about the federated evaluation fedsim turns off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "fraction_evaluate is set to 0.0" not in record.getMessage()


def quiet_flower(verbose: bool = False) -> None:
    """Flower logs every round at INFO; fedsim prints its own progress line instead.

    Flower's logger has its own console handler, so it must not also propagate to the root
    handler Hydra installs (every line would print twice).
    """
    from flwr.supercore.logger import FLOWER_LOGGER  # importing it resets its level: do it first

    flwr_log = FLOWER_LOGGER
    flwr_log.setLevel(logging.INFO if verbose else logging.WARNING)
    flwr_log.propagate = False
    if not any(isinstance(f, _DropExpected) for f in flwr_log.filters):
        flwr_log.addFilter(_DropExpected())


def prepare(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Validate (before touching data) and resolve to plain Python data."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    validate(cfg)
    return to_container(cfg)


def load_checked_data(plain: dict[str, Any]) -> None:
    """Load, check and partition the data in this process before any engine starts (no Ray, no
    training yet), so a bad file or an impossible partitioning is one DataError line. The result
    is cached: the engines' own ``load_federated`` calls in this process reuse it."""
    from fedsim.data import load_federated

    load_federated(OmegaConf.create(plain["dataset"]), OmegaConf.create(plain["partition"]), plain["num_clients"], plain["seed"])


def run_experiment(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Validate ``cfg``, run it on its engine, return the summary (files go to ``run_dir``).

    Before any data is loaded, :func:`fedsim.rundir.claim` decides what to do with results
    already in ``run_dir`` (skip a finished run, resume, refuse another config's results).
    """
    from fedsim import rundir
    from fedsim.engines import run_engine

    quiet_flower()
    plain = prepare(cfg)
    out = plain.get("output", {})
    if out.get("checkpoint_every") or out.get("resume"):
        from fedsim.checkpoint import check_strategy

        check_strategy(plain["strategy"]["_target_"])
    action, done = rundir.claim(run_dir, plain)
    if action == "skip":
        return done
    log.info(
        "fedsim: %s on %s, %d clients, %d rounds, engine=%s",
        plain["strategy"]["_target_"].rsplit(".", 1)[-1],
        plain["dataset"]["name"],
        plain["num_clients"],
        plain["rounds"],
        plain["engine"]["name"],
    )
    try:
        if plain.get("inversion") is not None:  # benchmark mode (docs/inversion.md)
            from attacks.inversion.benchmark import run_benchmark, summary_for_cli

            return summary_for_cli(run_benchmark(plain["inversion"], run_dir))
        load_checked_data(plain)
        summary = run_engine(plain, run_dir)
    finally:
        rundir.unlock(run_dir)
    log.info(
        "done: final accuracy %s (best %s at round %s) in %.1fs%s",
        summary["final_accuracy"],
        summary["best_accuracy"],
        summary["best_round"],
        summary["wall_time"],
        f"; results in {run_dir}" if run_dir else "",
    )
    return summary
