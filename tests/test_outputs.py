"""Output correctness (issue 13 items 3, 5, 9, 10): atomic files, whole-line metrics, strict
JSON, run status and divergence, run-directory claims, checkpoint encoding."""

from __future__ import annotations

import errno
import json
import math
import os
from collections import deque

import numpy as np
import pytest
import torch
import yaml

from fedsim import results, rundir
from fedsim.checkpoint import decode, encode, offset_strategy, state_attrs
from fedsim.config import ConfigError
from fedsim.health import RunHealth, ranges
from fedsim.results import OutputError, Recorder, append_line, read_metrics, rows_to_csv, write_json


# --- atomic writes and a full disk -----------------------------------------------------------------
def test_enospc_leaves_old_file_and_names_disk(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"status": "ok", "x": 1})

    def full(fd):  # the data does not fit: the kernel reports it when flushing
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"disk full while writing .*summary\.json.*MiB free"):
        write_json(path, {"status": "ok", "x": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok", "x": 1}  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_model_save_enospc_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    real = torch.save

    def half(obj, f):  # writes some bytes, then the disk is full
        f.write(b"x" * 16000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half)
    with pytest.raises(OutputError, match="disk full"):
        results.save_torch(path, {"w": torch.ones(3)})
    monkeypatch.setattr(torch, "save", real)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_append_line_failure_cuts_back_and_reader_copes(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"round": 1}))
    real = os.write

    def short(fd, data):  # half the line gets in, then ENOSPC
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OutputError, match="disk full.*metrics.jsonl"):
        append_line(path, json.dumps({"round": 2, "test_accuracy": 0.5}))
    monkeypatch.setattr(os, "write", real)
    assert path.read_text() == '{"round": 1}\n'  # the torn half was cut away
    assert read_metrics(tmp_path) == [{"round": 1}]


def test_reader_skips_torn_last_line_but_not_a_bad_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "test_acc')
    assert read_metrics(tmp_path) == [{"round": 1}, {"round": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


def test_nonfinite_metrics_written_as_null(tmp_path):
    rec = Recorder(tmp_path, {"rounds": 2, "name": "t", "seed": 0})
    rec.add({"round": 1, "test_accuracy": 0.1, "test_loss": float("nan"), "train_loss": float("inf")})
    rec.add({"round": 2, "test_accuracy": float("nan"), "det": {"f1": float("-inf")}})
    summary = rec.finish(None, "inline")
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    rows = read_metrics(tmp_path)
    assert rows[0]["test_loss"] is None and rows[0]["train_loss"] is None and rows[1]["det"]["f1"] is None
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert summary["final_accuracy"] == 0.1  # a NaN evaluation is no accuracy
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].split(",")[:4] == ["round", "test_accuracy", "test_loss", "train_loss"]
    assert csv[1].split(",")[2:4] == ["", ""]


def test_csv_has_jsonl_columns_and_nested_values():
    text = rows_to_csv([{"round": 1, "a": 0.5}, {"round": 2, "a": 0.25, "failures": [{"partition": 3}]}])
    lines = text.splitlines()
    assert lines[0] == "round,a,failures"
    assert lines[1] == "1,0.5,"
    assert lines[2] == '2,0.25,"[{""partition"": 3}]"'


def test_summary_written_last(tmp_path, monkeypatch):
    order = []
    real = results.atomic_write
    monkeypatch.setattr(results, "atomic_write", lambda p, w: (order.append(p.name), real(p, w)))
    rec = Recorder(tmp_path, {"rounds": 1, "output": {"save_model": True}})
    rec.add({"round": 1, "test_accuracy": 0.5})
    rec.finish({"w": torch.zeros(2)}, "inline")
    assert order[-1] == "summary.json" and "model.pt" in order and "metrics.csv" in order


# --- status and divergence -------------------------------------------------------------------------
def _rows(losses, replied=2):
    return [{"round": i + 1, "train_loss": v, "replied": replied} for i, v in enumerate(losses)]


def test_health_ok_and_ranges():
    h = RunHealth(10.0)
    for r in _rows([2.3, 1.0, 0.1, 0.01, 0.2]):  # 0.2 is 20x the best, but below 10x round 1
        h.update(r)
    assert h.status() == "ok" and h.summary() == {"status": "ok"}
    assert ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"


def test_health_divergence_by_explosion_and_nonfinite():
    h = RunHealth(10.0)
    for r in _rows([0.5, 0.4, 4.9, 5.1, 31.0]):
        h.update(r)
    assert h.status() == "diverged at round 4"
    assert h.summary()["divergence"]["round"] == 4
    h = RunHealth(0.0)  # explosion check off, NaN still counts
    for r in _rows([0.5, 50.0, float("nan")]):
        h.update(r)
    assert h.status() == "diverged at round 3"
    h = RunHealth()
    h.update({"round": 1, "train_loss": 1.0, "test_loss": float("inf"), "replied": 1})
    assert h.status() == "diverged at round 1" and "test" in h.reason
    h = RunHealth()  # every reply NaN (dropped by the grid): the model stops, the loss says nothing
    h.update({"round": 1, "train_loss": 1.0, "replied": 4, "sampled": 4, "nonfinite": 0})
    h.update({"round": 2, "train_loss": None, "replied": 0, "sampled": 4, "nonfinite": 4})
    assert h.status() == "diverged at round 2" and "non-finite" in h.reason
    h = RunHealth()  # one NaN attacker among four is an attack, not divergence
    h.update({"round": 1, "train_loss": 1.0, "replied": 3, "sampled": 4, "nonfinite": 1})
    assert h.status() == "ok"


def test_health_reference_is_the_initial_loss():
    h = RunHealth(10.0)
    h.set_initial_loss(2.3)  # the untrained model
    h.update({"round": 1, "train_loss": 3e19, "replied": 3})  # exploded within round 1
    assert h.status() == "diverged at round 1"
    h = RunHealth(10.0)
    h.set_initial_loss(2.3)
    for r in _rows([0.5, 0.3, 4.0, 6.0]):  # the lower first train loss becomes the reference
        h.update(r)
    assert h.status() == "diverged at round 4" and h.ref_loss == 0.5


def test_run_diverging_in_round_one_is_flagged(run):
    summary, rows, run_dir = run("client.lr=20", "rounds=2")
    assert summary["status"] == "diverged at round 1", summary.get("divergence")
    assert summary["initial_test_loss"] > 0 and rows[0]["train_loss"] > 10 * summary["initial_test_loss"]


def test_health_no_training():
    h = RunHealth()
    for r in _rows([None, None, None], replied=0):
        h.update(r)
    assert h.status() == "no client trained in rounds 1-3"
    h = RunHealth()
    for r in _rows([1.0, None, 0.9], replied=1):
        h.update(r)
    h.untrained = [2]
    assert h.status() == "ok" and h.summary()["untrained_rounds"] == [2]


def test_run_without_training_records_status(run):
    summary, rows, run_dir = run("participation.fraction=0.01", "participation.min_clients=0", "rounds=2")
    assert summary["status"] == "no client trained in rounds 1-2"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == summary["status"]


# --- run directories -------------------------------------------------------------------------------
CFG = {"rounds": 3, "seed": 0, "output": {}}


def test_claim_fresh_skip_refuse_overwrite(tmp_path):
    assert rundir.claim(tmp_path, CFG) == ("fresh", None)
    assert (tmp_path / rundir.LOCK).read_text() == str(os.getpid())
    rundir.unlock(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CFG))
    (tmp_path / "metrics.jsonl").write_text("")
    # same config, finished: skipped
    write_json(tmp_path / "summary.json", {"status": "ok", "final_accuracy": 0.9})
    action, s = rundir.claim(tmp_path, {**CFG, "output": {"checkpoint_every": 2}})
    assert action == "skip" and s["final_accuracy"] == 0.9
    # another config's results: refused, naming the directory and hydra.run.dir
    with pytest.raises(ConfigError, match=f"{tmp_path}.*another run's results.*hydra.run.dir"):
        rundir.claim(tmp_path, {**CFG, "seed": 1})
    # overwrite: the old files go
    assert rundir.claim(tmp_path, {**CFG, "seed": 1, "output": {"overwrite": True}}) == ("fresh", None)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "metrics.jsonl").exists()
    rundir.unlock(tmp_path)


def test_claim_unfinished_and_live_lock(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CFG))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="output.resume=true"):
        rundir.claim(tmp_path, CFG)
    assert rundir.claim(tmp_path, {**CFG, "output": {"resume": True}}) == ("resume", None)
    rundir.unlock(tmp_path)
    (tmp_path / rundir.LOCK).write_text("1")  # pid 1 is alive: another process writes here
    with pytest.raises(ConfigError, match="in use by another fedsim process"):
        rundir.claim(tmp_path, {**CFG, "output": {"resume": True}})
    (tmp_path / rundir.LOCK).write_text("999999999")  # a dead process's lock is taken over
    assert rundir.claim(tmp_path, {**CFG, "output": {"resume": True}})[0] == "resume"
    rundir.unlock(tmp_path)


def test_second_run_into_same_dir_is_refused(run):
    run("rounds=1", name="same")
    with pytest.raises(ConfigError, match="another run's results"):
        run("rounds=2", name="same")
    summary, rows, _ = run("rounds=1", name="same")  # the same config: already finished, skipped
    assert len(rows) == 1 and summary["status"] == "ok"


# --- checkpoint encoding ---------------------------------------------------------------------------
class _Thing:
    def __init__(self):
        self.a = np.arange(6, dtype=np.int64).reshape(2, 3)
        self.b = {3: deque([np.float32(1.5) * np.ones(2, np.float32)], maxlen=3), "s": {1, 2}}
        self.c = (math.inf, None, "x", torch.tensor([1.0, 2.0]))


def test_encode_decode_roundtrip_is_exact(tmp_path):
    from flwr.app import ArrayRecord

    rec = ArrayRecord({"w": torch.randn(3, 2)})
    obj = {"thing": _Thing(), "rec": rec, "none": None, "list": [np.float64(0.1), 2]}
    torch.save(encode(obj), tmp_path / "x.pt")
    back = decode(torch.load(tmp_path / "x.pt", weights_only=True), {__name__})
    t = back["thing"]
    assert isinstance(t, _Thing) and t.a.dtype == np.int64 and (t.a == np.arange(6).reshape(2, 3)).all()
    assert t.b[3].maxlen == 3 and t.b[3][0].dtype == np.float32 and t.b["s"] == {1, 2}
    assert t.c[0] == math.inf and t.c[1] is None and torch.equal(t.c[3], torch.tensor([1.0, 2.0]))
    assert torch.equal(back["rec"].to_torch_state_dict()["w"], rec.to_torch_state_dict()["w"])
    assert back["list"][0] == 0.1 and isinstance(back["list"][0], np.float64)
    with pytest.raises(ValueError, match="outside the strategy's modules"):
        decode(torch.load(tmp_path / "x.pt", weights_only=True), {"strategies.fedau"})


def test_strategies_declare_their_state():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

    from strategies.fedau import FedAU
    from strategies.momentum import Scaffold

    assert state_attrs(FedAvg) == () and "momentum_vector" in state_attrs(FedAvgM)
    assert "m_t" in state_attrs(FedAdam) and "estimator" in state_attrs(FedAU) and "c" in state_attrs(Scaffold)

    class Mine(FedAU):  # a user's subclass may hold more state: it must say so
        pass

    with pytest.raises(ConfigError, match="checkpoint_attrs"):
        state_attrs(Mine)


def test_offset_strategy_shifts_rounds():
    seen = []

    class S:
        def configure_train(self, r, *a):
            seen.append(("train", r))
            return []

        def summary(self):
            pass

        def start(self, num_rounds, evaluate_fn):
            evaluate_fn(0, None)
            for r in range(1, num_rounds + 1):
                self.configure_train(r)
                evaluate_fn(r, None)

    offset_strategy(S(), 4).start(num_rounds=2, evaluate_fn=lambda r, a: seen.append(("eval", r)))
    assert seen == [("eval", 4), ("train", 5), ("eval", 5), ("train", 6), ("eval", 6)]


# --- tracking --------------------------------------------------------------------------------------
def test_tensorboard_scalars_and_progress_bar(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, rows, run_dir = run("rounds=2", "output.tensorboard=true", "output.progress=bar")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("test_accuracy")
    assert [e.step for e in events] == [1, 2]
    assert [e.value for e in events] == pytest.approx([r["test_accuracy"] for r in rows])
    assert "train_loss" in acc.Tags()["scalars"]


# --- checkpoint/resume across strategy families (in-process) ------------------------------------------
@pytest.mark.parametrize("strategy", [
    ["strategy=fedavgm"],  # Flower's server momentum (FedAdam/FedYogi: the same mechanism, m_t/v_t)
    ["strategy=fedau", "participation=bernoulli", "participation/probs=constant", "participation.probs.p=0.5"],
    ["strategy=mifa", "participation=markov", "participation/probs=constant", "participation.probs.p=0.5"],
    ["strategy=mudhog", "strategy.tau0=1", "threat=signflip", "num_clients=8"],  # sets, deques, dataclasses
    ["strategy=foolsgold", "client.persist_optimizer=true", "client.momentum=0.9"],  # client optimizer state
    ["strategy=multimetric", "threat=model_replacement", "num_clients=6"],
    ["strategy=gossip", "topology=ring", "strategy.merge=vca"],  # node models in context.state + the relay
])
def test_resume_is_bitwise_equal_for_every_state_kind(strategy, tmp_path, run_until_interrupted):
    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment

    ov = ["rounds=5", "num_clients=4", "client.steps=3", "dataset.max_samples=300", "seed=2",
          "output.checkpoint_every=2", *strategy]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    run_experiment(compose_config(ov), ref)
    run_until_interrupted(compose_config(ov), stopped)
    run_experiment(compose_config(ov + ["output.resume=true"]), stopped)
    a, b = torch.load(ref / "model.pt", weights_only=True), torch.load(stopped / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(ref)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(stopped)]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, stopped))
    for key in ("detection", "participation", "status", "initial_test_loss", "backdoor_accuracy", "backdoor_accuracy_max"):
        assert sa.get(key) == sb.get(key)
