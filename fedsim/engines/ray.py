"""The ``ray`` engine: ClientApp calls dispatched to a pool of Ray actors.

* **Pool.** Each actor reserves ``engine.client_resources`` (``num_cpus``, fractional
  ``num_gpus``: 0.1 = ten clients share a GPU). The pool holds as many actors as fit in the
  resources Ray reports, node by node (or ``engine.num_actors``), never more than there are
  clients. An actor builds the ClientApp once; the ClientApp caches data and the model object
  per process (:func:`fedsim.client.get_runtime`), so actors are warmed up before round 1.
  The data are loaded and partitioned once, on the driver, and handed to the actors through
  Ray's object store: workers (other machines included) need no data files.
* **Messages.** A large global model (>= 100 KiB), which every train message of a round
  carries, is put in Ray's object store once per round rather than with each message. Each actor
  keeps up to two calls queued, so it starts the next client while the driver handles a reply.
* **Context.** Every node's :class:`~flwr.app.Context` lives here, on the driver. It travels
  with each call and the actor sends the updated ``context.state`` back with the reply, so a
  client's memory survives whichever actor serves it next.
* **Failures.** A client that raises becomes an error reply (the round goes on; ``FedsimGrid``
  counts and logs it). A client running past ``engine.client_timeout`` becomes an error reply
  and its actor is killed and replaced; so is an actor that dies.
* **Cluster.** ``engine.address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``);
  otherwise a local Ray is started quietly (no dashboard, no worker log forwarding) and shut
  down at the end. ``engine.init_args`` are extra ``ray.init`` keyword arguments. A Ray that
  was already running is used as is and left running.
* **Threads.** Actors use the torch thread count the inline engine would use
  (``client.num_threads``, else the driver's), so all engines produce the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fedsim.config import ConfigError
from fedsim.engines.base import (
    CLIENT_EXCEPTION,
    CLIENT_TIMEOUT,
    LocalGrid,
    client_threads,
    error_reply,
    set_server_identity,
    warm_up,
)
from fedsim.server import run_server

log = logging.getLogger("fedsim")

ACTOR_DIED = 904
PIPELINE = 2  # calls queued per actor
SHARE_BYTES = 100 * 1024  # records this large go through the object store anyway (Ray's inline-argument limit)


class ClientActor:
    """One worker process: runs the ClientApp for whichever client it is handed."""

    def __init__(self, cfg: dict[str, Any], num_threads: int, data: Any = None) -> None:
        import torch

        from fedsim.client import make_client_app
        from fedsim.data import share_federated

        torch.set_num_threads(num_threads)
        if data is not None:  # the driver's data: no reloading, no re-partitioning, no data files needed here
            share_federated(cfg["dataset"], cfg["partition"], cfg["num_clients"], cfg["seed"], data)
        self.app = make_client_app(cfg)
        warm_up(cfg)  # data, model and torch's lazy imports now, not inside the first client's time

    def ready(self) -> int:
        return os.getpid()

    def run(
        self, msg: Message, context: Context, order: tuple[str, ...] = (), *shared: ArrayRecord
    ) -> tuple[Message, RecordDict | None]:
        """The reply and the client's updated state (``None`` when it raised).

        ``shared`` are the records the driver put in the object store once for all the round's
        messages (the global model); ``order`` is the content's key order, to restore it.
        """
        if shared:
            shared_keys = [k for k in order if k not in msg.content]
            records = dict(zip(shared_keys, shared, strict=True))
            msg.content = RecordDict({k: records[k] if k in records else msg.content[k] for k in order})
        try:
            reply = self.app(msg, context)
        except Exception as exc:  # reported to the server as an error reply
            return error_reply(msg, CLIENT_EXCEPTION, exc), None
        return reply, context.state


def record_bytes_of(rec: ArrayRecord) -> int:
    return sum(len(a.data) for a in rec.values())


def _quiet_ray() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")


#: environment of a local Ray that fedsim starts (set around ``ray.init``, inherited by its processes)
LOCAL_RAY_ENV = {
    # a driver killed with SIGKILL takes the GCS and raylet with it; the agents the raylet started
    # (DashboardAgent, RuntimeEnvAgent) then try to report to the dead GCS and linger until this
    # timeout (60 s by default) instead of exiting
    "RAY_gcs_rpc_server_reconnect_timeout_s": "5",
    # node IP = 127.0.0.1: every Ray server of the session listens on localhost only
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def start_ray(engine: dict[str, Any]) -> bool:
    """Connect to Ray as ``engine`` says; True when this call started (and so owns) it.

    A local Ray inherits this process's environment, so the driver's ``sys.path`` is exported
    as ``PYTHONPATH`` first: workers import whatever the driver can (test modules, a user's
    strategy file next to the script), without a runtime environment to build.

    A local Ray is private to this run: no dashboard, every server on 127.0.0.1, and all its
    processes (agents included) exit within seconds when the driver dies, even by SIGKILL
    (:data:`LOCAL_RAY_ENV`). ``engine.address=auto`` with no running cluster is a ConfigError.
    """
    _quiet_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    kwargs.update(engine.get("init_args") or {})
    address = engine.get("address") or kwargs.get("address")
    if address:
        kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as err:
            raise ConfigError(
                f"engine.address: no Ray cluster at '{address}' ({_last_line(err)}); start one with "
                "`ray start --head`, or leave engine.address unset to start a private local Ray"
            ) from None
        return True
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    extra = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([extra] if extra else []))
    kwargs.setdefault("_node_ip_address", "127.0.0.1")
    with _local_ray_env():
        ray.init(**kwargs)
    return True


@contextlib.contextmanager
def _local_ray_env() -> Iterator[None]:
    """:data:`LOCAL_RAY_ENV` for the processes ``ray.init`` starts, and for this process's view of
    the node IP (Ray reads that variable once, at import); both restored afterwards, so a later
    run that joins a cluster is unaffected. A variable the user set is left as it is."""
    from ray._private import ray_constants

    saved = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    cluster = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)  # Ray 2.55; absent: env only
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    if cluster is not None:
        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() not in ("0", "false")
    try:
        yield
    finally:
        if cluster is not None:
            ray_constants.ENABLE_RAY_CLUSTER = cluster
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def pool_size(resources: dict[str, float], num_actors: int | None, num_clients: int) -> int:
    """Actors that fit, node by node, in what Ray reports (or ``num_actors``), <= clients."""
    if num_actors:
        return max(1, min(int(num_actors), num_clients))
    cpus, gpus = float(resources.get("num_cpus", 1.0)), float(resources.get("num_gpus", 0.0))
    total = 0
    for node in ray.nodes():
        res = node.get("Resources") or {}
        if not node.get("Alive", True) or not res:
            continue
        fit = math.floor(res.get("CPU", 0.0) / cpus + 1e-9)
        if gpus > 0:
            fit = min(fit, math.floor(res.get("GPU", 0.0) / gpus + 1e-9))
        total += fit
    if total == 0:
        raise ConfigError(
            f"engine.client_resources: no Ray node can host a client needing {cpus} CPUs and {gpus} GPUs "
            f"(cluster: {ray.cluster_resources()})"
        )
    return min(total, num_clients)


class RayGrid(LocalGrid):
    """Delivers each Message to a free actor with that node's Context; see the module docstring."""

    actor_class: type = ClientActor  # the batched grid (fedsim.engines.ray_batched) uses a subclass

    def __init__(self, cfg: dict[str, Any], num_clients: int, data: Any = None) -> None:
        eng = cfg["engine"]
        self.data_ref = None if data is None else ray.put(data)  # one copy in the object store for all actors
        self.cfg = cfg
        self.client_timeout: float | None = eng.get("client_timeout")
        res = dict(eng.get("client_resources") or {})
        self.num_cpus = float(res.get("num_cpus", 1.0))
        self.num_gpus = float(res.get("num_gpus", 0.0))
        self.threads = client_threads(cfg)
        self.actor_cls = ray.remote(self.actor_class).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        super().__init__(num_clients)
        self.size = size = pool_size(res, eng.get("num_actors"), num_clients)
        actors = [self._new_actor() for _ in range(size)]
        try:
            pids = ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayError as err:
            for a in actors:
                ray.kill(a)
            raise RuntimeError(f"ray engine: a client actor failed to start: {err}") from None
        self.actors = actors
        self._starting: dict[Any, Any] = {}  # ready() ref -> replacement actor still starting up
        log.info("ray engine: %d actors (pids %s), %d torch threads each", size, pids, self.threads)

    def _new_actor(self):  # noqa: ANN202
        return self.actor_cls.remote(self.cfg, self.threads, self.data_ref)

    # -- dispatch ---------------------------------------------------------------------------
    @staticmethod
    def _share(messages: list[Message]) -> dict[int, Any]:
        """Put each large ArrayRecord that several messages carry (the global model) in the
        object store once, instead of serialising (and storing) it with every message. Small
        ones travel inline with each call, which is faster than fetching a shared object."""
        count: dict[int, int] = {}
        records: dict[int, ArrayRecord] = {}
        for m in messages:
            if m.has_content():
                for rec in m.content.array_records.values():
                    count[id(rec)] = count.get(id(rec), 0) + 1
                    records[id(rec)] = rec
        return {i: ray.put(records[i]) for i, n in count.items() if n > 1 and record_bytes_of(records[i]) >= SHARE_BYTES}

    @staticmethod
    def _strip(msg: Message, shared: dict[int, Any]) -> tuple[Message, tuple[str, ...], list[Any]]:
        """``msg`` without its shared records, its content's key order, and their refs."""
        if not shared or not msg.has_content():
            return msg, (), []
        content = msg.content
        keys = [k for k in content.keys() if k in content.array_records and id(content[k]) in shared]
        if not keys:
            return msg, (), []
        light = copy.copy(msg)  # same metadata (ids), lighter content
        light.content = RecordDict({k: v for k, v in content.items() if k not in keys})
        return light, tuple(content.keys()), [shared[id(content[k])] for k in keys]

    def _start_actor(self) -> None:
        actor = self._new_actor()
        self._starting[actor.ready.remote()] = actor

    def dispatch(self, messages: list[Message], timeout: float | None) -> dict[str, Message]:
        """Run ``messages`` on the pool; see the module docstring for failures and timeouts.

        Each actor has a lane of up to :data:`PIPELINE` calls (Ray runs an actor's calls in
        order), so it starts the next client while the driver is still handling the last reply.
        A call's clock starts when the call before it in its lane has finished.
        """
        queue = deque(messages)
        shared = self._share(messages)
        starting = self._starting
        for _ in range(self.size - len(self.actors) - len(starting)):  # replace actors lost last time
            self._start_actor()
        lanes: dict[Any, deque] = {a: deque() for a in self.actors}  # actor -> its calls, in order
        owner: dict[Any, tuple[Any, Message]] = {}  # call ref -> (actor, message)
        began: dict[Any, float] = {}  # running call ref -> when it started
        out: dict[str, Message] = {}
        round_deadline = None if timeout is None else time.monotonic() + timeout

        def submit(actor) -> None:  # noqa: ANN001
            msg = queue.popleft()
            light, order, refs = self._strip(msg, shared)
            ref = actor.run.remote(light, self.contexts[msg.metadata.dst_node_id], order, *refs)
            owner[ref] = (actor, msg)
            lanes[actor].append(ref)
            if len(lanes[actor]) == 1:
                began[ref] = time.monotonic()

        def done_with(actor, ref) -> None:  # noqa: ANN001
            lane = lanes[actor]
            lane.remove(ref)
            owner.pop(ref, None)
            began.pop(ref, None)
            if lane and lane[0] not in began:
                began[lane[0]] = time.monotonic()

        def fail(ref, code: int, reason: str) -> None:  # noqa: ANN001
            msg = owner[ref][1]
            out[msg.metadata.message_id] = error_reply(msg, code, reason)

        def drop(actor) -> None:  # noqa: ANN001
            """Kill ``actor`` (its running call has been answered); requeue the calls behind it."""
            ray.kill(actor, no_restart=True)
            self.actors.remove(actor)
            for ref in reversed(lanes.pop(actor)):
                began.pop(ref, None)
                _, msg = owner.pop(ref)
                if msg.metadata.message_id not in out:
                    queue.appendleft(msg)
            if queue or not (self.actors or starting):  # needed now; else at the next dispatch
                self._start_actor()

        while queue or owner:
            while queue:
                free = [a for a, lane in lanes.items() if len(lane) < PIPELINE]
                if not free:
                    break
                submit(min(free, key=lambda a: len(lanes[a])))
            pending = list(owner) + list(starting)
            if not pending:
                raise RuntimeError("ray engine: no client actor is left alive")
            now = time.monotonic()
            deadlines = [t0 + self.client_timeout for t0 in began.values()] if self.client_timeout else []
            if round_deadline is not None:
                deadlines.append(round_deadline)
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            done, rest = ray.wait(pending, num_returns=1, timeout=wait_s)
            if done and rest:  # collect everything else that has finished, without blocking
                done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            done.sort(key=lambda r: lanes[owner[r][0]].index(r) if r in owner else -1)  # lane order: blame right
            for ref in done:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as err:  # could not even start: give up on it
                        log.error("ray engine: a replacement actor failed to start: %s", err)
                        continue
                    self.actors.append(actor)
                    lanes[actor] = deque()
                    continue
                if ref not in owner:  # its actor was dropped earlier in this loop
                    continue
                actor, msg = owner[ref]
                try:
                    reply, state = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the running call is the one to blame
                    fail(lanes[actor][0], ACTOR_DIED, f"client actor died: {err}")
                    drop(actor)
                    continue
                except ray.exceptions.RayError as err:  # e.g. the reply could not be unpickled
                    fail(ref, CLIENT_EXCEPTION, f"{type(err).__name__}: {err}")
                    done_with(actor, ref)
                    continue
                if state is not None:
                    self.contexts[msg.metadata.dst_node_id].state = state
                out[msg.metadata.message_id] = reply
                done_with(actor, ref)
            now = time.monotonic()
            if self.client_timeout is not None:
                for ref, t0 in list(began.items()):
                    if ref in began and now - t0 >= self.client_timeout:
                        fail(ref, CLIENT_TIMEOUT, f"client ran past engine.client_timeout={self.client_timeout}s; actor replaced")
                        drop(owner[ref][0])
            if round_deadline is not None and now >= round_deadline:
                for ref in list(began):
                    if ref in began:
                        fail(ref, CLIENT_TIMEOUT, f"client ran past timeout={timeout}s; actor replaced")
                        drop(owner[ref][0])
                for msg in queue:
                    out[msg.metadata.message_id] = error_reply(msg, CLIENT_TIMEOUT, f"not started within timeout={timeout}s")
                queue.clear()
        return out  # replacements still starting join the pool in a later round

    def close(self) -> None:
        """Kill the actors (their resources go back to the cluster)."""
        for a in self.actors + list(self._starting.values()):
            ray.kill(a, no_restart=True)
        self.actors, self._starting = [], {}


def run(cfg: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Run ``cfg`` with clients on Ray actors; see the module docstring."""
    num_actors = cfg["engine"].get("num_actors")
    if num_actors is not None and int(num_actors) < 1:
        raise ConfigError(f"engine.num_actors: must be >= 1 or null (got {num_actors})")
    owned = start_ray(cfg["engine"])
    try:
        set_server_identity()
        from omegaconf import OmegaConf

        from fedsim.data import load_federated

        # loaded once, here (run_server finds it cached) and shared with every actor
        data = load_federated(OmegaConf.create(cfg["dataset"]), OmegaConf.create(cfg["partition"]), cfg["num_clients"], cfg["seed"])
        grid_cls = RayGrid
        if cfg["engine"].get("batched"):  # engine.batched=true: one batch of clients per actor
            from fedsim.engines.ray_batched import BatchedRayGrid as grid_cls
        grid = grid_cls(cfg, cfg["num_clients"], data)
        try:
            return run_server(grid, cfg, run_dir, engine="ray")
        finally:
            grid.close()
    finally:
        if owned:
            ray.shutdown()
