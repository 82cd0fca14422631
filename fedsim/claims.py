"""Paired, per-seed checks of a paper's claims over finished runs (``fedsim-report --claim``).

A reproduction is a list of claims such as "FedAU beats averaging over participants". Each is
written ``A > B`` where ``A`` and ``B`` are run filters (``key=value`` words, the same keys as
``--where``: a Hydra override or a dotted config key), optionally followed by ``by SIZE``, the
gap the paper reports (in the metric's units, e.g. ``by 0.03`` for 3 points of accuracy)::

    fedau_arm=fedau > fedau_arm=avg_participating by 0.03

Both sides are reduced to one number per seed (``stat``: ``final``, ``best`` or ``lastK``, the
mean of the last K evaluations) and compared **seed by seed** (seeds present on both sides).
The verdict, fixed here so that no table is written by hand:

* ``reproduced``: the gap is positive on every paired seed, its mean is at least twice its
  standard error (sample std / sqrt(n), so one seed, or a gap the seed-to-seed spread can
  explain, is never enough) and, when the paper's size is given, at least half of that size;
* ``reproduced in direction, not size``: a positive mean gap that misses one of those;
* ``not reproduced``: mean gap <= 0.

``A >= B within TOL`` states "A is comparable to or better than B" (a paper's "on par with"):
``reproduced`` when the gap is >= -TOL on every seed (two seeds at least), ``reproduced in
direction, not size`` when only its mean is, ``not reproduced`` when the mean gap is below -TOL.

With ``best_over=KEY`` (e.g. ``client.lr``) each side is first taken at its own best value of
KEY: the value with the highest mean ``stat`` over seeds among the values whose every run
finished (a step size that diverged on one seed is not eligible). That is how methods are
compared "each at its own best step size". Failed or diverged runs never enter a mean.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.report import config_value, find_runs, matches, overrides_of, run_metrics, run_outcome

VERDICTS = ("reproduced", "reproduced in direction, not size", "not reproduced")


@dataclass
class Claim:
    """``a > b`` (each a list of ``key=value`` filters), with the paper's gap ``size`` if known."""

    a: list[str]
    b: list[str]
    size: float | None
    text: str
    tol: float | None = None  # set for ``A >= B within TOL``


def parse_claim(text: str) -> Claim:
    """Parse ``"k=v [k=v ...] > k=v [...] [by SIZE]"`` or ``"... >= ... within TOL"``."""
    w = re.fullmatch(r"\s*(.+?)\s*>=\s*(.+?)\s+within\s+([-+0-9.eE]+)\s*", text)
    if w:
        c = parse_claim(f"{w.group(1)} > {w.group(2)}")
        tol = float(w.group(3))
        if tol < 0:
            raise ValueError(f"claim {text!r}: 'within TOL' must be >= 0")
        return Claim(c.a, c.b, None, text.strip(), tol)
    m = re.fullmatch(r"\s*(.+?)\s*>\s*(.+?)(?:\s+by\s+([-+0-9.eE]+))?\s*", text)
    if not m or ">=" in text:
        raise ValueError(f"claim {text!r}: expected 'key=value ... > key=value ... [by SIZE]' "
                         "or '... >= ... within TOL'")
    sides = []
    for part in (m.group(1), m.group(2)):
        words = [w for w in re.split(r"[\s,]+", part) if w]
        bad = [w for w in words if "=" not in w]
        if bad or not words:
            raise ValueError(f"claim {text!r}: each side is key=value words (got {part!r})")
        sides.append(words)
    size = float(m.group(3)) if m.group(3) else None
    if size is not None and size <= 0:
        raise ValueError(f"claim {text!r}: 'by SIZE' must be > 0")
    return Claim(sides[0], sides[1], size, text.strip())


def _value_of(run_dir: Path, key: str) -> str | None:
    v = overrides_of(run_dir).get(key)
    if v is None:
        cv = config_value(run_dir, key)
        v = None if cv is None else str(cv)
    return v


def _seed(run_dir: Path) -> str:
    return str(_value_of(run_dir, "seed"))


def _side(runs: list[Path], filt: list[str], stat: str, metric: str, last: int,
          best_over: str | None) -> tuple[dict[str, float], str | None, dict[str, Any]]:
    """``({seed: stat}, chosen value of best_over or None, {value: (mean, n, excluded)})``."""
    mine = [d for d in runs if matches(d, filt)]
    if not mine:
        raise ValueError(f"no runs match {' '.join(filt)}")
    by_value: dict[str | None, list[Path]] = defaultdict(list)
    for d in mine:
        by_value[_value_of(d, best_over) if best_over else None].append(d)
    grid: dict[str, Any] = {}
    best, best_mean = None, -np.inf
    per_value: dict[str | None, dict[str, float]] = {}
    for value, ds in by_value.items():
        vals: dict[str, float] = {}
        excluded = 0
        for d in ds:
            if run_outcome(d) is not None:
                excluded += 1
                continue
            s = run_metrics(d, metric, last).get(stat)
            if s is None:
                continue
            seed = _seed(d)
            if seed in vals:
                raise ValueError(f"{' '.join(filt)}: two runs with seed {seed} (add a filter to tell them apart)")
            vals[seed] = float(s)
        per_value[value] = vals
        mean = float(np.mean(list(vals.values()))) if vals else float("nan")
        grid[str(value)] = (mean, len(vals), excluded)
        if vals and excluded == 0 and mean > best_mean:
            best, best_mean = value, mean
    if best_over is None:
        return per_value[None], None, grid
    if best is None:
        raise ValueError(f"{' '.join(filt)}: no value of {best_over} finished on every seed")
    return per_value[best], best, grid


def verdict(diffs: list[float], size: float | None, tol: float | None = None) -> str:
    """The verdict rule of the module docstring for per-seed gaps ``diffs`` (A − B)."""
    mean = float(np.mean(diffs))
    if tol is not None:
        if mean < -tol:
            return VERDICTS[2]
        return VERDICTS[0] if len(diffs) > 1 and all(d >= -tol for d in diffs) else VERDICTS[1]
    if mean <= 0:
        return VERDICTS[2]
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("inf")
    if all(d > 0 for d in diffs) and mean >= 2 * se and (size is None or mean >= size / 2):
        return VERDICTS[0]
    return VERDICTS[1]


def evaluate(paths: list[Path], claims: list[Claim], metric: str = "test_accuracy", last: int = 5,
             stat: str | None = None, where: list[str] | None = None,
             best_over: str | None = None) -> list[dict[str, Any]]:
    """One row per claim: both sides' per-seed values, gaps, mean gap and verdict."""
    stat = stat or f"last{last}"
    runs = [d for d in find_runs(paths) if matches(d, where or [])]
    rows = []
    for c in claims:
        a, a_at, _ = _side(runs, c.a, stat, metric, last, best_over)
        b, b_at, _ = _side(runs, c.b, stat, metric, last, best_over)
        seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
        if not seeds:
            raise ValueError(f"claim {c.text!r}: no seed finished on both sides")
        diffs = [a[s] - b[s] for s in seeds]
        rows.append({
            "claim": c.text, "stat": stat, "seeds": seeds,
            "a_mean": float(np.mean([a[s] for s in seeds])), "b_mean": float(np.mean([b[s] for s in seeds])),
            "a_at": a_at, "b_at": b_at, "diffs": diffs, "mean_diff": float(np.mean(diffs)),
            "size": c.size, "tol": c.tol, "verdict": verdict(diffs, c.size, c.tol),
        })
    return rows


def best_grid(paths: list[Path], row_key: str, col_key: str, metric: str = "test_accuracy", last: int = 5,
              stat: str | None = None, where: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{row value: {col value: (mean stat, n ok, n excluded)}}`` over all runs (e.g. method × lr)."""
    stat = stat or f"last{last}"
    runs = [d for d in find_runs(paths) if matches(d, where or [])]
    out: dict[str, dict[str, Any]] = {}
    for r in sorted({str(_value_of(d, row_key)) for d in runs}):
        _, _, grid = _side(runs, [f"{row_key}={r}"], stat, metric, last, col_key)
        out[r] = grid
    return out


def claims_markdown(rows: list[dict[str, Any]], scale: float = 100.0) -> str:
    """The claims as a Markdown table (values × ``scale``: points of accuracy by default)."""
    lines = ["| claim | A | B | A − B per seed | mean A − B | paper's gap | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['claim']} | {r['a_mean'] * scale:.2f}{_at(r['a_at'])} | {r['b_mean'] * scale:.2f}{_at(r['b_at'])} | "
            + ", ".join(f"{d * scale:+.2f}" for d in r["diffs"])
            + f" | {r['mean_diff'] * scale:+.2f} | "
            + (f"{r['size'] * scale:.2f}" if r["size"] is not None
               else f"on par (±{r['tol'] * scale:.2f})" if r.get("tol") is not None else "-")
            + f" | **{r['verdict']}** |"
        )
    return "\n".join(lines) + f"\n\n({rows[0]['stat'] if rows else ''} of the metric; seeds paired; x{scale:g})\n"


def _at(v: str | None) -> str:
    return f" @ {v}" if v is not None else ""


def grid_markdown(grid: dict[str, dict[str, Any]], row_key: str, col_key: str, scale: float = 100.0) -> str:
    """The method × value table; the best eligible value per row in bold; ``div`` marks exclusions."""
    cols = sorted({c for g in grid.values() for c in g}, key=lambda v: (float(v) if _is_num(v) else 0, v))
    lines = [f"| {row_key} \\ {col_key} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r, g in grid.items():
        ok = {c: v for c, v in g.items() if v[1] and not v[2]}
        best = max(ok, key=lambda c: ok[c][0]) if ok else None
        cells = []
        for c in cols:
            if c not in g:
                cells.append("")
                continue
            mean, n, exc = g[c]
            txt = f"{mean * scale:.2f}" if n else "-"
            if exc:
                txt += f" ({exc} div/failed)"
            cells.append(f"**{txt}**" if c == best else txt)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_num(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
