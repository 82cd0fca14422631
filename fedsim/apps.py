"""fedsim as a Flower App: ``flwr run .`` runs an experiment on Flower's own runtime.

``pyproject.toml`` names :data:`server_app` and :data:`client_app` as the app's components and
declares one run-config key, ``overrides``: Hydra overrides, space-separated, applied to
``configs/config.yaml`` on both sides (``flwr run . --run-config "overrides='rounds=5'"``).
Both apps compose the same config, validate it, and cache it per process.

The number of clients is the number of SuperNodes of the federation
(``--federation-config "num-supernodes=N"``; Flower's local default is 2): ``num_clients`` is set
from it, and a ``num_clients`` override that disagrees is a ConfigError. Results go to
``outputs/flwr/<timestamp>/`` under the ServerApp's working directory (``output-dir`` in the
run config changes the parent folder); the path is logged. See docs/engines.md.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ConfigError

log = logging.getLogger("fedsim")
warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")  # Ray's start-up tip

_CONFIGS: dict[tuple[str, int], dict[str, Any]] = {}
_CLIENT_APPS: dict[tuple[str, int], ClientApp] = {}


def overrides_of(run_config: dict[str, Any]) -> list[str]:
    """The Hydra overrides in a Flower run config (``overrides = "a=1 b=2"``)."""
    return shlex.split(str(run_config.get("overrides", "") or ""))


def app_config(run_config: dict[str, Any], num_nodes: int) -> dict[str, Any]:
    """The validated experiment config for a run with ``num_nodes`` SuperNodes (cached)."""
    key = (str(run_config.get("overrides", "") or ""), int(num_nodes))
    if key not in _CONFIGS:
        from fedsim.compose import compose_config
        from fedsim.experiment import prepare

        overrides = overrides_of(run_config)
        cfg = compose_config(overrides)
        explicit = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == "num_clients"]
        if explicit and int(cfg.num_clients) != num_nodes:
            raise ConfigError(
                f"num_clients: {cfg.num_clients} but the federation has {num_nodes} SuperNodes; "
                f"run with --federation-config \"num-supernodes={cfg.num_clients}\""
            )
        if not explicit and int(cfg.num_clients) != num_nodes:
            log.warning(
                "num_clients=%s in the config, but the federation has %d SuperNodes: running with %d clients "
                "(pass --federation-config \"num-supernodes=%s\" to keep the config's number)",
                cfg.num_clients, num_nodes, num_nodes, cfg.num_clients,
            )
        cfg.num_clients = int(num_nodes)
        cfg.engine.name = "flower"
        _CONFIGS[key] = prepare(cfg)
    return _CONFIGS[key]


def _client_app(context: Context) -> ClientApp:
    from fedsim.client import make_client_app

    n = int(context.node_config.get("num-partitions", 0))
    key = (str(context.run_config.get("overrides", "") or ""), n)
    if key not in _CLIENT_APPS:
        from fedsim.engines.base import client_threads

        cfg = app_config(context.run_config, n)  # a client worker: num_threads=auto is 1 (fedsim.threads)
        _CLIENT_APPS[key] = make_client_app({**cfg, "client": {**cfg["client"], "num_threads": client_threads(cfg)}})
    return _CLIENT_APPS[key]


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _client_app(context)(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _client_app(context)(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return _client_app(context)(msg, context)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from fedsim.experiment import quiet_flower
    from fedsim.server import run_server

    if not log.handlers and not logging.getLogger().handlers:  # the ServerApp process sets up no logging
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    quiet_flower()
    cfg = app_config(context.run_config, len(list(grid.get_node_ids())))
    parent = Path(str(context.run_config.get("output-dir", "") or "outputs/flwr"))
    run_dir = (parent / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")).resolve()  # unique: never shared
    log.info("fedsim (flwr run): %d clients, %d rounds; results in %s", cfg["num_clients"], cfg["rounds"], run_dir)
    summary = run_server(grid, cfg, run_dir, engine="flower")
    log.info("done: final accuracy %s; results in %s", summary["final_accuracy"], run_dir)
