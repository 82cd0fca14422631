"""Console entry points: ``fedsim`` (one run or a ``-m`` sweep)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedsim.config import ConfigError, register_configs

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
register_configs()
log = logging.getLogger("fedsim")


@hydra.main(version_base=None, config_path="pkg://fedsim.configs", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from fedsim.experiment import run_experiment

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_experiment(cfg, run_dir)
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(2)
    return summary["final_accuracy"]


def cwd_importable() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m`` does, so that
    ``strategy._target_=mylab.fedfoo.FedFoo`` imports ``./mylab`` (a console script only puts its
    own folder there). Worker processes inherit it: local Ray gets the driver's ``sys.path`` as
    ``PYTHONPATH`` (fedsim.engines.ray.start_ray). Hydra does not change the working directory
    (``hydra.job.chdir`` is false by default)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def main() -> None:
    """``fedsim [overrides]``: see README.md."""
    cwd_importable()
    _main()


if __name__ == "__main__":
    main()
