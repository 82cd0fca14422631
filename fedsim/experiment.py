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


def run_experiment(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Validate ``cfg``, run it on its engine, return the summary (files go to ``run_dir``)."""
    from fedsim.engines import run_engine

    quiet_flower()
    plain = prepare(cfg)
    if plain.get("inversion") is not None:  # benchmark mode (docs/inversion.md)
        from attacks.inversion.benchmark import run_benchmark, summary_for_cli

        return summary_for_cli(run_benchmark(plain["inversion"], run_dir))
    log.info(
        "fedsim: %s on %s, %d clients, %d rounds, engine=%s",
        plain["strategy"]["_target_"].rsplit(".", 1)[-1],
        plain["dataset"]["name"],
        plain["num_clients"],
        plain["rounds"],
        plain["engine"]["name"],
    )
    summary = run_engine(plain, run_dir)
    log.info(
        "done: final accuracy %s (best %s at round %s) in %.1fs%s",
        summary["final_accuracy"],
        summary["best_accuracy"],
        summary["best_round"],
        summary["wall_time"],
        f"; results in {run_dir}" if run_dir else "",
    )
    return summary
