"""Structured config schema and validation.

The schema (dataclasses registered in Hydra's ConfigStore as ``fedsim_schema``) is the first
entry of ``configs/config.yaml``'s defaults list, so Hydra rejects an unknown key or a value of
the wrong type while composing, and :func:`validate` rejects out-of-range values. Both happen
before any data, model or Ray is touched, and every message names the offending key.

``model`` and ``strategy`` are free-form ``_target_`` nodes (a user's own class takes its own
arguments); :func:`validate` checks that their target imports and accepts the given arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


@dataclass
class DatasetConfig:
    """Where the data comes from (``dataset/`` group). Fields unused by a source are ignored."""

    name: str = MISSING  # digits | synthetic | npz | torchvision | huggingface
    path: str | None = None  # npz: file with arrays x, y (optional x_test, y_test)
    root: str | None = None  # torchvision: root folder in torchvision's layout
    dataset_name: str | None = None  # torchvision: MNIST|FashionMNIST|CIFAR10; huggingface: hub id or local dir
    download: bool = False  # torchvision: allow downloading (needs torchvision + network)
    test_fraction: float = 0.2  # split used when the source has no test split
    normalize: bool = True  # standardise features with train-set mean/std
    image_key: str | None = None  # huggingface: column names (auto-detected when None)
    label_key: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    alpha: float = 1.0  # synthetic: model heterogeneity (FedProx Synthetic(alpha, beta))
    beta: float = 1.0  # synthetic: feature heterogeneity
    dim: int = 60  # synthetic: feature dimension
    classes: int = 10  # synthetic: number of classes
    iid: bool = False  # synthetic: the IID variant (one shared model and feature distribution)
    max_samples: int | None = None  # cap on the train set size (quick experiments)


@dataclass
class PartitionConfig:
    """How train data is split across clients (``partition/`` group)."""

    name: str = "iid"  # iid | dirichlet | pathological | shard | natural
    alpha: float = 0.5  # dirichlet / label_dirichlet concentration
    min_partition_size: int = 2  # dirichlet: resample until every client has this many
    self_balancing: bool = False  # dirichlet: flwr-datasets' self-balancing
    classes_per_client: int = 2  # pathological
    class_assignment: str = "random"  # pathological: random | deterministic | first-deterministic
    shards_per_client: int = 2  # shard
    shard_size: int | None = None  # shard: None = derived from the data size


@dataclass
class ClientConfig:
    """Local training defaults; strategies may override them per round in the train config."""

    epochs: int = 1
    steps: int | None = None  # fixed number of local SGD steps (overrides epochs)
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    persist_optimizer: bool = False  # keep SGD momentum buffers in context.state across rounds
    num_threads: int = 0  # torch threads per client process (0 = leave as is)


@dataclass
class EvalConfig:
    every: int = 1  # central evaluation every k rounds (the last round is always evaluated)
    batch_size: int = 1024


@dataclass
class ClientResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class EngineConfig:
    """How ClientApp calls are delivered (``engine/`` group)."""

    name: str = "inline"  # inline | ray | flower
    client_resources: ClientResources = field(default_factory=ClientResources)
    address: str | None = None  # ray: join an existing cluster ("auto" or "ray://host:port")
    client_timeout: float | None = None  # seconds a client may run before it counts as failed
    num_actors: int | None = None  # ray: pool size (None = from the resources Ray reports)
    init_args: dict[str, Any] = field(default_factory=dict)  # extra ray.init kwargs


@dataclass
class ParticipationConfig:
    """Who trains in a round (``participation/`` group); decided by the harness, seeded."""

    name: str = "sampled"  # sampled | full | bernoulli | markov | cyclic (fedsim.participation.PARTICIPATION)
    fraction: float = 1.0  # sampled: fraction of clients per round
    min_clients: int = 1  # sampled: at least this many
    # bernoulli/markov/cyclic: per-client p_n generator, {name: constant|uniform|explicit|label_correlated,
    # ...its keys}; empty = FedAU's label_correlated(alpha=0.1, mean=0.1, min=0.02). See docs/fedau.md.
    probs: dict[str, Any] = field(default_factory=dict)
    q: float = 0.05  # markov: P(inactive -> active) (rescaled where P(active -> inactive) would exceed 1)
    cycle: int = 100  # cyclic: cycle length in rounds


@dataclass
class ThreatGroupConfig:
    """One attacker group of the threat model (see :mod:`fedsim.threat`)."""

    name: str = MISSING  # label used in ground truth and detection scores
    kind: str = "malicious"  # malicious | unreliable | benign
    fraction: float | None = None  # of num_clients (give this or ids)
    ids: list[int] | None = None  # explicit partition ids
    attack: Any = None  # _target_ node: a ClientAttack or a ReplyTransform (colluding)
    detect_as: list[str] | None = None  # detector labels that count as the right type (default [name])


@dataclass
class ThreatConfig:
    """Who attacks and how (``threat/`` group); the ground truth strategies never see."""

    groups: list[ThreatGroupConfig] = field(default_factory=list)


@dataclass
class OutputConfig:
    save_model: bool = True
    checkpoint_every: int = 0  # write a resumable checkpoint every k rounds (0 = never); docs/sweeps.md
    resume: bool = False  # continue an unfinished run from the checkpoint in its directory
    overwrite: bool = False  # replace the results already in the run directory (else: skip/refuse)
    divergence_factor: float = 10.0  # status "diverged" when train loss > this x the initial loss (0 = off)
    tensorboard: bool = False  # per-round scalars in run_dir/tensorboard (torch.utils.tensorboard)
    progress: str = "auto"  # auto (rich bar on a terminal, not in -m sweeps) | bar | plain


@dataclass
class FedsimConfig:
    """The whole experiment. ``fedsim --cfg job`` prints the composed instance."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: Any = MISSING
    strategy: Any = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    num_clients: int = 10
    rounds: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    timeout: float = 3600.0  # seconds the server waits for one round's replies
    name: str = "default"  # a label for reports


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="fedsim_schema", node=FedsimConfig)


DATASETS = ("digits", "synthetic", "npz", "torchvision", "huggingface")
PARTITIONS = ("iid", "dirichlet", "label_dirichlet", "pathological", "shard", "natural")
ENGINES = ("inline", "ray", "flower")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_target(node: Any, key: str, skip: tuple[str, ...] = ()) -> None:
    """Check that ``node._target_`` imports and accepts the given keyword arguments."""
    from hydra.utils import get_class, get_method

    _check(isinstance(node, (dict, DictConfig)) and "_target_" in node, key, "needs a _target_")
    target = node["_target_"]
    try:
        obj = get_class(target)
    except Exception:
        try:
            obj = get_method(target)
        except Exception as err:
            raise ConfigError(f"{key}._target_: cannot import '{target}' ({err})") from None
    fn = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in node:
        if name.startswith("_") or name in skip:
            continue
        _check(name in params, f"{key}.{name}", f"not an argument of {target}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key; touches no data."""
    _check(cfg.rounds >= 1, "rounds", f"must be >= 1 (got {cfg.rounds})")
    _check(cfg.num_clients >= 1, "num_clients", f"must be >= 1 (got {cfg.num_clients})")
    _check(cfg.timeout > 0, "timeout", "must be > 0")
    d = cfg.dataset
    _check(d.name in DATASETS, "dataset.name", f"'{d.name}' is not one of {DATASETS}")
    _check(0 < d.test_fraction < 1, "dataset.test_fraction", "must be in (0, 1)")
    if d.name == "npz":
        _check(d.path is not None, "dataset.path", "is required for dataset=npz")
        _check(Path(d.path).is_file(), "dataset.path", f"file not found: {d.path}")
    if d.name == "torchvision":
        _check(d.root is not None, "dataset.root", "is required for dataset=torchvision")
        _check(
            d.dataset_name in ("MNIST", "FashionMNIST", "CIFAR10"),
            "dataset.dataset_name",
            f"'{d.dataset_name}' is not one of MNIST, FashionMNIST, CIFAR10",
        )
        _check(d.download or Path(d.root).is_dir(), "dataset.root", f"folder not found: {d.root}")
    if d.name == "huggingface":
        _check(bool(d.dataset_name), "dataset.dataset_name", "is required for dataset=huggingface")
    if d.name == "synthetic":
        _check(d.alpha >= 0 and d.beta >= 0, "dataset.alpha", "alpha and beta must be >= 0")
        _check(d.dim >= 1 and d.classes >= 2, "dataset.dim", "dim >= 1 and classes >= 2")
    if d.max_samples is not None:
        _check(d.max_samples >= 1, "dataset.max_samples", "must be >= 1")
    p = cfg.partition
    _check(p.name in PARTITIONS, "partition.name", f"'{p.name}' is not one of {PARTITIONS}")
    _check(p.alpha > 0, "partition.alpha", f"must be > 0 (got {p.alpha})")
    _check(p.min_partition_size >= 0, "partition.min_partition_size", "must be >= 0")
    _check(p.classes_per_client >= 1, "partition.classes_per_client", "must be >= 1")
    _check(p.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")
    if p.name == "natural":
        _check(d.name == "synthetic", "partition.name", "'natural' needs dataset=synthetic")
    c = cfg.client
    _check(c.epochs >= 1, "client.epochs", "must be >= 1")
    _check(c.steps is None or c.steps >= 1, "client.steps", "must be >= 1 or null")
    _check(c.batch_size >= 1, "client.batch_size", "must be >= 1")
    _check(c.lr > 0, "client.lr", f"must be > 0 (got {c.lr})")
    _check(0 <= c.momentum < 1, "client.momentum", "must be in [0, 1)")
    _check(c.weight_decay >= 0, "client.weight_decay", "must be >= 0")
    _check(cfg.eval.every >= 1, "eval.every", "must be >= 1")
    e = cfg.engine
    _check(e.name in ENGINES, "engine.name", f"'{e.name}' is not one of {ENGINES}")
    _check(e.client_resources.num_cpus > 0, "engine.client_resources.num_cpus", "must be > 0")
    _check(e.client_resources.num_gpus >= 0, "engine.client_resources.num_gpus", "must be >= 0")
    _check(
        e.client_timeout is None or e.client_timeout > 0, "engine.client_timeout", "must be > 0"
    )
    o = cfg.output
    _check(o.checkpoint_every >= 0, "output.checkpoint_every", "must be >= 0")
    _check(o.divergence_factor >= 0, "output.divergence_factor", "must be >= 0 (0 = off)")
    _check(
        not (o.checkpoint_every and e.name == "flower"),
        "output.checkpoint_every",
        "not supported with engine=flower (client states live in Flower's runtime); use inline or ray",
    )
    _check(o.progress in ("auto", "bar", "plain"), "output.progress", f"'{o.progress}' is not one of auto, bar, plain")
    _check(not (o.resume and o.overwrite), "output.resume", "cannot be combined with output.overwrite=true")
    from fedsim import participation

    participation.validate(cfg.participation, cfg.num_clients)
    from fedsim import threat

    threat.validate(cfg.threat, cfg.num_clients)
    _check_target(cfg.model, "model")
    _check_target(cfg.strategy, "strategy")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def schema_fields(cls: type) -> list[str]:
    """Field names of a schema dataclass (for docs and error messages)."""
    return [f.name for f in dataclasses.fields(cls)]
