"""How large is the participation bias FedAU removes, and where does it go? (docs/reproductions.md)

For the runs of a FedAU sweep (``fedsim -m +experiment=fedau_<pattern> ...``), per seed:

* the **objective mismatch**: averaging over participants minimises, in expectation,
  sum_n p_n F_n / sum_n p_n instead of the FL objective (1/N) sum_n F_n (Wang & Ji, Sec. 3).
  With each client's label histogram h_n, the class mass of the two objectives is
  w_c = sum_n p_n h_n[c] / sum_n p_n  versus  u_c = sum_n h_n[c] / sum_n |D_n|; printed:
  total variation TV(w, u), and the most over- and under-weighted classes;
* **per-class test accuracy** of each arm's final model (``model.pt``), to see whether the
  classes the biased objective under-weights are the ones it loses.

    python scripts/fedau_bias.py /work/runs14/fedau_bernoulli [--json OUT]

Reads the runs' own ``config.yaml``/``summary.json``/``model.pt`` (``weights_only=True``); never trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.data import label_histogram, load_federated  # noqa: E402
from fedsim.models.zoo import build_model  # noqa: E402
from fedsim.report import find_runs, overrides_of, run_outcome  # noqa: E402


def class_mass(hist: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(w, u)``: class mass of the participation-weighted objective and of the FL objective."""
    w = (p[:, None] * hist).sum(0) / (p[:, None] * hist).sum()
    u = hist.sum(0) / hist.sum()
    return w, u


def per_class_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, c: int) -> np.ndarray:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return np.array([float((pred[y == k] == k).float().mean()) for k in range(c)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--arm-key", default="fedau_arm")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    by_seed: dict[str, list[Path]] = defaultdict(list)
    for d in find_runs([a.sweep]):
        if run_outcome(d) is None:
            by_seed[overrides_of(d).get("seed", "0")].append(d)
    out: dict[str, object] = {}
    acc: dict[str, list[np.ndarray]] = defaultdict(list)
    for seed, runs in sorted(by_seed.items()):
        cfg = OmegaConf.load(runs[0] / "config.yaml")
        data = load_federated(cfg.dataset, cfg.partition, int(cfg.num_clients), int(cfg.seed))
        hist = label_histogram(data.bundle.y_train.numpy(), data.partitions, data.num_classes)
        p = np.asarray(json.loads((runs[0] / "summary.json").read_text())["participation"]["probabilities"])
        w, u = class_mass(hist, p)
        tv = 0.5 * float(np.abs(w - u).sum())
        ratio = w / u
        out[f"seed {seed}"] = {"tv": tv, "w": w.round(4).tolist(), "u": u.round(4).tolist(),
                               "p_min": float(p.min()), "p_max": float(p.max())}
        print(f"seed {seed}: TV(w, u) = {tv:.3f}; w/u per class = {np.round(ratio, 2).tolist()}")
        x, y = data.test()
        for d in runs:
            c = OmegaConf.load(d / "config.yaml")
            model = build_model(c.model, data.in_shape, data.num_classes, int(c.seed))
            model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
            model.eval()
            pc = per_class_accuracy(model, x, y, data.num_classes)
            arm = overrides_of(d).get(a.arm_key, "?")
            acc[arm].append(pc)
            # correlation of the class's accuracy with its over-weighting in the biased objective
            r = float(np.corrcoef(np.log(ratio), pc)[0, 1])
            print(f"  {arm:18s} acc {pc.mean():.4f}  worst class {pc.min():.3f}  corr(log w/u, class acc) {r:+.2f}")
    summary = {arm: {"mean": float(np.mean(v)), "worst_class": float(np.mean([x.min() for x in v]))}
               for arm, v in acc.items()}
    out["per_arm"] = summary
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
