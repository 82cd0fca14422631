"""Batched local training: many clients' local SGD at once, as a batch of models (torch.func).

What :func:`fedsim.client.client_train` does for one client, :func:`train_batch` does for a
list of train Messages at once, with the same arithmetic up to float summation order:

* parameters stacked ``[clients, ...]``; the loss of every client is evaluated with
  ``torch.func.functional_call`` under ``torch.func.vmap`` (``grad_and_value``), so one call
  computes every client's gradient on its own minibatch;
* each client's minibatches are the ones ``client_train`` draws (``fedsim.local.batches`` with
  ``torch_gen(seed, "batches", round, pid)``); a client with fewer steps, or whose data attack
  skips a batch, is **masked** at that step (its parameters, optimizer state and counters stay
  as they are); a short batch (end of an epoch) is completed with the client's own first sample
  at weight 0, so the loss is the mean over its real samples only (no fake data enters);
* per-client optimizer state: SGD with per-client lr, momentum (heavy ball, dampening 0, as
  ``torch.optim.SGD``) and weight decay; ``client.persist_optimizer`` buffers load from and go
  back to ``context.state`` exactly as ``client_train`` stores them;
* the local algorithm runs in its **batched form** (:class:`BatchedLocal`, registered for the
  :class:`~fedsim.local.LocalAlgorithm` class with :func:`register_batched`): plain SGD and
  FedProx here, the momentum family in ``strategies/momentum.py``. A local algorithm without a
  batched form is refused, never approximated;
* attacks: data attacks (``transform_data``) act on the client's data before the batch, data
  hooks (a :class:`~fedsim.local.TrainHook` that only overrides ``on_batch``: blur, partial
  training) on each client's minibatch before the step, update attacks
  (``transform_update``) on the result after it, all with the client's own generator, in the
  same order as ``client_train``. Hooks that act inside the step are refused;
* one reply Message per client, built like ``client_train``'s, so strategies, reply hooks,
  threat models and metrics see no difference.

Refused (:class:`~fedsim.config.ConfigError` naming the setting, suggesting ``engine=inline``):
BatchNorm (batch statistics in train mode mix the samples of a batch and update running
buffers), Dropout (its random masks come from each client's torch seed, which a vmapped batch
cannot reproduce), local algorithms without a batched form, attack hooks inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedsim.config import ConfigError
from fedsim.local import (
    FedProxLocal,
    LocalAlgorithm,
    LocalRun,
    PlainSGD,
    TrainHook,
    batches,
    get_local_algorithm,
    steps_for,
)

Tensors = dict[str, torch.Tensor]

__all__ = [
    "BatchedLocal",
    "BatchedStep",
    "register_batched",
    "batched_form",
    "check_model",
    "check_attack",
    "is_data_hook",
    "train_batch",
]


# ---------------------------------------------------------------------------------------------
# Batched forms of local algorithms
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One client of the batch: what ``client_train`` would know about it."""

    msg: Message
    context: Context
    pid: int
    config: ConfigRecord
    x: torch.Tensor
    y: torch.Tensor
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    total: int
    global_sd: Tensors
    algo: LocalAlgorithm
    run: LocalRun
    attack: Any = None
    arng: np.random.Generator | None = None
    data_hooks: list[TrainHook] = field(default_factory=list)


@dataclass
class BatchedStep:
    """What a batched local algorithm sees at a step (stacked over the chunk's clients)."""

    params: Tensors  # trainable parameters [C, ...] (before this step's update)
    others: Tensors  # buffers and frozen parameters [C, ...]
    x: torch.Tensor  # [C, B, ...]
    y: torch.Tensor  # [C, B]
    weight: torch.Tensor  # [C, B]: 1 for real samples, 0 for the padding of a short batch
    active: torch.Tensor  # [C] bool: clients that take this step
    grads_of: Callable[[Tensors], Tensors]  # plain-loss gradients at other params, same batch


class BatchedLocal:
    """The batched form of a :class:`~fedsim.local.LocalAlgorithm`.

    One instance serves one chunk; ``jobs[c].algo`` is the per-client local algorithm object
    ``client_train`` would have used, so a batched form can reuse its ``on_start`` / ``on_end``
    (per client, outside the hot loop) and only batch the per-step arithmetic. The defaults
    are plain SGD's: no loss term, gradients unchanged.
    """

    def __init__(self, jobs: list[Job], names: list[str], device: torch.device) -> None:
        self.jobs, self.names, self.device = jobs, names, device

    def col(self, values: list[float]) -> torch.Tensor:
        """A per-client scalar as a float tensor ``[C]`` on the device."""
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def on_start(self) -> None:
        """Before the first step: the per-client ``on_start``."""
        for j in self.jobs:
            j.algo.on_start(j.run)

    def aux(self) -> dict[str, Any]:
        """Per-client tensors ``[C, ...]`` handed (sliced) to :meth:`loss` under vmap."""
        return {}

    def loss(self, params: Tensors, aux: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        """One client's loss (runs under vmap): add terms like ``TrainHook.loss``."""
        return loss

    def on_grads(self, step: BatchedStep, grads: Tensors) -> Tensors:
        """Stacked gradients -> the direction the optimizer steps along (``on_backward``)."""
        return grads

    def on_end(self, replies: list[RecordDict]) -> None:
        """After the last step: the per-client ``on_end`` (adds records, updates state)."""
        for j, reply in zip(self.jobs, replies, strict=True):
            j.algo.on_end(j.run, reply)


BATCHED_FORMS: dict[type[LocalAlgorithm], type[BatchedLocal]] = {}


def register_batched(*local_classes: type[LocalAlgorithm]) -> Callable[[type[BatchedLocal]], type[BatchedLocal]]:
    """Class decorator: the batched form of exactly these local algorithm classes (a subclass
    without its own registration is refused: it may change what the step does)."""

    def deco(cls: type[BatchedLocal]) -> type[BatchedLocal]:
        for lc in local_classes:
            BATCHED_FORMS[lc] = cls
        return cls

    return deco


def batched_form(algo: LocalAlgorithm) -> type[BatchedLocal]:
    """The registered batched form of ``algo``, or a ConfigError naming it."""
    form = BATCHED_FORMS.get(type(algo))
    if form is None:
        raise ConfigError(
            f"engine=batched: local algorithm '{algo.name}' ({type(algo).__qualname__}) has no batched form "
            "(register one with fedsim.batched.register_batched); use engine=inline"
        )
    return form


register_batched(PlainSGD)(BatchedLocal)


@register_batched(FedProxLocal)
class FedProxBatched(BatchedLocal):
    """FedProx (Li et al. 2020, Eq. 2): loss + (mu_i / 2) ||w - w^t||^2 per client."""

    def on_start(self) -> None:
        super().on_start()
        self.mu = [float(j.algo.mu) for j in self.jobs]
        self.globals = {n: torch.stack([j.global_sd[n] for j in self.jobs]) for n in self.names}

    def aux(self) -> dict[str, Any]:
        if not any(self.mu):
            return {}
        return {"mu": self.col(self.mu), "global": self.globals}

    def loss(self, params: Tensors, aux: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        if "mu" not in aux:
            return loss
        prox = sum(((params[n] - aux["global"][n]) ** 2).sum() for n in params)
        return loss + 0.5 * aux["mu"] * prox


# ---------------------------------------------------------------------------------------------
# Checks (at start)
# ---------------------------------------------------------------------------------------------
def check_model(model: nn.Module) -> None:
    """Refuse modules whose train-mode behaviour a vmapped batch cannot reproduce."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"engine=batched: model has BatchNorm ({name}: {type(mod).__name__}), whose train-mode batch "
                "statistics and running buffers cannot be batched per client; use engine=inline "
                "(or a GroupNorm model, e.g. model.norm=group)"
            )
        if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)) and mod.p > 0:
            raise ConfigError(
                f"engine=batched: model has Dropout ({name}, p={mod.p}), whose per-client random masks the batch "
                "cannot reproduce; set the model's dropout to 0 or use engine=inline"
            )


_HOOK_METHODS = ("on_start", "loss", "on_backward", "on_step", "on_end")


def is_data_hook(hook: TrainHook) -> bool:
    """True when ``hook`` only transforms or skips batches (overrides ``on_batch`` alone)."""
    return all(getattr(type(hook), m) is getattr(TrainHook, m) for m in _HOOK_METHODS)


def check_attack(attack: Any, where: str) -> None:
    """Refuse an attack whose training-time hooks act inside the step."""
    if attack is None:
        return
    for hook in attack.hooks(np.random.default_rng(0)):
        if not is_data_hook(hook):
            raise ConfigError(
                f"engine=batched: {where} attack {type(attack).__name__} hooks the local step "
                f"({type(hook).__name__}), which the batched engine cannot run; use engine=inline"
            )


# ---------------------------------------------------------------------------------------------
# The batched trainer
# ---------------------------------------------------------------------------------------------
def _param(config: ConfigRecord, key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def _globals(rec: Any, rt: Any, cache: dict[int, Tensors]) -> Tensors:
    """The received global state dict as the model's dtypes and device (what
    ``client_train``'s ``_load_global`` returns), converted once per distinct record: every
    train message of a round usually carries the same one. Read only (stacking copies it)."""
    sd = cache.get(id(rec))
    if sd is None:
        from fedsim.arrays import record_to_torch

        ref = rt.model.state_dict()
        got = record_to_torch(rec)
        if set(got) != set(ref):
            raise KeyError(f"global model keys differ from the model's: {sorted(set(got) ^ set(ref))[:5]}")
        sd = cache[id(rec)] = {k: got[k].to(device=v.device, dtype=v.dtype).reshape(v.shape) for k, v in ref.items()}
    return sd


def _prepare(msg: Message, context: Context, cfg: dict[str, Any], rt: Any, cache: dict[int, Tensors]) -> Job:
    """Everything ``client_train`` does before its loop, for one client."""
    from fedsim import threat
    from fedsim.client import seed_torch
    from fedsim.seeding import derive_seed, np_rng

    pid = int(context.node_config["partition-id"])
    config: ConfigRecord = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(_param(config, "server-round", 0))
    seed, ccfg = int(cfg["seed"]), cfg["client"]
    seed_torch(derive_seed(seed, "client-torch", server_round, pid))
    global_sd = _globals(msg.content.array_records["arrays"], rt, cache)
    x, y = rt.data.client(pid)
    attack = threat.client_attack(cfg.get("threat"), pid, cfg["num_clients"], seed, server_round)
    arng = np_rng(seed, "attack", server_round, pid) if attack is not None else None
    hooks: list[TrainHook] = []
    if attack is not None:
        x, y = attack.transform_data(x, y, arng)
        hooks = attack.hooks(arng)
        check_attack(attack, f"partition {pid}'s")
    lr = float(_param(config, "lr", ccfg["lr"]))
    batch_size = int(_param(config, "batch-size", ccfg["batch_size"]))
    steps_cfg = _param(config, "local-steps", ccfg.get("steps"))
    epochs = int(_param(config, "local-epochs", ccfg["epochs"]))
    total = steps_for(len(y), batch_size, epochs, None if steps_cfg in (None, 0) else int(steps_cfg))
    algo = get_local_algorithm(config)
    batched_form(algo)  # refuse before any training
    run = LocalRun(
        model=rt.model, global_params=global_sd, content=msg.content, config=config, state=context.state,
        device=rt.device, lr=lr, total_steps=total, partition_id=pid, server_round=server_round,
    )
    return Job(
        msg=msg, context=context, pid=pid, config=config, x=x, y=y, lr=lr,
        momentum=float(_param(config, "momentum", ccfg["momentum"])),
        weight_decay=float(_param(config, "weight-decay", ccfg["weight_decay"])),
        batch_size=batch_size, total=total, global_sd=global_sd, algo=algo, run=run,
        attack=attack, arng=arng, data_hooks=hooks,
    )


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client ``[C]`` tensor shaped to broadcast against ``like`` ``[C, ...]``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _schedule(jobs: list[Job], seed: int, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row offsets into the concatenated data, per step: sample rows ``[T, C, B]``, weights
    ``[T, C, B]`` (0 = padding) and active clients ``[T, C]``; the same batches as ``client_train``."""
    from fedsim.seeding import torch_gen

    T, C = max(j.total for j in jobs), len(jobs)
    rows = torch.zeros(T, C, bs, dtype=torch.long)
    weight = torch.zeros(T, C, bs)
    active = torch.zeros(T, C, dtype=torch.bool)
    offset = 0
    for c, j in enumerate(jobs):
        n = len(j.y)
        gen = torch_gen(seed, "batches", j.run.server_round, j.pid)
        rows[:, c, :] = offset if n else 0
        steps = list(batches(n, bs, j.total, gen))
        full = [len(i) == bs for i in steps]
        if all(full) and steps:  # the common case, in one copy
            rows[: len(steps), c] = torch.stack(steps) + offset
            weight[: len(steps), c] = 1.0
        else:
            for t, idx in enumerate(steps):
                rows[t, c, : len(idx)] = idx + offset
                weight[t, c, : len(idx)] = 1.0
        active[: len(steps), c] = True
        offset += n
    return rows, weight, active


def train_chunk(jobs: list[Job], cfg: dict[str, Any], rt: Any) -> list[RecordDict]:
    """Train ``jobs`` (one batch size, one batched form) at once; their reply contents."""
    model, dev = rt.model, rt.device
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keys = list(model.state_dict().keys())
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    C, bs = len(jobs), jobs[0].batch_size
    params = {n: torch.stack([j.global_sd[n] for j in jobs]).detach().clone() for n in names}
    others = {k: torch.stack([j.global_sd[k] for j in jobs]) for k in keys if k not in params}
    form = BATCHED_FORMS[type(jobs[0].algo)](jobs, names, dev)
    lr, mom, wd = (form.col([getattr(j, a) for j in jobs]) for a in ("lr", "momentum", "weight_decay"))
    persist = bool(cfg["client"].get("persist_optimizer"))
    bufs: Tensors = {}
    loaded = torch.zeros(C, dtype=torch.bool)
    if bool((mom != 0).any()) or persist:
        bufs = {n: torch.zeros_like(params[n]) for n in names}
        if persist:
            from fedsim.arrays import record_to_torch

            for c, j in enumerate(jobs):
                if "optimizer" in j.context.state.array_records:
                    saved = record_to_torch(j.context.state.array_records["optimizer"])
                    for n in names:
                        if str(index[n]) in saved:
                            bufs[n][c] = saved[str(index[n])].to(dev)
                            loaded[c] = True
    use_mom = mom != 0

    x_all = torch.cat([j.x for j in jobs] or [jobs[0].x]).to(dev)
    y_all = torch.cat([j.y for j in jobs] or [jobs[0].y]).to(dev)
    if len(y_all) == 0:
        x_all, y_all = torch.zeros(1, *jobs[0].x.shape[1:], dtype=jobs[0].x.dtype, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    rows, weight, active = _schedule(jobs, int(cfg["seed"]), bs)
    rows, weight = rows.to(dev), weight.to(dev)
    hooked = [c for c, j in enumerate(jobs) if j.data_hooks]
    any_wd = bool((wd != 0).any())

    def plain_loss(p: Tensors, o: Tensors, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """client_train's loss: mean cross-entropy over the client's real samples of the batch."""
        out = functional_call(model, {**p, **o}, (x,))
        if w is None:  # every sample of every client's batch is real: the plain mean
            return nn.functional.cross_entropy(out, y)
        per = nn.functional.cross_entropy(out, y, reduction="none")
        return (per * w).sum() / w.sum().clamp_min(1.0)

    def client_loss(p: Tensors, o: Tensors, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, aux: dict) -> torch.Tensor:
        return form.loss(p, aux, plain_loss(p, o, x, y, w))

    step_w, grad_w = vmap(grad_and_value(client_loss)), vmap(grad(plain_loss))
    step_1 = vmap(grad_and_value(lambda p, o, x, y, aux: client_loss(p, o, x, y, None, aux)))
    grad_1 = vmap(grad(lambda p, o, x, y: plain_loss(p, o, x, y, None)))

    def step_fn(p: Tensors, o: Tensors, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, aux: dict):  # noqa: ANN202
        return step_1(p, o, x, y, aux) if w is None else step_w(p, o, x, y, w, aux)

    def grad_fn(p: Tensors, o: Tensors, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> Tensors:
        return grad_1(p, o, x, y) if w is None else grad_w(p, o, x, y, w)

    full_batch = weight.flatten(1).all(1).tolist()  # steps where no client has padding

    lr_v, wd_v, mom_v = ({n: _view(v, params[n]) for n in names} for v in (lr, wd, mom))
    mom_on = {n: _view(use_mom, params[n]) for n in names}
    form.on_start()
    aux = form.aux()
    loss_sum = torch.zeros(C, device=dev)
    counted = torch.zeros(C, device=dev)
    taken = torch.zeros(C, dtype=torch.bool)
    for t in range(rows.shape[0]):
        xb, yb, w = x_all[rows[t]], y_all[rows[t]], (None if full_batch[t] else weight[t])
        act = active[t].clone()
        for c in hooked:  # data hooks: per client, before the step, in client_train's order
            if not act[c]:
                continue
            j, real = jobs[c], int(weight[t, c].sum())
            j.run.step = t
            xc, yc = xb[c, :real], yb[c, :real]
            for h in j.data_hooks:
                out = h.on_batch(j.run, xc, yc)
                if out is None:
                    act[c] = False
                    break
                xc, yc = out
            if act[c]:
                xb[c, :real], yb[c, :real] = xc, yc
        if not bool(act.any()):
            continue
        taken |= act
        act_d = act.to(dev)
        grads_of = lambda p, _x=xb, _y=yb, _w=w: grad_fn(p, others, _x, _y, _w)  # noqa: E731
        grads, loss = step_fn(params, others, xb, yb, w, aux)
        step = BatchedStep(params, others, xb, yb, w, act_d, grads_of)
        grads = form.on_grads(step, grads)
        full = bool(act.all())
        for n in names:
            p, d = params[n], grads[n]
            if any_wd:
                d = d + wd_v[n] * p
            if bufs:
                b = bufs[n]
                upd = mom_on[n] if full else _view(use_mom & act_d, p)
                bufs[n] = torch.where(upd, mom_v[n] * b + d, b)
                d = torch.where(mom_on[n], bufs[n], d)
            new = p - lr_v[n] * d
            params[n] = new if full else torch.where(_view(act_d, p), new, p)
        loss_sum += torch.where(act_d, loss.detach(), 0.0)
        counted += act_d
    mean_loss = (loss_sum / counted.clamp_min(1)).cpu()

    from fedsim.arrays import from_numpy, record_from_torch

    final = {k: (params[k] if k in params else others[k]).detach().cpu() for k in keys}
    final_np = {k: v.numpy() for k, v in final.items()}
    replies: list[RecordDict] = []
    for c, j in enumerate(jobs):
        if persist:
            has = bool(loaded[c]) or (bool(use_mom[c]) and bool(taken[c]))
            j.context.state["optimizer"] = record_from_torch(
                {str(index[n]): bufs[n][c].detach().cpu() for n in names} if has else {}
            )
        if j.attack is not None:
            g = {k: v.cpu() for k, v in j.global_sd.items()}
            local_sd = {k: final[k][c] for k in keys}
            delta = {k: local_sd[k] - g[k] for k in local_sd if local_sd[k].is_floating_point()}
            delta = j.attack.transform_update(delta, j.arng)
            local_sd = {k: (g[k] + delta[k] if k in delta else v) for k, v in local_sd.items()}
            arrays = record_from_torch(local_sd)
        else:
            arrays = ArrayRecord()
            for k in keys:
                arrays[k] = from_numpy(final_np[k][c])
        replies.append(
            RecordDict(
                {
                    "arrays": arrays,
                    "metrics": MetricRecord(
                        {"num-examples": int(len(j.y)), "train_loss": float(mean_loss[c]), "train_steps": int(counted[c])}
                    ),
                }
            )
        )
    form.on_end(replies)
    return replies


def train_batch(
    messages: list[Message], contexts: dict[int, Context], cfg: dict[str, Any], max_batch: int | None = None
) -> list[Message]:
    """Replies to ``messages`` (train Messages, one per node), trained as batches of clients.

    ``contexts`` maps destination node ids to Contexts, whose ``state`` is updated in place (and
    restored for a client whose call failed). Messages are grouped by batch size and batched
    form, in order, and each group is split into chunks of at most ``max_batch`` clients.
    A client whose preparation raises gets an error reply; an error inside a chunk's batched
    training fails that chunk's clients. A :class:`ConfigError` (an unsupported setting) is
    raised, before any training.
    """
    from fedsim.client import get_runtime
    from fedsim.engines.base import CLIENT_EXCEPTION, error_reply

    rt = get_runtime(cfg)
    replies: dict[str, Message] = {}
    saved = {m.metadata.message_id: dict(contexts[m.metadata.dst_node_id].state.items()) for m in messages}
    jobs: list[Job] = []
    cache: dict[int, Tensors] = {}
    for m in messages:
        try:
            jobs.append(_prepare(m, contexts[m.metadata.dst_node_id], cfg, rt, cache))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing client is reported, never fatal
            replies[m.metadata.message_id] = error_reply(m, CLIENT_EXCEPTION, exc)

    def key(j: Job) -> tuple[int, str]:
        return j.batch_size, type(j.algo).__qualname__

    groups: dict[tuple[int, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault(key(j), []).append(j)
    size = int(max_batch) if max_batch else None
    for group in groups.values():
        chunks = [group] if size is None else [group[i : i + size] for i in range(0, len(group), size)]
        for chunk in chunks:
            try:
                contents = train_chunk(chunk, cfg, rt)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001
                for j in chunk:
                    replies[j.msg.metadata.message_id] = error_reply(j.msg, CLIENT_EXCEPTION, exc)
                continue
            for j, content in zip(chunk, contents, strict=True):
                replies[j.msg.metadata.message_id] = Message(content, reply_to=j.msg)
    for m in messages:  # a failed client's state as it was (as on the other engines)
        reply = replies[m.metadata.message_id]
        if reply.has_error():
            state = contexts[m.metadata.dst_node_id].state
            before = saved[m.metadata.message_id]
            for k in [k for k in state if k not in before]:
                del state[k]
            for k, rec in before.items():
                state[k] = rec
    return [replies[m.metadata.message_id] for m in messages]
