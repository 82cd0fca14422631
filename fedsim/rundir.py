"""Who may write into a run directory, and what to do with what is already there.

Decided before any data is loaded (:func:`claim`):

============================================  ===============================================
the directory holds                           fedsim
============================================  ===============================================
no results                                    runs (``fresh``)
a finished run of the same config             skips it, returns its summary (``skip``)
an unfinished run of the same config with a   resumes it with ``output.resume=true``
checkpoint                                    (``resume``); refuses otherwise
an unfinished or failed run of the same       starts it again (warning)
config without a checkpoint
another config's results                      refuses, naming the directory
anything, with ``output.overwrite=true``      deletes fedsim's result files, runs
a live fedsim process                         refuses (``.fedsim.lock`` holds its pid)
============================================  ===============================================

"The same config" compares the resolved configs without their ``output`` section.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import ConfigError
from fedsim.results import RESULT_FILES, read_summary

log = logging.getLogger("fedsim")

LOCK = ".fedsim.lock"
CHECKPOINT_DIR = "checkpoint"


class RunDirError(ConfigError):
    """The run directory cannot be used; the message names it and the way out."""


def _comparable(cfg: dict[str, Any]) -> Any:
    plain = yaml.safe_load(yaml.safe_dump({k: v for k, v in cfg.items() if k != "output"}))
    return plain


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from the ``output`` section."""
    return _comparable(a) == _comparable(b)


def finished(summary: dict[str, Any] | None) -> bool:
    """A summary that marks a finished run (any status but ``failed ...``)."""
    return summary is not None and "status" in summary and not str(summary["status"]).startswith("failed")


def _remove_results(run_dir: Path) -> None:
    for name in RESULT_FILES:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def lock(run_dir: Path) -> None:
    """Take ``run_dir/.fedsim.lock`` (O_EXCL); a lock of a dead process is taken over."""
    path = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise RunDirError(
                    f"run directory {run_dir} is in use by another fedsim process (pid {pid}); "
                    f"choose another one with hydra.run.dir=... (or hydra.sweep.dir=... for -m)"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return


def unlock(run_dir: Path | None) -> None:
    """Release the lock taken by :func:`lock` (if this process holds it)."""
    if run_dir is None:
        return
    path = Path(run_dir) / LOCK
    try:
        if int(path.read_text().strip() or 0) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run_dir: Path | None, cfg: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Decide ``("fresh" | "resume" | "skip", summary-if-skip)`` for ``run_dir`` (see module doc).

    Takes the directory's lock for ``fresh`` and ``resume``; the caller releases it with
    :func:`unlock` when the run ends.
    """
    if run_dir is None:
        return "fresh", None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = cfg.get("output", {})
    existing = [n for n in RESULT_FILES if (run_dir / n).exists()]
    where = "hydra.run.dir=... (or hydra.sweep.dir=... for -m)"
    if existing and out.get("overwrite"):
        lock(run_dir)
        log.warning("output.overwrite=true: removing the previous results in %s", run_dir)
        _remove_results(run_dir)
        return "fresh", None
    if not existing:
        lock(run_dir)
        return "fresh", None
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        old = None
    if not isinstance(old, dict) or not same_config(old, cfg):
        raise RunDirError(
            f"run directory {run_dir} already holds another run's results ({', '.join(existing)}); "
            f"choose another one with {where}, or pass output.overwrite=true to replace them"
        )
    summary = read_summary(run_dir)
    if finished(summary):
        log.info("already finished (status %s): %s; output.overwrite=true reruns it", summary["status"], run_dir)
        return "skip", summary
    has_ckpt = (run_dir / CHECKPOINT_DIR / "state.json").is_file()
    if has_ckpt and not out.get("resume"):
        raise RunDirError(
            f"run directory {run_dir} holds an unfinished run of this config with a checkpoint; "
            f"pass output.resume=true to continue it or output.overwrite=true to start again"
        )
    lock(run_dir)
    if has_ckpt:
        return "resume", None
    log.warning("%s holds an unfinished run of this config without a checkpoint: starting again from round 1", run_dir)
    _remove_results(run_dir)
    return "fresh", None
