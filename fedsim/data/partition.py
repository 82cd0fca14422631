"""Partitioning with flwr-datasets' partitioners, for every source.

The labels (plus an index column) are wrapped in a tiny ``datasets.Dataset``, shuffled with a
seeded permutation (flwr-datasets' IidPartitioner takes contiguous shards and has no seed),
and handed to the partitioner; each partition comes back as an array of train indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.seeding import derive_seed, np_rng


def _partitioner(cfg: Any, n: int, seed: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    s = derive_seed(seed, "partition") % (2**32)
    if cfg.name == "iid":
        return IidPartitioner(num_partitions=n)
    if cfg.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=cfg.self_balancing,
            seed=s,
        )
    if cfg.name == "pathological":
        return PathologicalPartitioner(
            num_partitions=n,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode=cfg.class_assignment,
            seed=s,
        )
    if cfg.name == "shard":
        return ShardPartitioner(
            num_partitions=n,
            partition_by="label",
            num_shards_per_partition=cfg.shards_per_client,
            shard_size=cfg.shard_size,
            seed=s,
        )
    raise ValueError(f"partition.name: unknown partitioner '{cfg.name}'")


def partition_indices(labels: np.ndarray, cfg: Any, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_clients`` index arrays as ``cfg`` says."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    labels = np.asarray(labels)
    if num_clients > len(labels):
        raise ValueError(
            f"num_clients: {num_clients} clients but only {len(labels)} training samples"
        )
    perm = np_rng(seed, "partition-shuffle").permutation(len(labels))
    ds = Dataset.from_dict({"label": labels[perm].tolist(), "idx": perm.tolist()})
    part = _partitioner(cfg, num_clients, seed)
    part.dataset = ds
    try:
        out = [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_clients)]
    except ValueError as err:
        raise ValueError(f"partition ({cfg.name}): {err}") from None
    return out


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] counts: how skewed a partitioning is."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
