"""Issue 13 (input half) through the ``fedsim`` command, in subprocesses: one-line errors with
exit status 2, the README's custom-strategy example run from a user's directory, and a Ray
session that dies with a SIGKILLed driver. Docs: docs/failures_input.md.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _fedsim() -> str:
    exe = shutil.which("fedsim") or str(Path(sys.executable).with_name("fedsim"))
    if not Path(exe).exists():
        pytest.fail("the fedsim console script is not installed (pip install -e .)")
    return exe


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    return env


def test_data_error_is_one_line_with_exit_2(tmp_path):
    """npz without ``y``: used to be a traceback after the data loaded."""
    bad = tmp_path / "noy.npz"
    np.savez(bad, x=np.zeros((20, 4), np.float32))
    out = subprocess.run(
        [_fedsim(), "dataset=npz", f"dataset.path={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if "config error" in ln]
    assert len(errors) == 1 and f"dataset.path={bad}: has no array 'y'" in errors[0]


def _readme_example(root: Path) -> list[str]:
    """Write the README's ``mylab/fedfoo.py`` under ``root``; return its ``fedsim`` command line."""
    text = README.read_text()
    code = re.search(r"`mylab/fedfoo.py`:\n\n```python\n(.*?)```", text, re.S).group(1)
    command = re.search(r"```bash\n(fedsim strategy._target_=mylab\.fedfoo\.FedFoo[^\n]*)\n```", text).group(1)
    (root / "mylab").mkdir()
    (root / "mylab" / "fedfoo.py").write_text(code)
    return command.split()


def test_readme_custom_strategy_runs_from_the_users_directory(tmp_path):
    """``No module named 'mylab'`` before: a console script does not put the cwd on sys.path.
    The README's file and command verbatim; only the number of rounds is cut to keep it short."""
    cmd = _readme_example(tmp_path)
    assert cmd == ["fedsim", "strategy._target_=mylab.fedfoo.FedFoo", "+strategy.server_lr=0.5"]
    out = subprocess.run(
        [_fedsim(), *cmd[1:], "rounds=1", "client.num_threads=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(),
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "fedsim: FedFoo on digits" in text and "round 1/1" in text and "(failed 0)" in text


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (from /proc), with its command line."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out[c] = cmd.get(c, "")
                todo.append(c)
    return out


def _listen_addresses(pids) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets in LISTEN state
    that ``pids`` hold."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                out.add(f[1].rsplit(":", 1)[0])
    return out


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux) to find the session's processes")
def test_ray_session_dies_with_a_killed_driver(tmp_path):
    """``kill -9`` of an ``engine=ray`` driver left ``ray::DashboardAgent`` and
    ``ray::RuntimeEnvAgent`` alive (~60 s, ~200 MB); every Ray server listened on all interfaces.
    The run here is the README example on Ray, from the user's directory, so it also checks that
    Ray workers import ``./mylab``."""
    pytest.importorskip("ray")
    cmd = _readme_example(tmp_path)
    proc = subprocess.Popen(
        [_fedsim(), *cmd[1:], "engine=ray", "num_clients=2", "engine.num_actors=1", "rounds=500",
         "client.num_threads=1", "+engine.init_args.num_cpus=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    seen: list[str] = []
    session: dict[int, str] = {}
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("round 1/500" in ln for ln in seen):
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                if proc.poll() is not None:
                    break
        assert any("round 1/500" in ln and "(failed 0)" in ln for ln in seen), "".join(seen)
        session = _descendants(proc.pid)
        assert any("raylet" in c for c in session.values()), session
        agents = {p: c for p, c in session.items() if "Agent" in c}
        listening = _listen_addresses(session)
        assert listening and listening <= LOOPBACK, f"Ray listens beyond localhost: {listening}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and any(_alive(p) for p in session):
            time.sleep(0.5)
        left = {p: c.strip()[:60] for p, c in session.items() if _alive(p)}
        assert not left, f"left after {time.monotonic() - t0:.0f}s: {left}"
        assert time.monotonic() - t0 < 20  # seconds, not Ray's 60 s GCS timeout
        assert agents  # the processes the issue saw linger were there and are gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for p in session:  # only the processes this test's driver started
            if _alive(p):
                os.kill(p, signal.SIGKILL)
