"""Per-round records and run summaries in the run directory.

* ``metrics.jsonl``: one JSON object per round (accuracy, losses, participation, failures,
  bytes, seconds, plus whatever plug-ins add, e.g. detection scores); ``metrics.csv``: the
  same rows as a table, written at the end;
* ``summary.json``: final/best accuracy, rounds, wall time, seed, versions and ``status``;
* ``config.yaml``: the resolved config; ``model.pt``: the final global state_dict.

What a user can rely on (docs/failures.md):

* every file except ``metrics.jsonl`` is written whole or not at all (temporary name, fsync,
  ``os.replace``); ``summary.json`` is written last, so its presence marks a finished run;
* ``metrics.jsonl`` grows by whole lines (one ``write`` per line; a failed write is cut back),
  and :func:`read_metrics` skips (with a warning) a torn last line left by a killed process;
* non-finite numbers are written as ``null`` (strict JSON);
* a full disk raises :class:`OutputError` naming the file and the free space.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("fedsim")

#: Where a run stands, for the one-line Ctrl-C message (the CLI reads it).
PROGRESS: dict[str, Any] = {"round": 0, "run_dir": None}

#: Files a run writes (``output.overwrite=true`` removes exactly these).
RESULT_FILES = (
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "config.yaml",
    "model.pt",
    "participation.json",
    "checkpoint",
    "tensorboard",
)


class OutputError(RuntimeError):
    """Writing a result file failed (disk full, permissions); the message names the file."""


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- strict JSON ------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (NaN is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (``allow_nan=False``) of ``json_safe(obj)``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


# --- atomic writes -----------------------------------------------------------------------------
def _output_error(path: Path, err: OSError) -> OutputError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free
            where = f"; {free / 2**20:.1f} MiB free on the disk holding {path.parent}"
        except OSError:
            where = ""
        return OutputError(f"disk full while writing {path}{where}")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` into ``path.tmp-PID``, fsync, rename.

    On any error the temporary file is removed and the old ``path`` (if any) is untouched; an
    ``OSError`` becomes an :class:`OutputError` naming the file (and the free space when the
    disk is full).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _output_error(path, err) from err


def write_text(path: Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """Atomic strict-JSON write (non-finite numbers become null)."""
    write_text(path, dumps(obj, indent=2))


def save_torch(path: Path, obj: Any) -> None:
    """Atomic ``torch.save`` (tensors and plain containers only; load with weights_only=True)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def append_line(path: Path, line: str) -> None:
    """Append one whole line with a single ``write``; on failure cut the file back.

    A reader never sees half a line written by a live process: the bytes go in one ``write``
    on an ``O_APPEND`` descriptor, and a short or failed write is truncated away before the
    error is raised.
    """
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise _output_error(Path(path), err) from err
    finally:
        os.close(fd)


# --- reading ------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``.

    A torn last line (a process killed mid-write by another tool, a copy cut short) is skipped
    with a warning; a bad line elsewhere raises ``ValueError`` naming the file and line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: the last write never finished
                log.warning("%s: ignoring a torn last line (%d bytes)", path, len(line))
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({err.msg})") from None
    return rows


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``summary.json``, or ``None`` when absent or unreadable (an unfinished run)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """``metrics.jsonl``'s rows as CSV: the union of keys in first-seen order; nested values
    (failures, per-group scores) as JSON; missing and non-finite values empty."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        out = []
        for c in cols:
            v = json_safe(r.get(c))
            out.append("" if v is None else dumps(v) if isinstance(v, (dict, list)) else v)
        w.writerow(out)
    return buf.getvalue()


class Recorder:
    """Appends round records and writes the summary. ``run_dir=None`` keeps them in memory.

    ``rows`` (when resuming) are the rounds already done: ``metrics.jsonl`` is rewritten to
    exactly those, dropping rounds recorded after the checkpoint was taken.
    """

    def __init__(self, run_dir: Path | None, cfg: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.t0 = time.time()
        self.extra_summary: dict[str, Any] = {}
        self.round_callbacks: list[Callable[[dict[str, Any]], None]] = []
        PROGRESS.update(round=self.rows[-1]["round"] if self.rows else 0, run_dir=self.run_dir)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "metrics.jsonl", "".join(dumps(r) + "\n" for r in self.rows))
            write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    def add(self, row: dict[str, Any]) -> None:
        """Record one round and print a progress line."""
        row = json_safe(row)
        self.rows.append(row)
        if self.run_dir is not None:
            append_line(self.run_dir / "metrics.jsonl", dumps(row))
        PROGRESS["round"] = row["round"]
        for cb in self.round_callbacks:
            cb(row)
        acc = row.get("test_accuracy")
        log.info(
            "round %d/%d  acc=%s  test_loss=%s  train_loss=%s  clients=%d/%d (failed %d)  %.2fs",
            row["round"],
            self.cfg["rounds"],
            "-" if acc is None else f"{acc:.4f}",
            "-" if row.get("test_loss") is None else f"{row['test_loss']:.4f}",
            "-" if row.get("train_loss") is None else f"{row['train_loss']:.4f}",
            row.get("replied", 0),
            row.get("sampled", 0),
            row.get("failed", 0),
            row.get("seconds", 0.0),
        )

    def summary(self, engine: str) -> dict[str, Any]:
        """The summary of the rounds recorded so far."""
        accs = [(r["round"], r["test_accuracy"]) for r in self.rows if r.get("test_accuracy") is not None]
        best = max(accs, key=lambda t: t[1]) if accs else (None, None)
        return json_safe(
            {
                "name": self.cfg.get("name"),
                "status": "ok",
                "final_accuracy": accs[-1][1] if accs else None,
                "best_accuracy": best[1],
                "best_round": best[0],
                "final_test_loss": next(
                    (r["test_loss"] for r in reversed(self.rows) if r.get("test_loss") is not None), None
                ),
                "rounds": len(self.rows),
                "failed_replies": sum(r.get("failed", 0) for r in self.rows),
                "bytes_down": sum(r.get("bytes_down", 0) for r in self.rows),
                "bytes_up": sum(r.get("bytes_up", 0) for r in self.rows),
                "wall_time": time.time() - self.t0,
                "seed": self.cfg.get("seed"),
                "engine": engine,
                "versions": {p: version(p) for p in ("fedsim", "flwr", "torch", "ray")},
                **self.extra_summary,
            }
        )

    def write_tables(self) -> None:
        """``metrics.csv`` from the rows recorded so far (atomic)."""
        if self.run_dir is not None:
            write_text(self.run_dir / "metrics.csv", rows_to_csv(self.rows))

    def finish(self, final_state: dict[str, torch.Tensor] | None, engine: str) -> dict[str, Any]:
        """Write ``model.pt``, ``metrics.csv`` and, last, ``summary.json``; return the summary."""
        summary = self.summary(engine)
        if self.run_dir is not None:
            if final_state is not None and self.cfg.get("output", {}).get("save_model", True):
                save_torch(self.run_dir / "model.pt", final_state)
            self.write_tables()
            write_json(self.run_dir / "summary.json", summary)  # last: marks a complete run
        return summary

    def fail(self, err: BaseException, engine: str) -> None:
        """Best effort after an error ended the run: tables and a summary whose status says why."""
        if self.run_dir is None:
            return
        summary = self.summary(engine)
        summary["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        try:
            self.write_tables()
            write_json(self.run_dir / "summary.json", summary)
        except OutputError as second:
            log.error("%s", second)
