"""Per-round records and run summaries in the run directory.

* ``metrics.jsonl``: one JSON object per round (accuracy, losses, participation, failures,
  bytes, seconds, plus whatever plug-ins add, e.g. detection scores);
* ``summary.json``: final/best accuracy, rounds, wall time, seed, versions;
* ``config.yaml``: the resolved config; ``model.pt``: the final global state_dict.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("fedsim")


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


class Recorder:
    """Appends round records and writes the summary. ``run_dir=None`` keeps them in memory."""

    def __init__(self, run_dir: Path | None, cfg: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.extra_summary: dict[str, Any] = {}
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").write_text("")
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def add(self, row: dict[str, Any]) -> None:
        """Record one round and print a progress line."""
        self.rows.append(row)
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
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

    def finish(self, final_state: dict[str, torch.Tensor] | None, engine: str) -> dict[str, Any]:
        """Write ``summary.json`` (and ``model.pt``); return the summary."""
        accs = [(r["round"], r["test_accuracy"]) for r in self.rows if r.get("test_accuracy") is not None]
        best = max(accs, key=lambda t: t[1]) if accs else (None, None)
        summary = {
            "name": self.cfg.get("name"),
            "final_accuracy": accs[-1][1] if accs else None,
            "best_accuracy": best[1],
            "best_round": best[0],
            "final_test_loss": next((r["test_loss"] for r in reversed(self.rows) if r.get("test_loss") is not None), None),
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
        if self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if final_state is not None and self.cfg.get("output", {}).get("save_model", True):
                torch.save(final_state, self.run_dir / "model.pt")
        return summary


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
