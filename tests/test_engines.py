"""Engines: ray and flower end to end, parity with inline, failures, the `flwr run` apps.

One Ray is started for the module and shared: the ray engine and Flower's runtime both use a
running Ray as is and leave it running.
"""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsim.compose import compose_config
from fedsim.config import ConfigError
from fedsim.engines.base import CLIENT_TIMEOUT, set_server_identity
from fedsim.engines.inline import InlineGrid
from fedsim.experiment import run_experiment
from fedsim.results import read_metrics

ray = pytest.importorskip("ray")

# Sampled participation; client state (momentum buffers) that must follow each client whichever
# worker serves it; partition 1 raises, partition 2 sleeps past engine.client_timeout and
# partition 3 kills its ray actor in round 2 (raises elsewhere). Rounds: [0 1 5] [0 1 3] [2 3 5].
PARITY = [
    "num_clients=6", "participation.fraction=0.5", "client.momentum=0.9", "client.persist_optimizer=true",
    "strategy._target_=failing.FailingFedAvg", "+strategy.fail=[1]", "+strategy.sleep=[2]",
    "+strategy.crash=[3]", "+strategy.crash_round=2",
    "engine.client_timeout=5", "client.num_threads=1",
]
# ray pre-empts the sleeper, the others wait for it; one Flower actor is enough (and starts faster)
EXTRA = {"inline": ["+strategy.sleep_s=6"], "ray": ["+strategy.sleep_s=400"],
         "flower": ["+strategy.sleep_s=6", "engine.client_resources.num_cpus=2"]}


@pytest.fixture(scope="module")
def ray_session():
    from fedsim.engines.ray import start_ray

    owned = start_ray({"init_args": {"num_cpus": 2}})
    yield
    if owned:
        ray.shutdown()


def _comparable(rows):
    """Round records without wall times and with failure reasons reduced to partitions
    (Flower words a client's exception its own way)."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "seconds"}
        r["failures"] = [f["partition"] for f in r.get("failures", [])]
        out.append(r)
    return out


def test_parity_and_failures_inline_ray_flower(ray_session, run, monkeypatch):
    """Same config on the three engines: bitwise-equal final models, equal round records, and
    the injected failures recorded (the round goes on without them)."""
    monkeypatch.setattr("fedsim.engines.ray.SHARE_BYTES", 0)  # the global model via the object store, as large ones go
    results, took, threads = {}, {}, torch.get_num_threads()
    try:
        for e in ("inline", "ray", "flower"):
            t0 = time.monotonic()
            results[e] = run(*PARITY, f"engine.name={e}", *EXTRA[e], name=e)
            took[e] = time.monotonic() - t0
    finally:
        torch.set_num_threads(threads)  # the inline run set this process's count
    assert took["ray"] < 400  # the sleeper (400 s) was killed, not waited for (margin for a loaded box)
    ref_rows = _comparable(results["inline"][1])
    ref_model = torch.load(results["inline"][2] / "model.pt")
    failed = {1: "injected failure in partition 1", 2: "client_timeout", 3: "injected crash in partition 3"}
    for engine, (summary, rows, run_dir) in results.items():
        assert summary["engine"] == engine and ray.is_initialized()  # the shared Ray survives
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert _comparable(rows) == ref_rows, engine
        model = torch.load(run_dir / "model.pt")
        assert all(torch.equal(model[k], ref_model[k]) for k in ref_model), engine
        for r in rows:
            assert r["sampled"] == 3 and r["replied"] + r["failed"] == 3
            for f in r.get("failures", []):  # Flower's own error reason starts with a long Ray trace
                expected = failed[f["partition"]]
                if engine == "flower" and f["partition"] in (1, 3):
                    expected = "ClientAppException"
                if engine == "ray" and f["partition"] == 3:
                    expected = "client actor died"
                assert expected in f["reason"], (engine, f)
    assert [r["failures"] for r in _comparable(results["ray"][1])] == [[1], [1, 3], [2]]
    assert results["ray"][0]["final_accuracy"] > 0.3


def test_timed_client_app_replaces_late_replies():
    from fedsim.engines.flower import timed

    set_server_identity()
    inner = ClientApp()

    @inner.query()
    def query(msg: Message, context: Context) -> Message:
        time.sleep(float(msg.content.config_records["c"]["s"]))
        return Message(RecordDict(), reply_to=msg)

    from flwr.app import ConfigRecord, MessageType

    app, ctx = timed(inner, 0.2), Context(1, 7, {}, RecordDict(), {})
    for s, late in ((0.0, False), (0.4, True)):
        msg = Message(RecordDict({"c": ConfigRecord({"s": s})}), dst_node_id=7, message_type=MessageType.QUERY)
        reply = app(msg, ctx)
        assert reply.has_error() == late
        if late:
            assert reply.error.code == CLIENT_TIMEOUT
    assert timed(inner, None) is inner


def test_pool_size_follows_resources(monkeypatch):
    import fedsim.engines.ray as eng

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 2.0}}]
    monkeypatch.setattr(eng.ray, "nodes", lambda: nodes)
    assert eng.pool_size({"num_cpus": 1, "num_gpus": 0.0}, None, 100) == 18
    assert eng.pool_size({"num_cpus": 1, "num_gpus": 0.1}, None, 100) == 10  # ten clients per GPU
    assert eng.pool_size({"num_cpus": 4, "num_gpus": 0.0}, None, 100) == 4
    assert eng.pool_size({"num_cpus": 1, "num_gpus": 0.0}, None, 5) == 5  # never more than clients
    assert eng.pool_size({"num_cpus": 1, "num_gpus": 0.0}, 3, 100) == 3
    monkeypatch.setattr(eng.ray, "cluster_resources", lambda: {"CPU": 2.0})
    del nodes[0]  # no GPU left in the cluster
    with pytest.raises(ConfigError, match="engine.client_resources"):
        eng.pool_size({"num_cpus": 1, "num_gpus": 0.5}, None, 100)


def test_flwr_apps_run_the_configured_experiment(tmp_path):
    """`flwr run .`'s apps, driven in-process: overrides from the run config, clients = nodes."""
    from fedsim import apps

    set_server_identity()
    run_config = {"overrides": "rounds=2 client.epochs=1 seed=5", "output-dir": str(tmp_path)}
    grid = InlineGrid(apps.client_app, 3)
    for ctx in grid.contexts.values():
        ctx.run_config = dict(run_config)
    apps._main(grid, Context(1, 0, {}, RecordDict(), dict(run_config)))
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["replied"] == 3
    assert apps.app_config(run_config, 3)["seed"] == 5
    with pytest.raises(ConfigError, match="num_clients"):
        apps.app_config({"overrides": "num_clients=5"}, 3)


def test_resume_on_ray_is_bitwise_equal(ray_session, tmp_path, run_until_interrupted):
    """Checkpoint/resume on ray (issue 12): the engine keeps client contexts on the driver, so a
    run stopped after its round-2 checkpoint (KeyboardInterrupt in round 3) resumes on ray to
    the inline run's final model, bit for bit. (SIGKILL of a real process: tests/test_cli_runs.py.)"""
    ov = ["num_clients=4", "client.epochs=1", "client.num_threads=1", "dataset.max_samples=400", "strategy=scaffold",
          "rounds=5", "participation.fraction=0.5", "client.steps=5", "seed=4", "output.checkpoint_every=2"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    run_experiment(compose_config(ov), ref)
    run_until_interrupted(compose_config(ov + ["engine=ray"]), stopped)
    assert len(read_metrics(stopped)) == 3 and not (stopped / "summary.json").exists()
    summary = run_experiment(compose_config(ov + ["engine=ray", "output.resume=true"]), stopped)
    assert summary["engine"] == "ray" and summary["status"] == "ok"
    a, b = torch.load(ref / "model.pt", weights_only=True), torch.load(stopped / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(ref)) == strip(read_metrics(stopped))
