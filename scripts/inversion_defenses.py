"""Defense curves: iDLG's success rate and median PSNR as each client-side defense grows.

Runs :func:`attacks.inversion.benchmark.run_benchmark` once per (defense, strength) on the same
targets (MNIST, DLG's sigmoid LeNet re-drawn per image, L-BFGS 300 steps) and writes
``<out>.json`` and ``<out>.png`` (one curve per defense). Defenses: Gaussian noise with global-norm
clipping (bound 4), pruning (smallest p % per tensor), larger local batches (FedSGD over B
images; labels by Yin et al.'s rule, distinct labels), more local steps (FedAvg, lr 0.1, attack
unrolls the steps).

    python scripts/inversion_defenses.py --data ../shared/data/mnist10k.npz --images 8 --out docs/inversion_defenses
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from attacks.inversion.benchmark import run_benchmark

SWEEPS = {
    "noise_std": [0.0, 1e-3, 1e-2, 1e-1],
    "prune_pct": [0, 50, 90, 99],
    "local_batch": [1, 2, 4],
    "local_steps": [1, 2, 4],
}


NO_DEFENSE = {"noise_std": 0.0, "prune_pct": 0, "local_batch": 1, "local_steps": 1}


def node_for(kind: str, value: float, data: str, images: int, seed: int) -> dict:
    node = {
        "data": "mnist",
        "data_path": data,
        "num_images": images,
        "batch_size": 1,
        "model": {"name": "sigmoid_lenet"},
        "reinit_per_batch": True,
        "threshold_db": 30.0,
        "seed": seed,
        "grid": 0,
        "attacks": {"idlg": {"_target_": "attacks.inversion.dlg.DLG", "labels": "infer", "iterations": 300, "patience": 20}},
    }
    if kind == "noise_std" and value > 0:
        node["defenses"] = [{"_target_": "defenses.privacy.GaussianNoise", "std": value, "clip": 4.0}]
    elif kind == "prune_pct" and value > 0:
        node["defenses"] = [{"_target_": "defenses.privacy.Prune", "p": value}]
    elif kind == "local_batch":
        node["batch_size"] = int(value)
        node["num_images"] = images * int(value) if value > 1 else images
        node["distinct_labels"] = True
    elif kind == "local_steps":
        node["protocol"] = {"kind": "fedavg", "lr": 0.1, "steps": int(value), "batch": 0}
    return node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist10k.npz")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/inversion_defenses"))
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SWEEPS))
    ap.add_argument("--from-log", type=Path, nargs="*", default=None, help="only re-plot the progress lines of runs")
    ap.add_argument("--values", default="", help="override sweep values, e.g. 'noise_std=0,1e-5,1e-4;prune_pct=0,10'")
    a = ap.parse_args()
    if a.from_log is not None:
        write(from_log(a.from_log), list(SWEEPS), a.out)
        return
    for item in filter(None, a.values.split(";")):
        kind, vals = item.split("=", 1)
        SWEEPS[kind] = [float(v) for v in vals.split(",")]
    torch.set_num_threads(1)
    only = [s for s in a.only.split(",") if s] or list(SWEEPS)
    res: dict = {}
    t0 = time.process_time()
    baseline = None  # every sweep starts at "no defense": run it once
    for kind in only:
        res[kind] = []
        for v in SWEEPS[kind]:
            is_base = v == NO_DEFENSE[kind]
            if is_base and baseline is not None:
                s = baseline
            else:
                s = run_benchmark(node_for(kind, v, a.data, a.images, a.seed))["results"]["idlg"]["summary"]
                baseline = s if is_base else baseline
            res[kind].append({"value": v, **s})
            print(f"{kind}={v}: median {s['psnr_median']:.1f} dB, success {s['success_rate']:.2f}, "
                  f"labels {s['label_accuracy']:.2f}, n={s['n']}", flush=True)
    res["cpu_seconds"] = round(time.process_time() - t0, 1)
    write(res, only, a.out)


def from_log(logs: list[Path]) -> dict:
    """Rebuild the results from the script's own progress lines (runs stopped part-way, or
    several runs over different values); one entry per value, sorted."""
    res: dict = {}
    lines = [ln for log in logs for ln in log.read_text().splitlines()]
    for line in lines:
        m = re.match(r"(\w+)=([\d.e-]+): median ([\d.]+) dB, success ([\d.]+), labels ([\d.]+), n=(\d+)", line)
        if m:
            res.setdefault(m[1], []).append({"value": float(m[2]), "psnr_median": float(m[3]), "success_rate": float(m[4]),
                                             "label_accuracy": float(m[5]), "n": int(m[6])})
    return {k: sorted({r["value"]: r for r in v}.values(), key=lambda r: r["value"]) for k, v in res.items()}


def write(res: dict, only: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    only = [k for k in only if res.get(k)]
    fig, axes = plt.subplots(1, len(only), figsize=(2.6 * len(only), 2.4), squeeze=False)
    for ax, kind in zip(axes[0], only):
        xs = list(range(len(res[kind])))
        ax.plot(xs, [r["success_rate"] for r in res[kind]], "o-", label="success (>=30 dB)")
        ax.plot(xs, [r["psnr_median"] / 100 for r in res[kind]], "s--", label="median PSNR / 100 dB")
        ax.set_xticks(xs, [f"{r['value']:g}" for r in res[kind]], fontsize=7)
        ax.set_title(kind, fontsize=8)
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("iDLG vs client-side defenses (MNIST, sigmoid LeNet)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=72)
    print(f"wrote {out}.json/.png")


if __name__ == "__main__":
    main()
