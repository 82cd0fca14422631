"""The ClientApp: ``train``, ``evaluate`` and ``query`` handlers.

One ClientApp serves every engine. It needs the resolved experiment config, which reaches it
either from the engine (:func:`make_client_app`) or, under ``flwr run``, from the run config
(:data:`fedsim.apps.client_app`). Data and the model object are built once per worker process
and cached; everything a client must remember across rounds lives in ``context.state``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsim import threat
from fedsim.arrays import record_from_torch, record_to_torch
from fedsim.data import FederatedData, load_federated
from fedsim.local import LocalRun, get_local_algorithm, steps_for, train_loop
from fedsim.models import build_model
from fedsim.seeding import derive_seed, np_rng, torch_gen
from fedsim.threads import apply_threads, resolve_threads


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the GPU when one is visible (e.g. assigned by Ray), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ClientRuntime:
    """What a worker process builds once and reuses for every client it serves."""

    cfg: dict[str, Any]
    data: FederatedData
    model: nn.Module
    device: torch.device


_RUNTIMES: dict[str, ClientRuntime] = {}
_LAST_RUNTIME: dict[int, tuple[dict[str, Any], ClientRuntime]] = {}


def import_strategy_module(cfg: dict[str, Any]) -> None:
    """Import the strategy's module so the local algorithm it registers is known here."""
    target = str(cfg.get("strategy", {}).get("_target_", ""))
    if "." in target:
        importlib.import_module(target.rsplit(".", 1)[0])


def get_runtime(cfg: dict[str, Any]) -> ClientRuntime:
    """The cached runtime for ``cfg`` in this process (built on first use)."""
    last = _LAST_RUNTIME.get(id(cfg))
    if last is not None and last[0] is cfg:  # the same config object as the previous call
        return last[1]
    key = json.dumps(cfg, sort_keys=True, default=str)
    rt = _RUNTIMES.get(key)
    if rt is None:
        import_strategy_module(cfg)
        from omegaconf import OmegaConf

        dcfg, pcfg = OmegaConf.create(cfg["dataset"]), OmegaConf.create(cfg["partition"])
        data = load_federated(dcfg, pcfg, cfg["num_clients"], cfg["seed"])
        device = resolve_device(cfg.get("device", "auto"))
        model = build_model(cfg["model"], data.in_shape, data.num_classes, cfg["seed"]).to(device)
        apply_threads(resolve_threads(cfg["client"].get("num_threads"), model))  # "auto": see fedsim.threads
        rt = ClientRuntime(cfg, data, model, device)
        _RUNTIMES[key] = rt
    _LAST_RUNTIME.clear()
    _LAST_RUNTIME[id(cfg)] = (cfg, rt)  # holds cfg, so its id cannot be reused while cached
    return rt


def _param(config: ConfigRecord, key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for what this process has initialised: the CPU generator, and
    CUDA's once in use. (``torch.manual_seed`` also queues lazy seeding of uninitialised CUDA,
    XPU and MTIA devices, recording a stack trace each time: a millisecond per client call.)"""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def _load_global(model: nn.Module, arrays: ArrayRecord, device: torch.device) -> dict[str, torch.Tensor]:
    sd = record_to_torch(arrays)  # fresh tensors (copies of the message's bytes)
    model.load_state_dict(sd, strict=True)
    # the received tensors, not model.state_dict(): that would alias the live parameters, which
    # training then overwrites; cast like load_state_dict did, so the values are the loaded ones
    return {k: sd[k].to(device=v.device, dtype=v.dtype) for k, v in model.state_dict().items()}


def client_train(msg: Message, context: Context, cfg: dict[str, Any]) -> Message:
    """Local training: load the global model, run the local algorithm (+ attack), reply."""
    rt = get_runtime(cfg)
    pid = int(context.node_config["partition-id"])
    config: ConfigRecord = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(_param(config, "server-round", 0))
    seed = int(cfg["seed"])
    ccfg = cfg["client"]
    seed_torch(derive_seed(seed, "client-torch", server_round, pid))  # dropout etc.
    model, device = rt.model, rt.device
    global_sd = _load_global(model, msg.content.array_records["arrays"], device)
    x, y = rt.data.client(pid)
    attack = threat.client_attack(cfg.get("threat"), pid, cfg["num_clients"], seed, server_round)
    arng = np_rng(seed, "attack", server_round, pid) if attack is not None else None
    if attack is not None:
        x, y = attack.transform_data(x, y, arng)
    lr = float(_param(config, "lr", ccfg["lr"]))
    batch_size = int(_param(config, "batch-size", ccfg["batch_size"]))
    steps_cfg = _param(config, "local-steps", ccfg.get("steps"))
    epochs = int(_param(config, "local-epochs", ccfg["epochs"]))
    total = steps_for(len(y), batch_size, epochs, None if steps_cfg in (None, 0) else int(steps_cfg))
    opt = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=float(_param(config, "momentum", ccfg["momentum"])),
        weight_decay=float(_param(config, "weight-decay", ccfg["weight_decay"])),
    )
    if ccfg.get("persist_optimizer") and "optimizer" in context.state.array_records:
        bufs = record_to_torch(context.state.array_records["optimizer"])
        for i, p in enumerate(model.parameters()):
            if str(i) in bufs:
                opt.state[p]["momentum_buffer"] = bufs[str(i)].to(device)
    algo = get_local_algorithm(config)
    run = LocalRun(
        model=model,
        global_params=global_sd,
        content=msg.content,
        config=config,
        state=context.state,
        device=device,
        lr=lr,
        total_steps=total,
        partition_id=pid,
        server_round=server_round,
    )
    hooks = [algo] + (attack.hooks(arng) if attack is not None else [])
    loss = train_loop(run, x, y, hooks, opt, batch_size, torch_gen(seed, "batches", server_round, pid))
    if ccfg.get("persist_optimizer"):
        bufs = {
            str(i): opt.state[p]["momentum_buffer"].detach().cpu()
            for i, p in enumerate(model.parameters())
            if "momentum_buffer" in opt.state.get(p, {})
        }
        context.state["optimizer"] = record_from_torch(bufs)
    local_sd = {k: v.detach() for k, v in model.state_dict().items()}
    if attack is not None:
        delta = {k: local_sd[k] - global_sd[k] for k in local_sd if local_sd[k].is_floating_point()}
        delta = attack.transform_update(delta, arng)
        local_sd = {k: (global_sd[k] + delta[k] if k in delta else v) for k, v in local_sd.items()}
    reply = RecordDict(
        {
            "arrays": record_from_torch(local_sd),
            "metrics": MetricRecord(
                {"num-examples": int(len(y)), "train_loss": float(loss), "train_steps": int(run.steps_taken)}
            ),
        }
    )
    algo.on_end(run, reply)
    for h in hooks[1:]:
        h.on_end(run, reply)
    return Message(reply, reply_to=msg)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(y), 1)
    return loss / n, correct / n


def client_evaluate(msg: Message, context: Context, cfg: dict[str, Any]) -> Message:
    """Evaluate the received global model on this client's local data."""
    rt = get_runtime(cfg)
    pid = int(context.node_config["partition-id"])
    _load_global(rt.model, msg.content.array_records["arrays"], rt.device)
    x, y = rt.data.client(pid)
    loss, acc = evaluate_model(rt.model, x, y, rt.device)
    metrics = MetricRecord({"num-examples": int(len(y)), "eval_loss": loss, "eval_acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def client_query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (used to map node ids to partitions)."""
    info = ConfigRecord(
        {
            "partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config.get("num-partitions", -1)),
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


def build_mods(cfg: dict[str, Any]) -> list[Any]:
    """Flower mods from ``client.mods``: dotted paths of mod functions, or ``_target_`` nodes.

    They wrap the ``train`` handler only (privacy mods such as Flower's ``LocalDpMod`` expect a
    train message's single ArrayRecord; the query and evaluate messages pass untouched)."""
    from hydra.utils import get_method, instantiate

    return [get_method(m) if isinstance(m, str) else instantiate(m, _convert_="all") for m in cfg["client"].get("mods") or []]


def make_client_app(cfg: dict[str, Any]) -> ClientApp:
    """A ClientApp bound to a resolved config (a plain dict, so it pickles to Ray workers)."""
    app = ClientApp()

    @app.train(mods=build_mods(cfg))
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, cfg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, cfg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return client_query(msg, context)

    return app


def flatten(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate the floating-point entries of a state dict into one vector."""
    return torch.cat([v.reshape(-1).float() for v in sd.values() if v.is_floating_point()])


__all__ = [
    "make_client_app",
    "client_train",
    "client_evaluate",
    "evaluate_model",
    "get_runtime",
    "resolve_device",
    "flatten",
]
