"""Data: sources (embedded, local files, Hugging Face) and partitioning, cached per process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from fedsim.data.partition import label_histogram, partition_indices
from fedsim.data.sources import DataBundle, load_source

__all__ = ["FederatedData", "load_federated", "share_federated", "DataBundle", "partition_indices", "label_histogram"]


@dataclass
class FederatedData:
    """Train/test tensors plus each client's train indices."""

    bundle: DataBundle
    partitions: list[np.ndarray]

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.bundle.in_shape

    def client(self, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.partitions[pid])
        return self.bundle.x_train[idx], self.bundle.y_train[idx]

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bundle.x_test, self.bundle.y_test


_CACHE: dict[str, FederatedData] = {}


def _cache_key(dataset: Any, partition: Any, num_clients: int, seed: int) -> str:
    to_plain = (lambda c: OmegaConf.to_container(c, resolve=True)) if OmegaConf.is_config(dataset) else dict
    return json.dumps([to_plain(dataset), to_plain(partition), num_clients, seed], sort_keys=True, default=str)


def share_federated(dataset: Any, partition: Any, num_clients: int, seed: int, data: FederatedData) -> None:
    """Make ``data`` what :func:`load_federated` returns here for these arguments (a worker
    process handed the driver's data, so it neither reloads nor re-partitions it)."""
    _CACHE[_cache_key(dataset, partition, num_clients, seed)] = data


def load_federated(dataset: Any, partition: Any, num_clients: int, seed: int) -> FederatedData:
    """Load and partition once per process; later calls with the same config hit the cache."""
    key = _cache_key(dataset, partition, num_clients, seed)
    if key in _CACHE:
        return _CACHE[key]
    bundle = load_source(dataset, num_clients, seed)
    if partition.name == "natural":
        if bundle.natural_partitions is None:
            raise ValueError("partition.name: 'natural' needs a naturally partitioned source")
        parts = bundle.natural_partitions
    else:
        parts = partition_indices(bundle.y_train.numpy(), partition, num_clients, seed)
    data = FederatedData(bundle, parts)
    _CACHE[key] = data
    return data
