"""Experiment tracking and progress display (``output.tensorboard``, ``output.progress``).

* :class:`TensorBoard`: every numeric field of a round record becomes a scalar at step =
  round, in ``run_dir/tensorboard/`` (``tensorboard --logdir multirun/...`` compares runs). On
  resume, events at or after the resumed round are purged (``purge_step``) so curves do not
  double back.
* :class:`LiveBar`: a ``rich`` progress bar (round, accuracy, ETA) on a terminal. While it is
  shown, the one-line-per-round messages go to the log file only. ``output.progress=auto``
  (default) shows it when stderr is a terminal and the run is not part of a ``-m`` sweep;
  ``plain`` always prints lines; ``bar`` asks for the bar even when not on a terminal.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("fedsim")

#: Set by the CLI: False inside a ``-m`` sweep (several jobs would fight over one terminal).
INTERACTIVE = {"allowed": True}


class TensorBoard:
    """Per-round scalars as TensorBoard events (``torch.utils.tensorboard``)."""

    def __init__(self, run_dir: Path, start_round: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_round + 1 if start_round else None)

    def on_round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, val in row.items():
            if key == "round" or isinstance(val, bool) or not isinstance(val, (int, float)):
                continue
            if math.isfinite(val):
                self.writer.add_scalar(key, val, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _HideRoundLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("round %d/%d")


class LiveBar:
    """A ``rich`` progress bar with the round, the last accuracy and the ETA."""

    def __init__(self, rounds: int, start_round: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]fedsim[/bold] round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("acc {task.fields[acc]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task("rounds", total=rounds, completed=start_round, acc="-")
        self.filter = _HideRoundLines()
        self.handlers = [
            h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for h in self.handlers:
            h.addFilter(self.filter)
        self.progress.start()

    def on_round(self, row: dict[str, Any]) -> None:
        acc = row.get("test_accuracy")
        fields = {"acc": f"{acc:.4f}"} if acc is not None else {}
        self.progress.update(self.task, completed=int(row["round"]), **fields)

    def close(self) -> None:
        self.progress.stop()
        for h in self.handlers:
            h.removeFilter(self.filter)


def build(cfg: dict[str, Any], run_dir: Path | None, start_round: int = 0) -> list[Any]:
    """The trackers ``cfg["output"]`` asks for (each has ``on_round(row)`` and ``close()``)."""
    out = cfg.get("output", {})
    trackers: list[Any] = []
    if out.get("tensorboard") and run_dir is not None:
        trackers.append(TensorBoard(run_dir, start_round))
    mode = out.get("progress", "auto")
    if mode == "bar" or (mode == "auto" and INTERACTIVE["allowed"] and sys.stderr.isatty()):
        trackers.append(LiveBar(int(cfg["rounds"]), start_round))
    return trackers
