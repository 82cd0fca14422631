#!/usr/bin/env bash
# The gradient-inversion benchmark runs behind docs/inversion.md (one torch thread each), at the
# scale they were run for the docs (a shared 2-core machine; see docs/inversion.md "Results").
# Usage: scripts/inversion_benchmarks.sh A|B|C   (queues that can run side by side)
# Needs FEDSIM_MNIST10K (default ../shared/data/mnist10k.npz); writes outputs/bench_*/.
set -euo pipefail
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0
run() { local name=$1; shift; fedsim "$@" hydra.run.dir=outputs/bench_$name > outputs/bench_$name.log 2>&1; }
case "${1:-A}" in
  A)
    run dlg_mnist +experiment=inversion_dlg
    run ig_b1 +experiment=inversion_ig
    run ig_b4 +experiment=inversion_ig inversion.batch_size=4 inversion.num_images=12 inversion.distinct_labels=true inversion.grid=8
    run ig_b8 +experiment=inversion_ig inversion.batch_size=8 inversion.num_images=16 inversion.distinct_labels=true inversion.grid=8
    run dlg_digits +experiment=inversion_dlg inversion.data=digits
    ;;
  B)
    [ -f outputs/dcgan_mnist.pt ] || python scripts/train_dcgan.py --data "${FEDSIM_MNIST10K:-../shared/data/mnist10k.npz}" --epochs 30 > outputs/dcgan.log 2>&1
    run dia +experiment=inversion_dia inversion.num_images=4
    run gifd +experiment=inversion_gifd inversion.num_images=3
    ;;
  C)
    python scripts/inversion_defenses.py --data "${FEDSIM_MNIST10K:-../shared/data/mnist10k.npz}" --images 4 --out docs/inversion_defenses > outputs/defenses.log 2>&1
    ;;
esac
