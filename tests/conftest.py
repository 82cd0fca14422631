"""Shared fixtures: compose configs and run short experiments in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# One BLAS/torch thread: tiny models on a few shared cores run many times faster this way,
# and worker engines inherit the driver's count, so parity holds (see fedsim.engines.base).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
import torch  # noqa: E402

torch.set_num_threads(1)

from fedsim.compose import compose_config  # noqa: E402
from fedsim.experiment import run_experiment  # noqa: E402
from fedsim.results import read_metrics  # noqa: E402

TINY = ["rounds=3", "num_clients=4", "client.epochs=1"]


@pytest.fixture
def cfg_of():
    """``cfg_of('strategy=fedprox', ...)`` -> composed DictConfig."""
    return lambda *ov: compose_config(list(ov))


@pytest.fixture
def run(tmp_path: Path):
    """``run('rounds=2', ...)`` -> (summary, metrics rows, run_dir)."""

    def _run(*overrides: str, name: str = "run"):
        run_dir = tmp_path / name
        summary = run_experiment(compose_config(TINY + list(overrides)), run_dir)
        return summary, read_metrics(run_dir), run_dir

    return _run


MNIST10K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist10k.npz"


@pytest.fixture
def run_until_interrupted(monkeypatch):
    """``f(cfg, run_dir, stop_round=3)``: run ``cfg`` and raise KeyboardInterrupt right after
    round ``stop_round`` is recorded (as Ctrl-C would), for checkpoint/resume tests."""
    from fedsim.results import Recorder

    def run_and_stop(cfg, run_dir: Path, stop_round: int = 3) -> None:
        real_add = Recorder.add

        def add_then_stop(self, row):
            real_add(self, row)
            if row["round"] == stop_round:
                raise KeyboardInterrupt

        monkeypatch.setattr(Recorder, "add", add_then_stop)
        try:
            with pytest.raises(KeyboardInterrupt):
                run_experiment(cfg, run_dir)
        finally:
            monkeypatch.setattr(Recorder, "add", real_add)

    return run_and_stop
