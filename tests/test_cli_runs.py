"""The ``fedsim`` command's behaviour on failures (issue 13 items 2, 4, 7, 10) and resume after a
SIGKILL (issue 12 item 3), in subprocesses where the behaviour is the CLI's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsim import cli
from fedsim.compose import compose_config
from fedsim.config import ConfigError
from fedsim.experiment import run_experiment
from fedsim.results import read_metrics

FAST = ["num_clients=4", "client.epochs=1", "client.num_threads=1", "dataset.max_samples=400"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def fedsim(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=ENV,
    )


def wait_rows(run_dir: Path, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        p = run_dir / "metrics.jsonl"
        if p.is_file() and p.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail("run did not reach round {n}")


def test_sweep_goes_on_after_a_bad_job_and_exit_counts_failures(tmp_path, monkeypatch, capsys):
    """``-m rounds=1,-1,2``: job 1's config error is reported, job 2 still runs; exit status 1."""
    monkeypatch.setattr(sys, "argv", ["fedsim", "-m", "rounds=1,-1,2", "name=lab/x", *FAST, f"hydra.sweep.dir={tmp_path}"])
    monkeypatch.setitem(cli._SWEEP, "failed", None)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    done = {d.name: json.loads((d / "summary.json").read_text())["status"] for d in tmp_path.iterdir() if d.is_dir()}
    bad = [k for k in done if "rounds=-1" in k]  # sub-directories named by the overrides
    assert len(done) == 3 and len(bad) == 1 and done[bad[0]].startswith("failed: ConfigError")
    assert all("name=lab%2Fx" in k for k in done)  # a "/" in a value does not nest directories
    assert all(v == "ok" for k, v in done.items() if k not in bad)
    good = [k for k in done if k.endswith("rounds=2")]
    assert len(read_metrics(tmp_path / good[0])) == 2  # job 2 ran after the failed job 1
    # relaunching the same sweep skips the finished jobs (a rerun would rewrite summary.json)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    after = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert after == before  # finished runs were not rewritten; the bad job failed again, before writing


def test_no_training_exits_3(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fedsim", "rounds=1", "participation.fraction=0.01",
                                      "participation.min_clients=0", *FAST, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 3
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "no client trained in rounds 1"


RESUME = ["strategy=scaffold", "rounds=24", "participation.fraction=0.5", "client.steps=20", "seed=3",
          "output.checkpoint_every=3"]


def _same_model(a: Path, b: Path) -> bool:
    x, y = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir)]


def test_ctrl_c_then_sigkill_then_resume_is_bitwise_equal_inline(tmp_path):
    """Ctrl-C prints one line and exits 130; SIGKILL leaves no summary; each time the run resumes
    from its last checkpoint. SCAFFOLD keeps state on both sides (server c, clients' c_i), and
    the twice-resumed run ends with the uninterrupted run's model and records, bit for bit."""
    ref = tmp_path / "ref"
    run_experiment(compose_config(FAST + RESUME), ref)
    run = tmp_path / "run"
    proc = fedsim(*FAST, *RESUME, f"hydra.run.dir={run}")
    wait_rows(run, 4, proc)  # round 4 is recorded after the round-3 checkpoint
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    lines = [x for x in out.splitlines() if "interrupted at round" in x]
    assert len(lines) == 1 and f"results so far in {run}" in lines[0]
    assert not (run / "summary.json").exists() and read_metrics(run)  # unfinished, work kept
    with pytest.raises(ConfigError, match="output.resume=true"):  # refused without output.resume
        run_experiment(compose_config(FAST + RESUME), run)
    proc = fedsim(*FAST, *RESUME, "output.resume=true", f"hydra.run.dir={run}")
    wait_rows(run, 10, proc)  # past the round-9 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "summary.json").exists()
    res = fedsim(*FAST, *RESUME, "output.resume=true", f"hydra.run.dir={run}")
    out, _ = res.communicate(timeout=120)
    assert res.returncode == 0, out
    assert "resuming after round" in out
    assert _same_model(ref, run)
    assert _rows(ref) == _rows(run)
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    assert not (run / "checkpoint").exists()


def test_joblib_sweep_2x2x2(tmp_path):
    """A 2 x 2 x 2 sweep through Hydra's joblib launcher (2 jobs at a time, one torch thread
    each) completes and is summarised by fedsim-report."""
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "strategy=fedavg,fedmedian",
            "threat=none,signflip", "seed=0,1", "rounds=2", "num_clients=5", "client.num_threads=1",
            "dataset.max_samples=300", f"hydra.sweep.dir={tmp_path}"]
    out, _ = fedsim(*args).communicate(timeout=300)
    assert "sweep: 8 jobs finished" in out, out
    from fedsim import report

    rep = report.build([tmp_path])
    assert rep["keys"] == ["strategy", "threat"] and [r["n"] for r in rep["rows"]] == [2, 2, 2, 2]


def test_disk_full_is_one_line_exit_1_and_no_summary(tmp_path, monkeypatch, caplog):
    """The final model does not fit: the CLI says which file and that the disk is full, exits 1,
    and writes no summary.json (which would mark the run complete)."""
    import errno

    real = torch.save

    def full(obj, f, *a, **k):
        if getattr(f, "name", "").endswith(f"model.pt.tmp-{os.getpid()}"):
            f.write(b"x" * 16000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(sys, "argv", ["fedsim", "rounds=1", *FAST, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "model.pt").exists()
    log = (tmp_path / "fedsim.log").read_text()
    assert f"output error: disk full while writing {tmp_path}/model.pt" in log


def test_error_mid_run_records_failed_status(tmp_path, monkeypatch):
    """An error in round 2 leaves round 1's records (jsonl and csv) and a summary that says why."""
    import fedsim.server as server

    calls = {"n": 0}
    real = server.evaluate_model

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the initial model, round 1, then round 2
            raise RuntimeError("evaluation exploded")
        return real(*a, **k)

    monkeypatch.setattr(server, "evaluate_model", boom)
    with pytest.raises(RuntimeError):
        run_experiment(compose_config(FAST + ["rounds=3"]), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed: RuntimeError: evaluation exploded" and summary["rounds"] == 1
    assert len(read_metrics(tmp_path)) == 1 and (tmp_path / "metrics.csv").read_text().count("\n") == 2
    assert not (tmp_path / ".fedsim.lock").exists()  # released
