"""Engines deliver Messages between the one ServerApp logic and the one ClientApp.

Each engine module exposes ``run(cfg: dict, run_dir: Path | None) -> dict`` (the summary).
Only delivery differs between engines; the strategy, ClientApp and recording are shared.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

ENGINES = {"inline": "fedsim.engines.inline", "ray": "fedsim.engines.ray", "flower": "fedsim.engines.flower",
           "batched": "fedsim.engines.batched"}


def run_engine(cfg: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Run ``cfg`` on the engine it names."""
    name = cfg["engine"]["name"]
    return importlib.import_module(ENGINES[name]).run(cfg, run_dir)
