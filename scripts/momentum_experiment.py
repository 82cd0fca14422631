"""Momentum vs client drift on MNIST (10k) with strong label skew and partial participation.

FedAvg, FedAvg-M, SCAFFOLD, SCAFFOLD-M, FedAvg-M-VR and SCAFFOLD-M-VR, 3 seeds each, on the
inline engine: Dirichlet(alpha = 0.1) label skew over N = 50 clients, S = 10 per round, K = 10
local SGD steps (batch 32, eta = 0.01), server lr 1 (gamma = eta K), beta = 0.5, MLP 784-64-64-10,
60 rounds. eta and beta were picked on a pilot seed (100) that is not among the reported seeds:
at eta = 0.05 the VR variants diverge (see docs/momentum.md), at eta = 0.01 every method is stable.
FedAvg is FedAvg-M with beta = 1 (uniform 1/S weights like every other method here; the tests
show it equals Flower's FedAvg). Writes docs/momentum_acc.png, docs/momentum_results.json and a
markdown table (docs/momentum_table.md) of mean +- std test accuracy over seeds.

    nice -n 10 python scripts/momentum_experiment.py            # 12.5 min measured on 2 busy cores
    python scripts/momentum_experiment.py --rounds 5 --seeds 0  # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# label -> (strategy config, extra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "FedAvg": ("fedavg_m", ["strategy.beta=1.0"]),
    "FedAvg-M": ("fedavg_m", []),
    "SCAFFOLD": ("scaffold", []),
    "SCAFFOLD-M": ("scaffold_m", []),
    "FedAvg-M-VR": ("fedavg_m_vr", []),
    "SCAFFOLD-M-VR": ("scaffold_m_vr", []),
}


def overrides(strategy: str, extra: list[str], seed: int, rounds: int, beta: float, lr: float) -> list[str]:
    data = ROOT.parent / "shared" / "data" / "mnist10k.npz"
    beta_ov = [] if any(e.startswith("strategy.beta") for e in extra) or strategy == "scaffold" else [
        f"strategy.beta={beta}"
    ]
    return [
        "dataset=mnist10k",
        f"dataset.path={data}",
        "partition=dirichlet",
        "partition.alpha=0.1",
        "num_clients=50",
        "participation=sampled",
        "participation.fraction=0.2",
        "model=mlp",
        f"strategy={strategy}",
        "strategy.global_lr=1.0",
        "client.steps=10",
        "client.batch_size=32",
        f"client.lr={lr}",
        "client.num_threads=1",
        f"rounds={rounds}",
        f"seed={seed}",
        *beta_ov,
        *extra,
    ]


def run_all(
    rounds: int, seeds: list[int], beta: float, methods: list[str], lr: float
) -> dict[str, list[list[float]]]:
    import torch

    torch.set_num_threads(1)
    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment
    from fedsim.results import read_metrics

    out: dict[str, list[list[float]]] = {}
    tmp = ROOT / "outputs" / "momentum_experiment"
    for name in methods:
        strategy, extra = METHODS[name]
        for seed in seeds:
            t0 = time.time()
            run_dir = tmp / f"{strategy}_{name}_s{seed}"
            run_experiment(compose_config(overrides(strategy, extra, seed, rounds, beta, lr)), run_dir)
            rows = read_metrics(run_dir)
            out.setdefault(name, []).append([r["test_accuracy"] for r in rows])
            bd, bu = rows[-1]["bytes_down"], rows[-1]["bytes_up"]
            print(f"{name:14s} seed {seed}: final acc {rows[-1]['test_accuracy']:.4f}  "
                  f"round bytes down/up {bd / 2**20:.2f}/{bu / 2**20:.2f} MiB  {time.time() - t0:.0f}s", flush=True)
    return out


def table(acc: dict[str, list[list[float]]], marks: list[int]) -> str:
    """Markdown: mean +- std accuracy (%) at selected rounds, mean of the last 5 rounds, best."""
    head = "| method | " + " | ".join(f"round {m}" for m in marks) + " | last-5 mean | best (round) |"
    lines = [head, "|" + "---|" * (len(marks) + 3)]
    for name, runs in acc.items():
        a = 100 * np.array(runs)  # [seeds, rounds]
        cells = [f"{a[:, m - 1].mean():.1f} ± {a[:, m - 1].std():.1f}" for m in marks]
        last5 = a[:, -5:].mean(1)
        mean_curve = a.mean(0)
        best = int(mean_curve.argmax())
        cells += [f"{last5.mean():.1f} ± {last5.std():.1f}", f"{mean_curve[best]:.1f} ({best + 1})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(acc: dict[str, list[list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"FedAvg": "k-", "FedAvg-M": "C0-", "FedAvg-M-VR": "C0--", "SCAFFOLD": "C3-",
              "SCAFFOLD-M": "C2-", "SCAFFOLD-M-VR": "C2--"}
    for name, runs in acc.items():
        a = 100 * np.array(runs)
        x = np.arange(1, a.shape[1] + 1)
        m, s = a.mean(0), a.std(0)
        ax.plot(x, m, styles.get(name, "-"), label=name, lw=1.6)
        ax.fill_between(x, m - s, m + s, color=ax.lines[-1].get_color(), alpha=0.12)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--beta", type=float, default=0.5, help="beta of the momentum methods")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--lr", type=float, default=0.01, help="client lr eta (all methods)")
    ap.add_argument("--tag", default="", help="suffix for the output files; tagged runs go to outputs/")
    a = ap.parse_args()
    from fedsim.experiment import quiet_flower

    quiet_flower()
    t0 = time.time()
    acc = run_all(a.rounds, a.seeds, a.beta, a.methods, a.lr)
    marks = sorted({m for m in (5, 10, 20, 30, 40, 60, a.rounds) if m <= a.rounds})
    md = table(acc, marks)
    print(md)
    dest = DOCS if not a.tag else ROOT / "outputs" / "momentum_experiment"  # pilots stay out of docs/
    dest.mkdir(parents=True, exist_ok=True)
    title = (f"MNIST-10k, Dir(0.1) over 50 clients, 10 per round, K=10, eta={a.lr}, beta={a.beta}\n"
             f"mean ± std over {len(a.seeds)} seeds")
    plot(acc, dest / f"momentum_acc{a.tag}.png", title)
    (dest / f"momentum_table{a.tag}.md").write_text(md + "\n")
    (dest / f"momentum_results{a.tag}.json").write_text(
        json.dumps({"beta": a.beta, "lr": a.lr, "rounds": a.rounds, "seeds": a.seeds, "accuracy": acc}, indent=1)
    )
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
