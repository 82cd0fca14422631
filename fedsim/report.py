"""``fedsim-report DIR...``: tables and plots from run directories (never re-runs anything).

Finds every run under the given directories (one run, a ``-m`` sweep, or several), groups the
finished ones by configuration (the overrides that vary between runs, ``seed`` excluded) and
writes, into the first DIR (or ``--out``):

* ``report.csv`` and ``report.md``: one row per configuration with mean ± std over seeds of
  the final, best and last-k accuracy (mean of the last ``--last`` evaluated rounds) and, where
  the runs recorded them, of the final backdoor accuracy (``backdoor_accuracy``), detection F1
  (``det_f1``) and PSNR (``psnr``); ``n`` (the seeds averaged) and ``excluded`` (runs of that
  configuration that failed, diverged, or never finished: counted and listed, never averaged);
* ``curves.png``: ``--metric`` (default ``test_accuracy``) vs round per configuration, mean
  over seeds with a ±1 std band;
* ``heatmap.png``: mean final ``--metric`` over ``threat`` × ``strategy`` when both vary.

Std is the sample standard deviation (ddof = 1; 0 for a single seed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim.results import read_metrics, read_summary

EXTRA_METRICS = {"backdoor_accuracy": "backdoor", "det_f1": "det_f1", "psnr": "psnr"}
IGNORED_KEYS = {"seed"}


# --- finding and reading runs ------------------------------------------------------------------
def is_run_dir(d: Path) -> bool:
    """A fedsim run: it has metrics.jsonl or summary.json, or Hydra's .hydra/ for one job."""
    return (d / "metrics.jsonl").is_file() or (d / "summary.json").is_file() or (d / ".hydra" / "overrides.yaml").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory at or under ``paths`` (sorted, each once)."""
    found: dict[str, Path] = {}
    for root in paths:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"not a directory: {root}")
        for cur, dirs, _ in os.walk(root):
            d = Path(cur)
            dirs[:] = sorted(x for x in dirs if x not in (".hydra", "checkpoint", "tensorboard"))
            if is_run_dir(d):
                found[str(d.resolve())] = d
    return [found[k] for k in sorted(found)]


def run_outcome(run_dir: Path) -> str | None:
    """``None`` for a run whose numbers count (status ok), else why it does not."""
    s = read_summary(run_dir)
    if s is None:
        return "no summary.json (killed, still running, or failed before it started)"
    status = str(s.get("status", "ok"))
    return None if status == "ok" else status


def sweep_failed(run_dir: Path) -> bool:
    """For a sweep's exit status: a job that did not finish (diverged runs did finish)."""
    why = run_outcome(run_dir)
    return why is not None and not why.startswith("diverged")


def overrides_of(run_dir: Path) -> OrderedDict[str, str]:
    """The run's Hydra overrides ``{key: value}`` (``+``/``++`` stripped), in order."""
    out: OrderedDict[str, str] = OrderedDict()
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if path.is_file():
        for o in yaml.safe_load(path.read_text()) or []:
            k, _, v = str(o).partition("=")
            out[k.lstrip("+~")] = v
    return out


def config_value(run_dir: Path, key: str) -> Any:
    """A dotted key of the run's config.yaml (``None`` if absent)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    node: Any = yaml.safe_load(path.read_text())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def matches(run_dir: Path, where: list[str]) -> bool:
    """All ``k=v`` filters hold (override value first, else the config value)."""
    ov = overrides_of(run_dir)
    for w in where:
        k, _, v = w.partition("=")
        have = ov.get(k)
        if have is None:
            cv = config_value(run_dir, k)
            have = None if cv is None else (json.dumps(cv) if isinstance(cv, (dict, list)) else str(cv))
        if have is None or str(have).lower() != v.lower():
            return False
    return True


def run_metrics(run_dir: Path, metric: str, last: int) -> dict[str, Any]:
    """final / best / last-k of ``metric`` and the final extra metrics of one run, and its curve."""
    rows = read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []
    curve = [(int(r["round"]), float(r[metric])) for r in rows if r.get(metric) is not None]
    vals = [v for _, v in curve]
    out: dict[str, Any] = {
        "final": vals[-1] if vals else None,
        "best": max(vals) if vals else None,
        f"last{last}": float(np.mean(vals[-last:])) if vals else None,
        "curve": curve,
    }
    for key, name in EXTRA_METRICS.items():
        seen = [r[key] for r in rows if r.get(key) is not None]
        if seen:
            out[name] = float(seen[-1])
    return out


# --- aggregation ----------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def build(paths: list[Path], metric: str = "test_accuracy", last: int = 5, where: list[str] | None = None) -> dict[str, Any]:
    """The report's data: ``{"keys", "rows", "curves", "runs"}`` (see the module docstring)."""
    runs = [d for d in find_runs(paths) if matches(d, where or [])]
    if not runs:
        raise SystemExit(f"fedsim-report: no runs found under {', '.join(map(str, paths))}"
                         + (f" matching {' '.join(where or [])}" if where else ""))
    ovs = {d: overrides_of(d) for d in runs}
    all_keys: list[str] = []
    for ov in ovs.values():
        all_keys.extend(k for k in ov if k not in all_keys)
    keys = [
        k for k in all_keys
        if k not in IGNORED_KEYS and not k.startswith(("hydra.", "output."))
        and len({ov.get(k) for ov in ovs.values()}) > 1
    ]
    groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    for d in runs:
        label = tuple(ovs[d].get(k, "") for k in keys)
        g = groups.setdefault(label, {"ok": [], "excluded": []})
        why = run_outcome(d)
        if why is None:
            g["ok"].append((d, run_metrics(d, metric, last)))
        else:
            g["excluded"].append((d, why))
    stats = ["final", "best", f"last{last}"] + list(EXTRA_METRICS.values())
    rows, curves = [], {}
    for label, g in groups.items():
        row: dict[str, Any] = dict(zip(keys, label))
        for s in stats:
            xs = [m[s] for _, m in g["ok"] if m.get(s) is not None]
            if xs:
                row[f"{s}_mean"], row[f"{s}_std"] = mean_std(xs)
        row["n"] = len(g["ok"])
        row["excluded"] = len(g["excluded"])
        row["excluded_runs"] = "; ".join(f"{d.name}: {why}" for d, why in g["excluded"])
        rows.append(row)
        curves[label] = [m["curve"] for _, m in g["ok"]]
    return {"keys": keys, "rows": rows, "curves": curves, "stats": stats, "metric": metric, "runs": runs}


# --- outputs ----------------------------------------------------------------------------------------
def _present(rows: list[dict[str, Any]], stats: list[str]) -> list[str]:
    return [s for s in stats if any(f"{s}_mean" in r for r in rows)]


def to_csv(rep: dict[str, Any]) -> str:
    stats = _present(rep["rows"], rep["stats"])
    cols = rep["keys"] + [f"{s}_{m}" for s in stats for m in ("mean", "std")] + ["n", "excluded", "excluded_runs"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rep["rows"]:
        w.writerow(r)
    return buf.getvalue()


def to_markdown(rep: dict[str, Any]) -> str:
    stats = _present(rep["rows"], rep["stats"])
    head = rep["keys"] + [f"{s} ({rep['metric']})" if s in ("final", "best") or s.startswith("last") else s
                          for s in stats] + ["n", "excluded"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rep["rows"]:
        cells = [str(r.get(k, "")) for k in rep["keys"]]
        for s in stats:
            cells.append(f"{r[s + '_mean']:.4f} ± {r[s + '_std']:.4f}" if f"{s}_mean" in r else "-")
        cells += [str(r["n"]), str(r["excluded"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['excluded_runs']}" for r in rep["rows"] if r["excluded"]]
    if notes:
        lines += ["", "Excluded runs (not averaged):", *notes]
    return "\n".join(lines) + "\n"


def _label(keys: list[str], label: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, label)) or "all runs"


def plot_curves(rep: dict[str, Any], path: Path) -> None:
    """Mean ``metric`` vs round per configuration with a ±1 std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_curves(rep, ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_panels(reps: list[dict[str, Any]], path: Path, cols: int = 2) -> None:
    """One panel per metric (``--panels``), e.g. detection precision and recall per attack type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(reps) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
    for ax, rep in zip(axes.flat, reps):
        _draw_curves(rep, ax)
        ax.set_title(rep["metric"], fontsize=9)
    for ax in list(axes.flat)[len(reps):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw_curves(rep: dict[str, Any], ax: Any) -> None:
    for label, curves in rep["curves"].items():
        if not curves:
            continue
        rounds = sorted(set.intersection(*[{r for r, _ in c} for c in curves]))
        if not rounds:
            continue
        vals = np.array([[dict(c)[r] for r in rounds] for c in curves])
        mean, std = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(rounds))
        (line,) = ax.plot(rounds, mean, label=f"{_label(rep['keys'], label)} (n={len(vals)})")
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(rep["metric"])
    ax.grid(alpha=0.3)


def plot_heatmap(rep: dict[str, Any], path: Path) -> bool:
    """threat × strategy heatmap of the mean final metric (when both axes vary)."""
    keys = rep["keys"]
    if "threat" not in keys or "strategy" not in keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threats = sorted({r["threat"] for r in rep["rows"]})
    strategies = sorted({r["strategy"] for r in rep["rows"]})
    grid = np.full((len(threats), len(strategies)), np.nan)
    for r in rep["rows"]:
        if "final_mean" in r:
            i, j = threats.index(r["threat"]), strategies.index(r["strategy"])
            grid[i, j] = r["final_mean"] if np.isnan(grid[i, j]) else np.nanmean([grid[i, j], r["final_mean"]])
    fig, ax = plt.subplots(figsize=(1.2 * len(strategies) + 2, 0.8 * len(threats) + 1.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
    ax.set_yticks(range(len(threats)), threats)
    for i in range(len(threats)):
        for j in range(len(strategies)):
            if not math.isnan(grid[i, j]):
                bright = im.norm(grid[i, j]) > 0.5  # dark text on the light end of viridis
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="k" if bright else "w", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"final {rep['metric']}")
    ax.set_xlabel("strategy (defense)")
    ax.set_ylabel("threat (attack)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(rep: dict[str, Any], out: Path) -> list[Path]:
    """Write report.csv, report.md, curves.png (and heatmap.png) into ``out``."""
    from fedsim.results import write_text

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.csv", out / "report.md", out / "curves.png"]
    write_text(files[0], to_csv(rep))
    write_text(files[1], to_markdown(rep))
    plot_curves(rep, files[2])
    if plot_heatmap(rep, out / "heatmap.png"):
        files.append(out / "heatmap.png")
    return files


def _claims_and_grid(a: argparse.Namespace, p: argparse.ArgumentParser) -> str:
    """The ``--grid`` table and the ``--claim`` verdicts as Markdown ('' when neither is asked)."""
    from fedsim import claims as cl

    out = []
    try:
        if a.grid:
            row, sep, col = a.grid.partition(":")
            if not sep or not row or not col:
                p.error(f"--grid {a.grid}: expected ROW:COL")
            grid = cl.best_grid(a.dirs, row, col, a.metric, a.last, a.stat, a.where)
            out.append(cl.grid_markdown(grid, row, col))
        if a.claim:
            rows = cl.evaluate(a.dirs, [cl.parse_claim(c) for c in a.claim], a.metric, a.last, a.stat,
                               a.where, a.best_over)
            out.append(cl.claims_markdown(rows))
    except ValueError as err:
        p.error(str(err))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """``fedsim-report DIR... [--where k=v] [--metric NAME] [--last K] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="fedsim-report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose override (or config value) KEY equals VALUE; repeatable")
    p.add_argument("--metric", default="test_accuracy", help="per-round metric for final/best/last-k and plots")
    p.add_argument("--last", type=int, default=5, help="k of the last-k mean (evaluated rounds)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the first DIR)")
    p.add_argument("--claim", action="append", default=[], metavar="'A > B [by SIZE]'",
                   help="a paper's claim, checked seed by seed (fedsim/claims.py); repeatable")
    p.add_argument("--best-over", default=None, metavar="KEY",
                   help="compare each side of a claim at its own best value of KEY (e.g. client.lr)")
    p.add_argument("--grid", default=None, metavar="ROW:COL",
                   help="a ROW x COL table of the last-k mean (e.g. momentum_arm:client.lr)")
    p.add_argument("--panels", default=None, metavar="M1,M2,...",
                   help="also panels.png: one curves panel per metric (e.g. det_signflip_recall,det_noise_recall)")
    p.add_argument("--stat", default=None, help="final | best | lastK for claims and the grid (default: last-k)")
    a = p.parse_args(argv)
    for w in a.where:
        if "=" not in w:
            p.error(f"--where {w}: expected KEY=VALUE")
    if a.last < 1:
        p.error("--last: must be >= 1")
    try:
        rep = build(a.dirs, a.metric, a.last, a.where)
    except FileNotFoundError as err:
        p.error(str(err))
    files = write(rep, a.out or a.dirs[0])
    sys.stdout.write(to_markdown(rep))
    if a.panels:
        reps = [build(a.dirs, m, a.last, a.where) for m in a.panels.split(",") if m]
        plot_panels(reps, (a.out or a.dirs[0]) / "panels.png")
        files.append((a.out or a.dirs[0]) / "panels.png")
    extra = _claims_and_grid(a, p)
    if extra:
        from fedsim.results import write_text

        path = (a.out or a.dirs[0]) / "claims.md"
        write_text(path, extra)
        files.append(path)
        sys.stdout.write("\n" + extra)
    print(f"\n{len(rep['runs'])} runs; wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
