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
    nonfinite: str = "error"  # NaN/Inf in x: error (refuse the data) | drop (drop those samples, logged)


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
    num_threads: Any = "auto"  # torch threads per client process: auto | 0 (torch's default) | n (fedsim.threads)
    # Flower client mods wrapping the ClientApp: dotted paths of mod functions or _target_
    # nodes of mod objects (e.g. defenses.privacy.PrivacyMod, flwr's LocalDpMod)
    mods: list[Any] = field(default_factory=list)


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
    batched: bool = False  # ray: each actor trains its share of the round as one batch (fedsim.batched)
    max_batch: int | None = None  # batched trainer: clients per vmap call (None = all at once)


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
class AttackScheduleConfig:
    """Rounds a threat group attacks in (outside them its members train honestly)."""

    start: int = 1  # first attack round (a clean warm-up of start - 1 rounds)
    stop: int | None = None  # last attack round (None = to the end; later rounds measure durability)
    every: int = 1  # attack in rounds start, start + every, ... (paper: start 1, every 10)
    sample: bool = False  # the members train exactly in their attack rounds (fixed-frequency mode)


@dataclass
class ThreatGroupConfig:
    """One attacker group of the threat model (see :mod:`fedsim.threat`)."""

    name: str = MISSING  # label used in ground truth and detection scores
    kind: str = "malicious"  # malicious | unreliable | benign
    fraction: float | None = None  # of num_clients (give this or ids)
    ids: list[int] | None = None  # explicit partition ids
    attack: Any = None  # _target_ node: a ClientAttack or a ReplyTransform (colluding)
    detect_as: list[str] | None = None  # detector labels that count as the right type (default [name])
    schedule: AttackScheduleConfig = field(default_factory=AttackScheduleConfig)


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
class InitConfig:
    """Where the initial global model comes from."""

    checkpoint: str | None = None  # a state_dict saved with torch.save (e.g. a run's model.pt)


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
    topology: Any = None  # topology/ group: the graph of a decentralized strategy (e.g. gossip)
    client: ClientConfig = field(default_factory=ClientConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    init: InitConfig = field(default_factory=InitConfig)
    num_clients: int = 10
    rounds: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    timeout: float = 3600.0  # seconds the server waits for one round's replies
    name: str = "default"  # a label for reports
    # gradient-inversion benchmark (attacks/inversion/benchmark.py) instead of FL training when set
    inversion: Any = None
    # in-federation inversion observer (attacks/inversion/observer.py), a reply hook
    observer: Any = None


def dirname_safe(text: str) -> str:
    """An override string as one directory name: ``/`` (in paths given as values, e.g.
    ``dataset.path=/data/x.npz``) would nest directories, so it becomes ``%2F``."""
    return str(text).replace("/", "%2F")


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore and the ``fedsim_dirname`` resolver that
    configs/config.yaml's sweep sub-directory uses (both idempotent)."""
    ConfigStore.instance().store(name="fedsim_schema", node=FedsimConfig)
    if not OmegaConf.has_resolver("fedsim_dirname"):
        OmegaConf.register_new_resolver("fedsim_dirname", dirname_safe)


DATASETS = ("digits", "synthetic", "npz", "torchvision", "huggingface")
PARTITIONS = ("iid", "dirichlet", "label_dirichlet", "pathological", "shard", "natural")
ENGINES = ("inline", "ray", "flower", "batched")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def locate(target: str) -> Any:
    """The object ``target`` names (a class or a callable), imported without Hydra's own error
    log (``hydra.utils`` logs every failed lookup before raising, so a missing module would be
    reported two or three times besides fedsim's one line)."""
    import logging

    from hydra._internal.utils import _locate

    hydra_log = logging.getLogger("hydra.utils")
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return _locate(target)
    finally:
        hydra_log.disabled = disabled


def _check_target(
    node: Any, key: str, skip: tuple[str, ...] = (), base: type | None = None, base_name: str = ""
) -> None:
    """Check that ``node._target_`` imports, is a subclass of ``base`` when it is a class, and
    accepts the given keyword arguments."""
    _check(isinstance(node, (dict, DictConfig)) and "_target_" in node, key, "needs a _target_")
    target = node["_target_"]
    try:
        obj = locate(target)
    except Exception as err:
        raise ConfigError(f"{key}._target_: cannot import '{target}' ({_import_reason(err)})") from None
    _check(callable(obj), f"{key}._target_", f"'{target}' is not a class or a function")
    if base is not None and inspect.isclass(obj):
        _check(issubclass(obj, base), f"{key}._target_", f"{target} is not a {base_name or base.__qualname__}")
    params = _accepted_params(obj)
    if params is None:
        return
    for name in node:
        if name.startswith("_") or name in skip:
            continue
        _check(name in params, f"{key}.{name}", f"not an argument of {target}")


def _accepted_params(obj: Any) -> set[str] | None:
    """Keyword arguments ``obj`` accepts; ``None`` when any is. A class whose ``__init__`` takes
    ``**kwargs`` is assumed to pass them on to its base class (``super().__init__(**kwargs)``, as
    a strategy extending FedAvg does), so the bases' parameters are added until one ``__init__``
    has no ``**kwargs``; a function with ``**kwargs`` accepts anything."""
    fns = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    names: set[str] = set()
    for fn in fns:
        params = inspect.signature(fn).parameters
        names.update(n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _import_reason(err: BaseException) -> str:
    """The root cause of a failed ``_target_`` import, once (Hydra nests and repeats it)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Are you sure")]
    text = lines[-1] if lines else type(err).__name__
    return text


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
    _check(d.nonfinite in ("error", "drop"), "dataset.nonfinite", f"'{d.nonfinite}' is not one of error, drop")
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
    from fedsim.threads import check_threads

    _check(check_threads(c.num_threads) is None, "client.num_threads", str(check_threads(c.num_threads)))
    _check(cfg.eval.every >= 1, "eval.every", "must be >= 1")
    for i, mod in enumerate(c.get("mods") or []):
        if isinstance(mod, str):
            from hydra.utils import get_method

            try:
                get_method(mod)
            except Exception as err:
                raise ConfigError(f"client.mods[{i}]: cannot import '{mod}' ({err})") from None
        else:
            _check_target(mod, f"client.mods[{i}]")
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
    _check(not e.batched or e.name == "ray", "engine.batched", f"only for engine=ray (use engine=batched, not {e.name})")
    uses_batch = e.name == "batched" or (e.name == "ray" and e.batched)
    _check(e.max_batch is None or uses_batch, "engine.max_batch", "only for engine=batched or engine.batched=true")
    _check(e.max_batch is None or e.max_batch >= 1, "engine.max_batch", f"must be >= 1 or null (got {e.max_batch})")
    from fedsim import participation

    participation.validate(cfg.participation, cfg.num_clients)
    from fedsim import threat

    threat.validate(cfg.threat, cfg.num_clients)
    from flwr.serverapp.strategy import Strategy
    from torch import nn

    _check_target(cfg.model, "model", base=nn.Module, base_name="torch.nn.Module")
    _check_target(cfg.strategy, "strategy", base=Strategy, base_name="flwr.serverapp.strategy.Strategy")
    ckpt = cfg.get("init", {}).get("checkpoint")
    if ckpt is not None:
        _check(Path(ckpt).is_file(), "init.checkpoint", f"file not found: {ckpt}")
    from fedsim.setup_checks import check_setup  # builds the strategy: Flower's and its own constraints

    check_setup(cfg)
    if cfg.get("observer") is not None:
        _check_target(cfg.observer, "observer")
        _check(
            not (o.checkpoint_every or o.resume), "observer",
            "cannot be combined with output.checkpoint_every / output.resume yet (an observer's "
            "run-long tallies are not checkpointed); drop one of them",
        )


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def schema_fields(cls: type) -> list[str]:
    """Field names of a schema dataclass (for docs and error messages)."""
    return [f.name for f in dataclasses.fields(cls)]
