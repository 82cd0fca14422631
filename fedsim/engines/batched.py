"""The ``batched`` engine: one process; each round's sampled clients trained at once.

It is a Grid like the others: the strategy's train Messages arrive through
``send_and_receive`` and one reply per client goes back, so every strategy, reply hook, threat
model, participation model and metric works unchanged. Train Messages go to
:func:`fedsim.batched.train_batch` (stacked parameters under ``torch.func.vmap``, chunks of at
most ``engine.max_batch`` clients, on ``device``: the GPU when there is one); any other
message (query, evaluate) goes to the ClientApp, one by one, as on the inline engine. Node
Contexts live in :class:`~fedsim.engines.base.LocalGrid`'s ``contexts`` dict, as on inline/ray.

Unsupported settings are refused before the first client trains, naming the setting and
suggesting ``engine=inline`` (see :mod:`fedsim.batched`); ``engine.client_timeout`` is refused
(clients of a batch cannot be timed, or pre-empted, one by one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType

from fedsim.client import get_runtime, make_client_app
from fedsim.config import ConfigError
from fedsim.engines.base import set_server_identity, warm_up
from fedsim.engines.inline import InlineGrid
from fedsim.server import run_server


def check_config(cfg: dict[str, Any]) -> None:
    """Refuse what the batched trainer cannot run (model, attacks, timeouts), naming the key."""
    from fedsim import threat
    from fedsim.batched import check_attack, check_model

    eng = cfg["engine"]
    if eng.get("client_timeout") is not None:
        raise ConfigError(
            "engine.client_timeout: not supported by the batched trainer (clients of a batch cannot be "
            "timed one by one); use engine=inline or engine=ray"
        )
    if cfg["client"].get("mods"):
        raise ConfigError(
            "client.mods: Flower mods wrap the ClientApp, which the batched trainer bypasses for "
            "training; use engine=inline or engine=ray"
        )
    max_batch = eng.get("max_batch")
    if max_batch is not None and int(max_batch) < 1:
        raise ConfigError(f"engine.max_batch: must be >= 1 or null (got {max_batch})")
    check_model(get_runtime(cfg).model)
    groups = (cfg.get("threat") or {}).get("groups") or []
    if groups:
        seen: set[str] = set()
        for pid, name in sorted(threat.assign(cfg["threat"], cfg["num_clients"], int(cfg["seed"])).items()):
            if name not in seen:
                seen.add(name)
                check_attack(threat.client_attack(cfg["threat"], pid, cfg["num_clients"], int(cfg["seed"])), f"threat group '{name}'")


class BatchedGrid(InlineGrid):
    """Train Messages trained together; other messages delivered one by one (inline)."""

    def __init__(self, cfg: dict[str, Any], num_clients: int) -> None:
        super().__init__(make_client_app(cfg), num_clients, None)
        self.cfg = cfg
        self.max_batch = cfg["engine"].get("max_batch")

    def dispatch(self, messages: list[Message], timeout: float | None) -> dict[str, Message]:  # noqa: D102
        from fedsim.batched import train_batch

        train = [m for m in messages if m.metadata.message_type.startswith(MessageType.TRAIN)]
        out = {m.metadata.message_id: self.deliver(m) for m in messages if not m.metadata.message_type.startswith(MessageType.TRAIN)}
        if train:
            for m, reply in zip(train, train_batch(train, self.contexts, self.cfg, self.max_batch), strict=True):
                out[m.metadata.message_id] = reply
        return out


def run(cfg: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Run ``cfg`` with every round's clients trained as a batch, in this process."""
    set_server_identity()
    check_config(cfg)
    warm_up(cfg)
    grid = BatchedGrid(cfg, cfg["num_clients"])
    return run_server(grid, cfg, run_dir, engine="batched")
