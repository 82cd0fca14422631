"""Neurotoxin's claim (Zhang et al., ICML 2022): a backdoor trained only in coordinates benign
clients rarely update survives longer after the attacker stops.

backdoor_table's set-up (mnist10k, 30 clients, 10 per round, pre-trained start) under FedAvg;
one attacker trains a BadNets backdoor in rounds 1-5 (sampled every one of them), then stops;
backdoor accuracy is recorded every round up to ``--rounds``. Plain BadNets vs Neurotoxin +
BadNets (top 5 % |g| excluded), ``--seeds`` seeds. Writes outputs/neurotoxin/results.json.

    python scripts/neurotoxin_durability.py      # needs outputs/backdoor_pretrain/model.pt
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADNETS = "{_target_: attacks.backdoor.BadNets, target: 0, size: 4, position: bottom-right, margin: 1, poison_fraction: 0.3125}"
ATTACKS = {
    "badnets": BADNETS,
    "neurotoxin": "{_target_: attacks.base.Chain, attacks: [{_target_: attacks.backdoor.Neurotoxin, ratio: 0.05}, " + BADNETS + "]}",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--stop", type=int, default=5)
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    torch.set_num_threads(1)
    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment
    from fedsim.results import read_metrics

    ckpt = ROOT / "outputs" / "backdoor_pretrain" / "model.pt"
    out = ROOT / "outputs" / "neurotoxin"
    res: dict = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, attack in ATTACKS.items():
            group = (f"threat.groups=[{{name: {name}, ids: [0], attack: {attack}, "
                     f"schedule: {{start: 1, stop: {args.stop}, sample: true}}}}]")
            run_dir = out / f"{name}_s{seed}"
            run_experiment(compose_config(["+experiment=backdoor_table", "threat=none", group, f"rounds={args.rounds}",
                                           "eval.every=1", f"init.checkpoint={ckpt}", f"seed={seed}"]), run_dir)
            rows = read_metrics(run_dir)
            res[f"{name}_s{seed}"] = [(r["round"], r["test_accuracy"], r["backdoor_accuracy"]) for r in rows]
            print(name, seed, [round(r[2], 3) for r in res[f"{name}_s{seed}"]], flush=True)
    (out / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
