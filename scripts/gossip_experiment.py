"""Gossip learning with and without variance-corrected averaging (VCA) on MNIST (10k).

The ``+experiment=gossip_vca`` set-up (Tian et al., arXiv 2404.04616, scaled): 50 nodes on a random
8-regular graph, LeNet-5 with Xavier init, one local SGD step of batch 64 per round (lr 0.01,
momentum 0.9 kept across rounds, weight decay 1e-4), IID or Dirichlet(0.5) label skew. Variants:

* ``vca``          -- VCA (beta = 0.5, target "auto"), independent initialisations;
* ``plain``        -- plain gossip averaging (beta = 0.5), independent initialisations;
* ``plain_common`` -- plain gossip, all nodes start from one model;
* ``star``         -- server FL: a virtual centre averages the leaves (beta = 0), one common init.

Node accuracy is evaluated every 5 rounds on a fixed subset (the first 500 of the 2,000 test
images) to keep the run short; the central accuracy of the average model uses all 2,000.

    nohup python scripts/gossip_experiment.py run --partition iid > gossip_iid.log 2>&1 &
    nohup python scripts/gossip_experiment.py run --partition dirichlet > gossip_dir.log 2>&1 &
    python scripts/gossip_experiment.py report      # docs/gossip_results.json, _table.md, _acc.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT = ROOT / "outputs" / "gossip_experiment"

VARIANTS: dict[str, list[str]] = {
    "vca": ["strategy.merge=vca"],
    "plain": ["strategy.merge=plain"],
    "plain_common": ["strategy.merge=plain", "strategy.init=common"],
    "star": ["strategy.merge=plain", "topology=star", "strategy.init=common"],
}
PARTITIONS = {"iid": ["partition=iid"], "dirichlet": ["partition=dirichlet", "partition.alpha=0.5"]}


def run(partition: str, variants: list[str], rounds: int, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment

    data = os.environ.get("FEDSIM_MNIST10K") or ROOT.parent / "shared" / "data" / "mnist10k.npz"
    for name in variants:
        run_dir = OUT / f"{partition}_{name}_s{seed}"
        ov = ["+experiment=gossip_vca", f"dataset.path={data}", f"rounds={rounds}", f"seed={seed}"]
        cfg = compose_config(ov + PARTITIONS[partition] + VARIANTS[name])
        t0 = time.time()
        run_experiment(cfg, run_dir)
        print(f"{partition} {name}: {time.time() - t0:.0f}s", flush=True)


def rounds_to(rows: list[dict], key: str, level: float) -> int | None:
    for r in rows:
        if r.get(key) is not None and r[key] >= level:
            return int(r["round"])
    return None


def report(seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedsim.results import read_metrics

    results: dict[str, dict] = {}
    fig, grid = plt.subplots(2, 2, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for ax, vax, partition in zip(grid[0], grid[1], PARTITIONS):
        for name in VARIANTS:
            run_dir = OUT / f"{partition}_{name}_s{seed}"
            if not (run_dir / "metrics.jsonl").exists():
                continue
            rows = read_metrics(run_dir)
            ev = [r for r in rows if r.get("node_acc_mean") is not None]
            if not ev:
                continue
            last = ev[-1]
            results[f"{partition}/{name}"] = {
                "rounds_run": rows[-1]["round"],
                "rounds_to_90_node_mean": rounds_to(ev, "node_acc_mean", 0.9),
                "rounds_to_90_avg_model": rounds_to(ev, "test_accuracy", 0.9),
                "final_round": last["round"],
                "final_node_acc_mean": last["node_acc_mean"],
                "final_node_acc_min": last["node_acc_min"],
                "final_node_acc_max": last["node_acc_max"],
                "final_avg_model_acc": last["test_accuracy"],
                "final_weight_var_ratio": last.get("weight_var_ratio"),
                "final_consensus_distance": last.get("consensus_distance"),
                "curve": [[r["round"], r["node_acc_mean"], r["node_acc_min"], r["node_acc_max"]] for r in ev],
                "var_ratio_curve": [[r["round"], r.get("weight_var_ratio")] for r in ev],
                "relayed_MB_per_round": rows[-1].get("gossip_relayed_bytes", 0) / 1e6,
            }
            xs = [r["round"] for r in ev]
            (line,) = ax.plot(xs, [r["node_acc_mean"] for r in ev], label=name)
            ax.plot(xs, [r["test_accuracy"] for r in ev], color=line.get_color(), ls=":", lw=1)
            ax.fill_between(xs, [r["node_acc_min"] for r in ev], [r["node_acc_max"] for r in ev], alpha=0.15)
            vax.plot(xs, [r["weight_var_ratio"] for r in ev], color=line.get_color(), label=name)
        ax.axhline(0.9, color="grey", lw=0.5, ls="--")
        ax.set_title(f"MNIST-10k, 50 nodes, {partition}")
        ax.legend(loc="lower right")
        vax.set_yscale("log")
        vax.set_xlabel("round (1 SGD step of batch 64 per node)")
    grid[0][0].set_ylabel("node test acc.: mean, band min..max;\ndotted: average of node models")
    grid[1][0].set_ylabel("weight variance / initial")
    fig.tight_layout()
    fig.savefig(DOCS / "gossip_acc.png", dpi=80)
    (DOCS / "gossip_results.json").write_text(json.dumps(results, indent=1))
    lines = [
        "| partition | variant | rounds to 90 % (mean node acc) | rounds to 90 % (average model) | final mean / min / max node acc | final acc of the average model | weight var / initial |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        part, name = key.split("/")
        r90 = r["rounds_to_90_node_mean"]
        r90s = str(r90) if r90 is not None else f"> {r['rounds_run']}"
        a90 = r["rounds_to_90_avg_model"]
        a90s = str(a90) if a90 is not None else f"> {r['rounds_run']}"
        lines.append(
            f"| {part} | {name} | {r90s} | {a90s} | "
            f"{r['final_node_acc_mean']:.3f} / {r['final_node_acc_min']:.3f} / {r['final_node_acc_max']:.3f} | "
            f"{r['final_avg_model_acc']:.3f} | {r['final_weight_var_ratio']:.3f} |"
        )
    (DOCS / "gossip_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["run", "report"])
    p.add_argument("--partition", choices=list(PARTITIONS), default="iid")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.mode == "run":
        run(a.partition, a.variants.split(","), a.rounds, a.seed)
    else:
        report(a.seed)


if __name__ == "__main__":
    main()
