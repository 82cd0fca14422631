"""Outcome check: FedAvg + CNN on real MNIST (../shared/data/mnist10k.npz) within 20 rounds.

    python scripts/mnist_fedavg.py [--data PATH] [--rounds 20] [extra hydra overrides...]

8,000 training images over 10 IID clients (the 10k MNIST test split, seeded 80/20), 1 local
epoch per round, batch 32, lr 0.05. Prints per-round accuracy and exits non-zero if the best
accuracy within the rounds is below 95 %.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedsim.compose import compose_config  # noqa: E402
from fedsim.experiment import run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "mnist_fedavg"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose_config(
        [
            "dataset=npz",
            f"dataset.path={args.data}",
            "model=cnn",
            "strategy=fedavg",
            "num_clients=10",
            f"rounds={args.rounds}",
            "client.epochs=1",
            "client.batch_size=32",
            "client.lr=0.05",
            *args.overrides,
        ]
    )
    summary = run_experiment(cfg, Path(args.out))
    print(f"best accuracy {summary['best_accuracy']:.4f} at round {summary['best_round']}, "
          f"final {summary['final_accuracy']:.4f}, {summary['wall_time']:.0f}s")
    return 0 if summary["best_accuracy"] >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
