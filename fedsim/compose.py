"""Compose a config without the command line (tests, scripts, ``flwr run``)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from fedsim.config import register_configs


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/config.yaml`` with Hydra ``overrides`` applied (schema-checked, not validated)."""
    register_configs()
    with initialize_config_module("fedsim.configs", version_base=None):
        return compose("config", overrides=list(overrides))
