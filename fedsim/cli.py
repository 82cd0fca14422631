"""Console entry points: ``fedsim`` (one run or a ``-m`` sweep).

Exit status (docs/failures.md): 0 finished (``status`` in summary.json may still say
``diverged at round r``), 1 the run failed (an error; the output error names the file), 2 bad
config or unusable run directory, 3 no round trained anyone, 130 interrupted (Ctrl-C). A
``-m`` sweep runs every job whatever happens to the others, then exits with the number of
jobs that did not finish (capped at 125), having listed them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fedsim.config import ConfigError, register_configs

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
register_configs()
log = logging.getLogger("fedsim")

EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
_SWEEP: dict[str, Any] = {"failed": None}


def _interrupted() -> None:
    from fedsim.results import PROGRESS

    where = PROGRESS.get("run_dir")
    msg = f"interrupted at round {PROGRESS.get('round', 0)}" + (f"; results so far in {where}" if where else "")
    print(msg, file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def _record_failure(run_dir: Path, err: BaseException) -> None:
    """A sweep job that failed before or while running leaves a summary that says so."""
    from fedsim.results import OutputError, read_summary, write_json
    from fedsim.rundir import RunDirError

    if isinstance(err, RunDirError) or read_summary(run_dir) is not None:
        return  # not our directory to write in, or the recorder already wrote one
    first = str(err).splitlines()[0] if str(err) else ""
    try:
        write_json(run_dir / "summary.json", {"status": f"failed: {type(err).__name__}: {first}"})
    except OutputError:
        pass


@hydra.main(version_base=None, config_path="pkg://fedsim.configs", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from fedsim.experiment import run_experiment
    from fedsim.health import NO_TRAINING_EXIT
    from fedsim.results import OutputError

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    from fedsim import tracking

    tracking.INTERACTIVE["allowed"] = not sweep
    try:
        summary = run_experiment(cfg, run_dir)
    except KeyboardInterrupt:
        _interrupted()
    except ConfigError as err:
        log.error("config error: %s", err)
        if not sweep:
            sys.exit(EXIT_CONFIG)
        _record_failure(run_dir, err)
        return None
    except OutputError as err:
        log.error("output error: %s", err)
        if not sweep:
            sys.exit(EXIT_FAILED)
        return None
    except Exception as err:
        if not sweep:
            raise  # Hydra prints the trace and exits 1
        log.exception("job failed: %s", err)
        _record_failure(run_dir, err)
        return None
    if str(summary.get("status", "")).startswith("no client trained") and not sweep:
        sys.exit(NO_TRAINING_EXIT)
    return summary.get("final_accuracy")


class SweepStatus(Callback):
    """Hydra callback (configs/config.yaml): after a ``-m`` sweep, list the jobs that did not
    finish and remember how many for the exit status. Works for any launcher (joblib, SLURM):
    it reads the jobs' ``summary.json`` files, not in-process state."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fedsim.report import find_runs, run_outcome, sweep_failed

        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs = find_runs([sweep_dir])
        bad = [(d, run_outcome(d)) for d in runs if sweep_failed(d)]
        _SWEEP["failed"] = len(bad)
        if bad:
            log.error("sweep: %d of %d jobs did not finish:", len(bad), len(runs))
            for d, why in bad:
                log.error("  %s: %s", d, why)
        else:
            log.info("sweep: %d jobs finished; fedsim-report %s", len(runs), sweep_dir)


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
    try:
        _main()
    except KeyboardInterrupt:
        _interrupted()
    if _SWEEP["failed"]:
        sys.exit(min(int(_SWEEP["failed"]), 125))


if __name__ == "__main__":
    main()
