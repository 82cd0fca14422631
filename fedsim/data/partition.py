"""Partitioning with flwr-datasets' partitioners, for every source.

The labels (plus an index column) are wrapped in a tiny ``datasets.Dataset``, shuffled with a
seeded permutation (flwr-datasets' IidPartitioner takes contiguous shards and has no seed),
and handed to the partitioner; each partition comes back as an array of train indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.data.checks import DataError
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


def label_dirichlet_indices(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1, attempts: int = 10
) -> list[np.ndarray]:
    """Per-client label mixes q_n ~ Dir(alpha * 1_C); class c is split across clients in
    proportion to q_n[c] / sum_m q_m[c] (FedAU's split, Wang & Ji ICLR 2024, IBM/fedau
    ``util/util.py: partition``; there alpha_d = 0.1).

    Unlike flwr-datasets' DirichletPartitioner (a Dir(alpha) over clients per class), this keeps
    client sizes near len/N even for 250 clients and alpha = 0.1. Each class's indices are
    shuffled (seeded), then cut into contiguous blocks at ``round(cumsum)`` as the authors do.
    The mixes are redrawn (up to ``attempts`` times) until every client has ``min_size`` samples.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np_rng(seed, "partition", "label_dirichlet")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(max(1, attempts)):
        q = rng.dirichlet(alpha * np.ones(len(classes)), size=num_clients)  # [N, C]
        frac = np.cumsum(q, axis=0) / q.sum(0, keepdims=True)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for ci, idx in enumerate(by_class):
            ends = np.round(len(idx) * frac[:, ci]).astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]])
            for n in range(num_clients):
                parts[n].append(idx[starts[n] : ends[n]])
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(
        f"partition.min_partition_size: label_dirichlet could not give every client {min_size} samples "
        f"in {attempts} draws (alpha={alpha}, {num_clients} clients, {len(labels)} samples); "
        "raise partition.alpha or lower partition.min_partition_size or num_clients"
    )


def check_feasible(labels: np.ndarray, cfg: Any, num_clients: int) -> None:
    """Refuse a partitioning that cannot be made from these labels, naming the key to change."""
    n = len(labels)
    if num_clients > n:
        raise DataError(f"num_clients: {num_clients} clients but only {n} training samples")
    if cfg.name in ("dirichlet", "label_dirichlet") and num_clients * int(cfg.min_partition_size) > n:
        raise DataError(
            f"partition.min_partition_size: {num_clients} clients x {cfg.min_partition_size} samples "
            f"> {n} training samples; lower partition.min_partition_size or num_clients"
        )
    if cfg.name == "shard":
        shards = num_clients * int(cfg.shards_per_client)
        size = cfg.shard_size
        if size is not None and int(size) < 1:
            raise DataError(f"partition.shard_size: must be >= 1 or null (got {size})")
        if shards * int(size or 1) > n:
            what = f"{shards} shards of {size} samples" if size else f"{shards} shards"
            raise DataError(
                f"partition.shards_per_client: {num_clients} clients x {cfg.shards_per_client} shards "
                f"need {what} but there are only {n} training samples; lower partition.shards_per_client"
                + (", partition.shard_size" if size else "") + " or num_clients"
            )
    if cfg.name == "pathological":
        classes = len(np.unique(labels))
        if int(cfg.classes_per_client) > classes:
            raise DataError(
                f"partition.classes_per_client: {cfg.classes_per_client} but the data has only {classes} classes"
            )


def partition_indices(labels: np.ndarray, cfg: Any, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_clients`` index arrays as ``cfg`` says.

    An impossible request is a :class:`~fedsim.data.checks.DataError` naming the key to change.
    """
    labels = np.asarray(labels)
    check_feasible(labels, cfg, num_clients)
    if cfg.name == "label_dirichlet":
        return label_dirichlet_indices(labels, num_clients, float(cfg.alpha), seed, max(1, int(cfg.min_partition_size)))
    import warnings

    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    perm = np_rng(seed, "partition-shuffle").permutation(len(labels))
    ds = Dataset.from_dict({"label": labels[perm].tolist(), "idx": perm.tolist()})
    part = _partitioner(cfg, num_clients, seed)
    part.dataset = ds
    try:
        with warnings.catch_warnings():  # flwr-datasets warns on every failed Dirichlet draw
            warnings.filterwarnings("ignore", message=".*min_partition_size.*")
            out = [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_clients)]
    except (ValueError, ZeroDivisionError) as err:
        if cfg.name == "dirichlet":
            raise DataError(
                f"partition.alpha: dirichlet could not give each of {num_clients} clients "
                f"{cfg.min_partition_size} samples in 10 draws (alpha={cfg.alpha}, {len(labels)} samples); "
                "raise partition.alpha, lower partition.min_partition_size, or use partition=label_dirichlet "
                "(per-client label mixes, client sizes near len/N)"
            ) from None
        raise DataError(f"partition.name: {cfg.name} partitioning failed: {err}") from None
    return out


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] counts: how skewed a partitioning is."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
