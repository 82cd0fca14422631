"""The ``flower`` engine: Flower's own Simulation Runtime, the reference the others are checked against.

``flwr.simulation.run_simulation`` with the Ray backend runs a ServerApp whose ``main`` is
:func:`fedsim.server.run_server` and the ClientApp of :func:`fedsim.client.make_client_app`,
on ``num_clients`` virtual SuperNodes. The backend config comes from ``engine``:
``client_resources`` (``num_cpus``, fractional ``num_gpus``) size Flower's actor pool and
``init_args`` go to ``ray.init``. ``engine.num_actors`` does not apply (Flower sizes its pool
from the resources alone).

Differences from the ``ray`` engine, all Flower's: node ids are random (the harness maps them
to partitions by a query), a client that raises becomes Flower's own error reply, and a client
cannot be pre-empted, so one that runs past ``engine.client_timeout`` has its late reply
replaced by a timeout error (as on the inline engine) and the round outcome is the same.

Ray is started here, quietly, exactly as the ``ray`` engine starts it, and shut down at the
end only if this engine started it (Flower's runtime would otherwise shut down any Ray it
finds running).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.client import make_client_app
from fedsim.engines.base import CLIENT_TIMEOUT, client_threads, error_reply, warm_up
from fedsim.server import run_server

_WARM: set[int] = set()  # processes already warmed up


def timed(app: ClientApp, limit: float | None, cfg: dict[str, Any] | None = None) -> ClientApp:
    """``app`` whose calls that took longer than ``limit`` seconds become timeout errors.

    As on the other engines, a timed-out call leaves no trace: its ``context.state`` changes
    are undone. With ``cfg``, the process is warmed up (:func:`fedsim.engines.base.warm_up`)
    before its first timed call, so torch's lazy imports do not count against a client.
    """
    if limit is None:
        return app
    outer = ClientApp()

    def handler(msg: Message, context: Context) -> Message:
        if cfg is not None and os.getpid() not in _WARM:  # Flower ships the app with every call
            warm_up(cfg)
            _WARM.add(os.getpid())
        saved = context.state
        context.state = copy.deepcopy(saved)
        t0 = time.perf_counter()
        reply = app(msg, context)
        if time.perf_counter() - t0 > limit:
            context.state = saved
            return error_reply(msg, CLIENT_TIMEOUT, f"client ran past engine.client_timeout={limit}s")
        return reply

    outer.train()(handler)
    outer.evaluate()(handler)
    outer.query()(handler)
    return outer


def backend_config(engine: dict[str, Any]) -> dict[str, Any]:
    """Flower's ``backend_config`` from our ``engine`` section."""
    res = engine.get("client_resources") or {}
    return {
        "client_resources": {"num_cpus": float(res.get("num_cpus", 1.0)), "num_gpus": float(res.get("num_gpus", 0.0))},
        "init_args": dict(engine.get("init_args") or {}),
    }


class _DropDeprecation(logging.Filter):
    """Flower warns that ``run_simulation`` is deprecated in favour of ``flwr run``; fedsim
    offers both (``docs/engines.md``), so the warning is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("run_simulation" in msg and "deprecated" in msg) and "This is a deprecated feature" not in msg


@contextlib.contextmanager
def _keep_ray_running(keep: bool) -> Iterator[None]:
    """Stop Flower's Ray backend from shutting down a Ray it did not start (it kills only its actors)."""
    if not keep:
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original = RayBackend.terminate

    def terminate(self) -> None:  # noqa: ANN001
        if self.pool:
            self.pool.terminate_all_actors()

    RayBackend.terminate = terminate
    try:
        yield
    finally:
        RayBackend.terminate = original


def run(cfg: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Run ``cfg`` on Flower's Simulation Runtime; return the summary."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database, set up on import
    import ray
    from flwr.simulation import run_simulation

    from fedsim.engines.ray import start_ray
    from fedsim.experiment import quiet_flower

    cfg = {**cfg, "client": {**cfg["client"], "num_threads": client_threads(cfg)}}
    out: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        out["summary"] = run_server(grid, cfg, run_dir, engine="flower")

    client_app = timed(make_client_app(cfg), cfg["engine"].get("client_timeout"), cfg)
    quiet_flower()  # before importing FLOWER_LOGGER (its first import resets its level)
    from flwr.supercore.logger import FLOWER_LOGGER

    drop = _DropDeprecation()
    FLOWER_LOGGER.addFilter(drop)
    owned = start_ray(cfg["engine"])
    try:
        with _keep_ray_running(not owned):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=int(cfg["num_clients"]),
                backend_name="ray",
                backend_config=backend_config(cfg["engine"]),
            )
    finally:
        FLOWER_LOGGER.removeFilter(drop)
        if owned and ray.is_initialized():
            ray.shutdown()
    if "summary" not in out:
        raise RuntimeError("flower engine: the ServerApp ended without a result (see Flower's log above)")
    return out["summary"]
