"""SCAFFOLD's stability on MNIST-10k with strong label skew and partial participation (issue 13,
item 15).

The reported case: ``fedsim strategy=scaffold dataset=mnist10k partition=label_dirichlet
partition.alpha=0.1 num_clients=50 participation.fraction=0.2 rounds=60 client.num_threads=1``
(defaults otherwise: 2 local epochs, batch 32, client.lr = 0.1, MLP 784-64-64-10). This script
runs that case and its neighbours, one run at a time in this process (inline engine, one torch
thread), and records per round the mean client training loss and the test accuracy:

* ``rule``: ``paper`` (fedsim's server step now: x + eta_g * mean Delta_i) or ``fednova`` (the
  step fedsim used before the fix with unequal K_i: x + eta_g * sum_i w_i (Kbar / K_i) Delta_i,
  reproduced here by patching ``strategies.momentum.momentum_estimate``);
* ``strategy`` (scaffold / fedavg), ``client.lr`` and ``strategy.global_lr`` (eta_g);
* optionally ``client.steps`` (a common K) instead of ``client.epochs``, or full participation.

Per round it also records ||c|| (the server control variate, SCAFFOLD only) and the number of
replies dropped as non-finite.

Writes ``docs/scaffold_stability.json`` (one entry per case, with every round's numbers) and
prints a table. Needs ``../shared/data/mnist10k.npz``.

    nice -n 10 python scripts/scaffold_stability.py                  # all cases (see CASES)
    nice -n 10 python scripts/scaffold_stability.py --only scaffold-lr0.1-paper
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(
    os.environ.get("FEDSIM_MNIST10K")
    or next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.exists()), ROOT.parent / "shared")
    / "data"
    / "mnist10k.npz"
)
OUT = ROOT / "docs" / "scaffold_stability.json"

BASE = [
    "dataset=mnist10k",
    f"dataset.path={DATA}",
    "partition=label_dirichlet",
    "partition.alpha=0.1",
    "num_clients=50",
    "participation.fraction=0.2",
    "rounds=60",
    "client.num_threads=1",
]


def case(strategy: str, lr: float, eta_g: float = 1.0, rule: str = "paper", extra: tuple[str, ...] = ()) -> dict:
    name = f"{strategy}-lr{lr}" + (f"-etag{eta_g}" if eta_g != 1.0 else "") + f"-{rule}"
    name += "".join(f"-{e.split('.', 1)[-1]}" for e in extra)
    ov = [f"strategy={strategy}", f"client.lr={lr}", *extra]
    if strategy == "scaffold":
        ov.append(f"strategy.global_lr={eta_g}")
    return {"name": name, "strategy": strategy, "lr": lr, "eta_g": eta_g, "rule": rule, "overrides": ov}


CASES = [
    case("fedavg", 0.1),
    case("scaffold", 0.1, rule="fednova"),
    case("scaffold", 0.1),
    case("scaffold", 0.05),
    case("scaffold", 0.01),
    case("fedavg", 0.01),
    case("scaffold", 0.1, eta_g=0.5),
    case("scaffold", 0.05, rule="fednova"),
    case("scaffold", 0.1, extra=("client.steps=10",)),
    case("scaffold", 0.1, extra=("participation.fraction=1.0",)),
    case("fedavg", 0.1, extra=("participation.fraction=1.0",)),
    case("scaffold", 0.05, extra=("participation.fraction=1.0",)),
    case("scaffold", 0.1, eta_g=2.0),
    case("scaffold", 0.07),
]


def fednova_estimate(updates: np.ndarray, steps: np.ndarray, lr: float, weights: np.ndarray) -> np.ndarray:
    """The pre-fix server rule: g = sum_i w_i (x - x_i) / (eta K_i) (with gamma = eta_g eta Kbar)."""
    coef = np.asarray(weights, dtype=np.float64) / (lr * np.asarray(steps, dtype=np.float64))
    return -(coef @ updates)


def run_case(c: dict, seed: int, work: Path) -> dict:
    import torch

    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment
    from fedsim.results import read_metrics
    from strategies import momentum

    torch.set_num_threads(1)
    original, original_agg = momentum.momentum_estimate, momentum.MomentumFamily.aggregate_updates
    trace: list[dict] = []  # the strategy's per-round |g|, |c| (SCAFFOLD's server state)

    def traced(self, server_round, ru):
        out = original_agg(self, server_round, ru)
        if self.history and self.history[-1]["round"] == server_round:
            trace.append(dict(self.history[-1]))
        return out

    momentum.MomentumFamily.aggregate_updates = traced
    if c["rule"] == "fednova":
        momentum.momentum_estimate = fednova_estimate
    try:
        t0 = time.time()
        run_dir = work / f"{c['name']}-s{seed}"
        summary = run_experiment(compose_config(BASE + c["overrides"] + [f"seed={seed}"]), run_dir)
        rows = read_metrics(run_dir)
    finally:
        momentum.momentum_estimate, momentum.MomentumFamily.aggregate_updates = original, original_agg

    def num(v):  # NaN/inf -> None (valid JSON)
        return None if v is None or not math.isfinite(float(v)) else float(v)

    return {
        **c,
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
        "final_accuracy": num(summary["final_accuracy"]),
        "best_accuracy": num(summary["best_accuracy"]),
        "best_round": summary["best_round"],
        "train_loss": [num(r.get("train_loss")) for r in rows],
        "test_accuracy": [num(r.get("test_accuracy")) for r in rows],
        "c_norm": [num(t["c_norm"]) for t in trace],
        "failed": [int(r.get("failed", 0)) for r in rows],
    }


def describe(res: dict) -> str:
    loss = res["train_loss"]

    def at(r: int):
        v = loss[r - 1] if r - 1 < len(loss) else None
        return "nan" if v is None else f"{v:.2f}"

    finite = [v for v in loss if v is not None]
    return (
        f"{res['name']:<34} s{res['seed']} loss r10 {at(10)} r30 {at(30)} r50 {at(50)} r60 {at(60)} "
        f"max {max(finite) if finite else float('nan'):.2f} | acc final {res['final_accuracy']} "
        f"best {res['best_accuracy']} (r{res['best_round']}) | {res['seconds']}s"
    )


DIVERGED = 2.0 * math.log(10)  # mean client train loss above twice a uniform guess's (10 classes)


def diverged_at(res: dict) -> int | None:
    """First round whose mean client train loss is non-finite or above :data:`DIVERGED`."""
    for r, v in enumerate(res["train_loss"], start=1):
        if v is None or v > DIVERGED:
            return r
    return None


def summary_table(results: list[dict]) -> str:
    """Markdown table: one row per case over its seeds."""
    lines = [
        "| case | seeds | diverged (round) | max train loss | final acc % | best acc % |",
        "|---|---|---|---|---|---|",
    ]
    for c in CASES:
        rs = sorted((r for r in results if r["name"] == c["name"]), key=lambda r: r["seed"])
        if not rs:
            continue
        div = [diverged_at(r) for r in rs]
        mx = [max((v for v in r["train_loss"] if v is not None), default=float("nan")) for r in rs]
        fmt_mx = ", ".join("NaN" if None in r["train_loss"] else (f"{m:.3g}" if m < 1e4 else f"{m:.0e}")
                           for r, m in zip(rs, mx))
        fin = [100 * (r["final_accuracy"] or 0.0) for r in rs]
        best = [100 * (r["best_accuracy"] or 0.0) for r in rs]
        lines.append(
            f"| {c['name']} | {', '.join(str(r['seed']) for r in rs)} | "
            f"{sum(d is not None for d in div)}/{len(rs)} ({', '.join('-' if d is None else str(d) for d in div)}) | "
            f"{fmt_mx} | {', '.join(f'{v:.1f}' for v in fin)} | {', '.join(f'{v:.1f}' for v in best)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", action="store_true", help="print the markdown table of the results and exit")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--work", default="/tmp/fedsim-scaffold-stability")
    args = ap.parse_args()
    if args.summary:
        print(summary_table(json.loads(OUT.read_text())))
        return
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found (mnist10k is needed for this experiment)")
    results = json.loads(OUT.read_text()) if OUT.exists() else []
    done = {(r["name"], r["seed"]) for r in results}
    for c in CASES:
        if args.only and c["name"] not in args.only:
            continue
        for seed in args.seeds:
            if (c["name"], seed) in done:
                continue
            res = run_case(c, seed, Path(args.work))
            print(describe(res), flush=True)
            results.append(res)
            OUT.write_text("[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n")  # one line per run


if __name__ == "__main__":
    main()
