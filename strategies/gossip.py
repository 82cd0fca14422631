"""Decentralized gossip learning on fedsim's apps: the server is only the network.

Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully Decentralized Neural-Network
Systems", arXiv 2404.04616 (2024); spec ``../shared/specs/algorithms.md`` Sec. 5. The merge rules
(plain blend, variance-corrected averaging) are the pure functions of :mod:`strategies.vca`;
topologies come from :mod:`strategies.topology`.

Protocol (synchronous rounds; the authors' simulators are tick-driven, Sec. 5.3)
------------------------------------------------------------------------------
Each node keeps its own model in ``context.state`` (there is no global model). In round t every
*active* node i (the participation model decides)

1. receives the models its neighbours pushed in round t-1 (only neighbours that were active then);
2. merges: w_i <- merge(w_i, received) (:func:`strategies.vca.merge`; nothing received: no merge);
3. runs the local algorithm (``client.steps`` SGD steps; the authors train one minibatch of 64
   per push);
4. stores the result in ``context.state`` and replies with it: that is its push, which the server
   relays to its neighbours in round t+1.

An inactive node neither trains nor pushes, and the models sent to it that round are lost (its
neighbours' next pushes supersede them). ``topology=star`` is server FL for comparison: a virtual
centre (run here, it does not train) averages the leaves' pushes and sends the average back; the
leaves adopt it (beta defaults to 0 on a star, so merge = the centre's model: FedAvg).

Initial models (``init``): ``independent`` (default; the setting where the variance problem
appears) -- node i starts from its own draw, seeded by (seed, i); ``common`` -- every node starts
from one model: the harness's initial model, re-drawn with ``init_scheme`` (sent once, on a node's
first participation). ``init_scheme``: ``xavier`` (default; the authors' Caffe LeNet uses Xavier
weight fillers and zero biases: Xavier-uniform on every weight tensor with >= 2 dimensions, zero
for its bias, everything else as the model's own init) or ``default`` (the model zoo's PyTorch
init; with ``init=common`` that is exactly the model FedAvg starts from).

Wire format: Flower's train message must carry the model record ``"arrays"``, so a node that
receives m >= 1 models gets the first as ``"arrays"`` and the others as ``"gossip-1"`` ..
``"gossip-{m-1}"`` (no byte is sent twice: Ray shares a model relayed to several nodes). A node
that receives nothing still gets an ``"arrays"`` record, as the harness's client requires (the harness's initial model in round 1, else
its own last push), which it ignores; ``bytes_down`` counts it, ``gossip_relayed_bytes`` does not.

What the harness sees: the strategy returns the uniform average of the nodes' latest models as the
"global model" (so ``test_accuracy`` is the accuracy of the average of node models; on a star it is
the centre's model), and :meth:`Gossip.round_metrics` adds per-round node metrics (mean / min / max
node test accuracy on the first ``node_eval_samples`` test examples, consensus distance, weight
variance relative to each node's first push, relayed bytes).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.arrays import record_from_torch, record_to_torch
from fedsim.local import LocalAlgorithm, LocalRun, register_local_algorithm
from fedsim.seeding import derive_seed, torch_gen
from strategies import vca
from strategies.topology import Topology, build_topology, check_topology

log = logging.getLogger("fedsim")

STATE_KEY = "gossip-model"  # client state: the node's own model
INIT_KEY = "gossip-init"  # down (init=common, first participation): the common initial model
EXTRA_PREFIX = "gossip-"  # down: received models 2..m are "gossip-1", "gossip-2", ...
INITS = ("independent", "common")
INIT_SCHEMES = ("xavier", "default")
STAR_WEIGHTINGS = ("num_examples", "uniform")


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------
def xavier_init(state: Mapping[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Xavier-uniform (Glorot & Bengio 2010) on every float ``*weight`` tensor with >= 2 dims and
    zero for the matching ``*bias``; other tensors copied. Draws in key order from ``gen``."""
    out = {k: v.detach().clone() for k, v in state.items()}
    for k, v in state.items():
        if vca.is_correctable(k, v, "weights"):
            w = torch.empty(v.shape, dtype=torch.float32)
            torch.nn.init.xavier_uniform_(w, generator=gen)
            out[k] = w.to(v.dtype)
            bias = k[: -len("weight")] + "bias"
            if bias in out and out[bias].is_floating_point():
                out[bias] = torch.zeros_like(out[bias])
    return out


def mean_state(states: list[Mapping[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of float tensors (float64 sums); non-float tensors from the first state."""
    w = np.ones(len(states)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out: dict[str, torch.Tensor] = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = torch.zeros(v.shape, dtype=torch.float64)
        for wi, s in zip(w, states):
            acc += float(wi) * s[k].to(torch.float64)
        out[k] = acc.to(v.dtype)
    return out


def consensus_distance(states: list[Mapping[str, torch.Tensor]]) -> float:
    """(1/n) sum_i ||w_i - w_bar||_2 over all mergeable (float, non-BN-buffer) tensors."""
    keys = [k for k, v in states[0].items() if vca.is_mergeable(k, v)]
    flat = torch.stack([torch.cat([s[k].reshape(-1).to(torch.float64) for k in keys]) for s in states])
    return float((flat - flat.mean(0)).norm(dim=1).mean())


def layer_variances(state: Mapping[str, torch.Tensor], scope: str = "weights") -> dict[str, float]:
    """Population variance of each tensor VCA would correct under ``scope``."""
    return {k: float(vca.layer_variance(v)) for k, v in state.items() if vca.is_correctable(k, v, scope)}


# ---------------------------------------------------------------------------------------------
# Client half
# ---------------------------------------------------------------------------------------------
@register_local_algorithm("gossip")
class GossipLocal(LocalAlgorithm):
    """A gossip node: own model from ``context.state`` (or its initial model), merge with the
    received models, then the ordinary local loop trains it; the result is stored and pushed."""

    def on_start(self, run: LocalRun) -> None:
        c = run.config
        if STATE_KEY in run.state.array_records:
            own = record_to_torch(run.state.array_records[STATE_KEY])
        else:
            own = self.initial_model(run)
        m = int(c.get("gossip-received", 0))
        received: list[dict[str, torch.Tensor]] = []
        if m > 0:
            received.append({k: v.detach().cpu() for k, v in run.global_params.items()})
            received += [record_to_torch(run.content.array_records[f"{EXTRA_PREFIX}{k}"]) for k in range(1, m)]
        merged = vca.merge(
            own,
            received,
            beta=float(c["gossip-beta"]),
            rule=str(c["gossip-merge"]),
            target=str(c["gossip-target"]),
            scope=str(c["gossip-scope"]),
            eps=float(c["gossip-eps"]),
        )
        run.model.load_state_dict(merged, strict=True)
        # the local run starts here: FedProx / model attacks measure from the merged model
        dev = {k: v.to(run.device) for k, v in merged.items()}
        run.global_params.clear()
        run.global_params.update(dev)

    def initial_model(self, run: LocalRun) -> dict[str, torch.Tensor]:
        """This node's starting model (see the module docstring, ``init`` / ``init_scheme``)."""
        c = run.config
        seed = int(c["gossip-seed"])
        if str(c["gossip-init"]) == "common":
            return record_to_torch(run.content.array_records[INIT_KEY])
        model = copy.deepcopy(run.model).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "gossip-init", run.partition_id))
            for mod in model.modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if str(c["gossip-init-scheme"]) == "xavier":
            state = xavier_init(state, torch_gen(seed, "gossip-xavier", run.partition_id))
        return state

    def on_end(self, run: LocalRun, reply: RecordDict) -> None:
        run.state[STATE_KEY] = reply.array_records["arrays"]


# ---------------------------------------------------------------------------------------------
# Server half: the network
# ---------------------------------------------------------------------------------------------
class Gossip(FedAvg):
    """Relays node models along a topology (see the module docstring).

    Parameters
    ----------
    merge : "plain" | "vca"  -- :func:`strategies.vca.merge` rule.
    beta : weight of the node's own model, in [0, 1]; ``None`` = 0.5 (the authors'
        ``train_50_average_50``), or 0 on a star (leaves adopt the centre's model).
    target : VCA target variance, "auto" | "self" | "follow_beta".
    scope : tensors VCA rescales, "weights" (C++) | "all" (DFL_torch).
    eps : inside sqrt((t + eps) / (c + eps)).
    init : "independent" | "common";  init_scheme : "xavier" | "default".
    topology : ``{name: ring|random_regular|erdos_renyi|small_world|complete|star, ...}``
        (:mod:`strategies.topology`; the ``topology=`` config group fills it).
    star_weighting : how the star's centre averages: "num_examples" (FedAvg) | "uniform".
    node_eval_samples : evaluate node models on the first this many test examples (None = all).
    """

    # fedsim.checkpoint: the network state (the topology is redrawn, seeded, by bind_harness)
    checkpoint_attrs = ("pushed", "latest", "first_var", "centre", "initial", "common_init", "seen",
                        "relayed_bytes", "_last_records", "metrics_")

    def __init__(
        self,
        merge: str = "plain",
        beta: float | None = None,
        target: str = "auto",
        scope: str = "weights",
        eps: float = vca.DEFAULT_EPS,
        init: str = "independent",
        init_scheme: str = "xavier",
        topology: Mapping[str, Any] | None = None,
        star_weighting: str = "num_examples",
        node_eval_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("fraction_train", 1.0)
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_train_nodes", 0)
        kwargs.setdefault("min_evaluate_nodes", 0)
        kwargs.setdefault("min_available_nodes", 0)
        if float(kwargs["fraction_train"]) != 1.0:
            raise ValueError("strategy.fraction_train: must be 1.0 for gossip (participation/ decides who is active)")
        super().__init__(**kwargs)
        topo = dict(topology or {"name": "random_regular", "degree": 8})
        check_options(merge, beta, target, scope, eps, init, init_scheme, topo, star_weighting, node_eval_samples)
        self.merge, self.target, self.scope, self.eps = merge, target, scope, float(eps)
        self.init, self.init_scheme = init, init_scheme
        self.topology_cfg = topo
        self.beta = float(beta) if beta is not None else (0.0 if topo["name"] == "star" else 0.5)
        self.star_weighting = star_weighting
        self.node_eval_samples = node_eval_samples
        self.topology: Topology | None = None
        self.seed = 0
        self.node_to_pid: dict[int, int] = {}
        self.pushed: dict[int, ArrayRecord] = {}  # pid -> model pushed last round
        self.latest: dict[int, dict[str, torch.Tensor]] = {}  # pid -> latest model seen
        self.first_var: dict[int, dict[str, float]] = {}  # pid -> layer variances of its first push
        self.centre: ArrayRecord | None = None  # star: the centre's average
        self.initial: ArrayRecord | None = None
        self.common_init: ArrayRecord | None = None
        self.seen: set[int] = set()  # pids that have been sent their initial model / replied
        self.relayed_bytes: dict[int, int] = {}
        self._last_records: dict[int, ArrayRecord] = {}  # pid -> latest push, as received
        self.metrics_: dict[int, dict[str, Any]] = {}

    def check_setup(self, setup: Any) -> None:
        """fedsim's setup hook (:mod:`fedsim.setup_checks`): the options against the whole config."""
        from fedsim.config import ConfigError

        try:
            self.check_config(setup.cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @staticmethod
    def check_config(cfg: Any) -> None:
        """Validate the strategy node against the whole config before any work."""
        s = dict(cfg["strategy"])
        topo = dict(s.get("topology") or {"name": "random_regular", "degree": 8})
        check_options(
            s.get("merge", "plain"), s.get("beta"), s.get("target", "auto"), s.get("scope", "weights"),
            s.get("eps", vca.DEFAULT_EPS), s.get("init", "independent"), s.get("init_scheme", "xavier"),
            topo, s.get("star_weighting", "num_examples"), s.get("node_eval_samples"),
        )  # fmt: skip
        check_topology(topo, int(cfg["num_clients"]), where="topology")
        if float(s.get("fraction_train", 1.0)) != 1.0:
            raise ValueError("strategy.fraction_train: must be 1.0 for gossip (participation/ decides who is active)")
        known = set(inspect.signature(Gossip.__init__).parameters) | set(inspect.signature(FedAvg.__init__).parameters)
        for key in s:
            if not key.startswith("_") and key not in known:
                raise ValueError(f"strategy.{key}: not an argument of strategies.gossip.Gossip")

    # --- harness binding ----------------------------------------------------------------
    def bind_harness(self, grid) -> None:  # noqa: ANN001
        """Learn the node -> partition map and draw the topology over all N nodes."""
        nodes = list(grid.all_node_ids())
        self.node_to_pid = {n: grid.pid(n) for n in nodes}
        self.seed = int(grid.seed)
        self.topology = build_topology(self.topology_cfg, len(nodes), self.seed)
        mean_d, min_d, max_d = self.topology.degree_stats()
        log.info(
            "gossip: %s over %d nodes%s, degree mean %.1f (min %d, max %d)%s; merge=%s beta=%s",
            self.topology.name, len(nodes), " (virtual centre)" if self.topology.star else "", mean_d, min_d,
            max_d, f", {self.topology.draws} draws" if self.topology.draws > 1 else "", self.merge, self.beta,
        )  # fmt: skip

    # --- train ----------------------------------------------------------------------------
    def received_for(self, pid: int) -> list[ArrayRecord]:
        """The models node ``pid`` receives this round (pushed last round by its neighbours)."""
        assert self.topology is not None
        if self.topology.star:
            return [self.centre] if self.centre is not None else []
        return [self.pushed[j] for j in self.topology.neighbors[pid] if j in self.pushed]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per active node with the models relayed to it."""
        if self.topology is None:
            self.bind_harness(grid)
        if self.initial is None:
            self.initial = arrays
            if self.init == "common":
                self.common_init = self.make_common_init(arrays)
        base = dict(config)
        base.update(
            {
                "server-round": server_round,
                "local-algorithm": "gossip",
                "gossip-merge": self.merge,
                "gossip-beta": self.beta,
                "gossip-target": self.target,
                "gossip-scope": self.scope,
                "gossip-eps": self.eps,
                "gossip-init": self.init,
                "gossip-init-scheme": self.init_scheme,
                "gossip-seed": self.seed,
            }
        )
        msgs, relayed = [], 0
        for node in grid.get_node_ids():
            pid = self.node_to_pid[node]
            received = self.received_for(pid)
            cfg = ConfigRecord({**base, "gossip-received": len(received)})
            content: dict[str, Any] = {self.configrecord_key: cfg}
            if received:
                content[self.arrayrecord_key] = received[0]
                for k, rec in enumerate(received[1:], start=1):
                    content[f"{EXTRA_PREFIX}{k}"] = rec
                relayed += sum(_nbytes(r) for r in received)
            else:  # the "arrays" record every train message must carry (the node ignores it)
                own = self.latest.get(pid)
                content[self.arrayrecord_key] = self.initial if own is None else self._record(pid)
            if self.init == "common" and pid not in self.seen:
                content[INIT_KEY] = self.common_init
            msgs.append(Message(RecordDict(content), dst_node_id=node, message_type=MessageType.TRAIN))
        self.relayed_bytes[server_round] = relayed
        return msgs

    def make_common_init(self, arrays: ArrayRecord) -> ArrayRecord:
        """The common initial model: the harness's, re-drawn with ``init_scheme``."""
        if self.init_scheme == "default":
            return arrays
        state = xavier_init(record_to_torch(arrays), torch_gen(self.seed, "gossip-xavier", "common"))
        return record_from_torch(state)

    def _record(self, pid: int) -> ArrayRecord:
        rec = self._last_records.get(pid)
        return rec if rec is not None else record_from_torch(self.latest[pid])

    # --- aggregate ------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Remember this round's pushes; return the average of the nodes' latest models."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        pushed: dict[int, ArrayRecord] = {}
        weights: dict[int, float] = {}
        for m in valid:
            pid = self.node_to_pid[m.metadata.src_node_id]
            rec = m.content.array_records[self.arrayrecord_key]
            pushed[pid] = rec
            self._last_records[pid] = rec
            self.latest[pid] = record_to_torch(rec)
            self.seen.add(pid)
            if pid not in self.first_var:
                self.first_var[pid] = layer_variances(self.latest[pid], "weights")
            metrics = m.content.metric_records.get("metrics", MetricRecord())
            weights[pid] = float(metrics.get(self.weighted_by_key, 1.0))
        self.pushed = pushed
        if self.topology is not None and self.topology.star and pushed:
            order = sorted(pushed)
            w = [weights[p] for p in order] if self.star_weighting == "num_examples" else None
            self.centre = record_from_torch(mean_state([self.latest[p] for p in order], w))
        self.metrics_[server_round] = self.network_metrics()
        if not self.latest:
            return None, None
        if self.topology is not None and self.topology.star and self.centre is not None:
            global_rec = self.centre
        else:
            global_rec = record_from_torch(mean_state([self.latest[p] for p in sorted(self.latest)]))
        agg = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key) if valid else None
        return global_rec, agg

    def network_metrics(self) -> dict[str, Any]:
        """Consensus distance and weight-variance ratio over the nodes' latest models."""
        states = [self.latest[p] for p in sorted(self.latest)]
        if not states:
            return {}
        ratios = []
        for p in sorted(self.latest):
            now = layer_variances(self.latest[p], "weights")
            first = self.first_var[p]
            r = [now[k] / first[k] for k in now if first.get(k, 0.0) > 0]
            if r:
                ratios.append(float(np.mean(r)))
        return {
            "consensus_distance": consensus_distance(states),
            "weight_var_ratio": float(np.mean(ratios)) if ratios else None,
            "nodes_known": len(states),
        }

    # --- the harness's generic per-round hook ----------------------------------------------
    def round_metrics(
        self, server_round: int, evaluate: Callable[[ArrayRecord, int | None], tuple[float, float]] | None
    ) -> dict[str, Any]:
        """Per-round gossip metrics for ``metrics.jsonl``; node accuracies when ``evaluate`` is given
        (``evaluate(arrays, max_samples) -> (loss, accuracy)`` on the test set)."""
        row: dict[str, Any] = dict(self.metrics_.get(server_round, {}))
        row["gossip_relayed_bytes"] = self.relayed_bytes.get(server_round, 0)
        if evaluate is not None and self.latest:
            res = [evaluate(self._record(p), self.node_eval_samples) for p in sorted(self.latest)]
            accs = [a for _, a in res]
            row.update(
                node_acc_mean=float(np.mean(accs)),
                node_acc_min=float(np.min(accs)),
                node_acc_max=float(np.max(accs)),
                node_loss_mean=float(np.mean([loss for loss, _ in res])),
            )
        return row


def _nbytes(rec: ArrayRecord) -> int:
    return sum(len(a.data) for a in rec.values())


def check_options(
    merge: Any, beta: Any, target: Any, scope: Any, eps: Any, init: Any, init_scheme: Any,
    topology: Mapping[str, Any], star_weighting: Any, node_eval_samples: Any,
) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the first bad ``strategy.*`` key."""

    def bad(key: str, msg: str) -> ValueError:
        return ValueError(f"strategy.{key}: {msg}")

    if merge not in vca.MERGES:
        raise bad("merge", f"'{merge}' is not one of {list(vca.MERGES)}")
    if beta is not None and not 0.0 <= float(beta) <= 1.0:
        raise bad("beta", f"must be in [0, 1] (got {beta})")
    if target not in vca.TARGETS:
        raise bad("target", f"'{target}' is not one of {list(vca.TARGETS)}")
    if scope not in vca.SCOPES:
        raise bad("scope", f"'{scope}' is not one of {list(vca.SCOPES)}")
    if float(eps) < 0:
        raise bad("eps", f"must be >= 0 (got {eps})")
    if merge == "plain":
        for key, value, default in (("target", target, "auto"), ("scope", scope, "weights"), ("eps", eps, vca.DEFAULT_EPS)):
            if value != default:
                raise bad(key, "only used by merge=vca (set strategy.merge=vca)")
    if init not in INITS:
        raise bad("init", f"'{init}' is not one of {list(INITS)}")
    if init_scheme not in INIT_SCHEMES:
        raise bad("init_scheme", f"'{init_scheme}' is not one of {list(INIT_SCHEMES)}")
    if star_weighting not in STAR_WEIGHTINGS:
        raise bad("star_weighting", f"'{star_weighting}' is not one of {list(STAR_WEIGHTINGS)}")
    if topology.get("name") != "star" and star_weighting != "num_examples":
        raise bad("star_weighting", "only used by topology=star")
    if node_eval_samples is not None and int(node_eval_samples) < 1:
        raise bad("node_eval_samples", f"must be >= 1 or null (got {node_eval_samples})")
