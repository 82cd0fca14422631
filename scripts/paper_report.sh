#!/usr/bin/env bash
# Tables, claim verdicts and curves of the paper-horizon reproductions (docs/reproductions.md),
# all through fedsim-report, from the sweeps that the commands in docs/reproductions.md write.
#   RUNS=/path/to/sweeps bash scripts/paper_report.sh      (default RUNS=multirun/paper)
# Each block writes report.md, report.csv, curves.png and claims.md into docs/paper/<name>/.
set -euo pipefail
RUNS=${RUNS:-multirun/paper}
OUT=${OUT:-docs/paper}
rep() { local name=$1; shift; mkdir -p "$OUT/$name"; fedsim-report "$@" --out "$OUT/$name" > /dev/null; echo "wrote $OUT/$name"; }

# FedAU (Wang & Ji): FedAU beats the two unbiased-less averages, is on par with the memory-heavy
# MIFA / FedVarp, and the oracle 1/p_n shows the bias exists. last 10 evaluations = last 200 rounds.
for p in bernoulli markov cyclic; do
  [ -d "$RUNS/fedau_$p" ] || continue
  rep "fedau_$p" "$RUNS/fedau_$p" --last 10 \
    --claim "fedau_arm=fedau > fedau_arm=avg_participating" \
    --claim "fedau_arm=fedau_k50 > fedau_arm=avg_participating" \
    --claim "fedau_arm=fedau > fedau_arm=avg_all" \
    --claim "fedau_arm=fedau >= fedau_arm=mifa within 0.005" \
    --claim "fedau_arm=fedau >= fedau_arm=fedvarp within 0.005" \
    --claim "fedau_arm=known_prob > fedau_arm=avg_participating"
done
if [ -d "$RUNS/fedau_logreg" ]; then
  rep fedau_logreg "$RUNS/fedau_logreg" --last 10 \
    --claim "fedau_arm=fedau > fedau_arm=avg_participating" \
    --claim "fedau_arm=fedau_k50 > fedau_arm=avg_participating" \
    --claim "fedau_arm=known_prob > fedau_arm=avg_participating"
fi

# Momentum (Cheng et al.): each method at its own best local step size (grid in the config);
# momentum_full: FedAvg-M's claim is for full participation (N = 10, everyone every round).
M="--last 10 --grid momentum_arm:client.lr --best-over client.lr"
for name in momentum_lr momentum_full; do
  [ -d "$RUNS/$name" ] || continue
  extra=()
  [ "$name" = momentum_lr ] && extra=(--claim "momentum_arm=fedavg_m_vr > momentum_arm=fedavg_m"
                                      --claim "momentum_arm=scaffold_m_vr > momentum_arm=scaffold_m")
  # shellcheck disable=SC2086
  rep "$name" "$RUNS/$name" $M --claim "momentum_arm=fedavg_m > momentum_arm=fedavg" \
    --claim "momentum_arm=scaffold_m > momentum_arm=scaffold" \
    --claim "momentum_arm=scaffold > momentum_arm=fedavg" "${extra[@]}"
done

# MUD-HoG (Gupta et al.): MUD-HoG above FedAvg and every robust baseline under the mixture.
if [ -d "$RUNS/mudhog_mix" ]; then
  claims=()
  for b in fedavg median geomed krum multikrum foolsgold; do claims+=(--claim "mudhog_arm=mudhog > mudhog_arm=$b"); done
  rep mudhog_mix "$RUNS/mudhog_mix" --last 5 "${claims[@]}" \
    --claim "mudhog_arm=mudhog_paper_eps > mudhog_arm=fedavg" \
    --claim "mudhog_arm=mudhog > mudhog_arm=mudhog_paper_eps" \
    --claim "mudhog_arm=fedavg_no_attack > mudhog_arm=fedavg" \
    --claim "mudhog_arm=mudhog >= mudhog_arm=fedavg_no_attack within 0.01"
  P=det_signflip_precision,det_signflip_recall,det_noise_precision,det_noise_recall
  P=$P,det_targeted_precision,det_targeted_recall,det_unreliable_precision,det_unreliable_recall,det_fp,det_f1
  rep mudhog_mix/detection "$RUNS/mudhog_mix" --last 5 --panels "$P"
fi
for t in mudhog_signflip_heavy mudhog_labelflip_heavy mudhog_iid; do
  [ -d "$RUNS/$t" ] || continue
  rep "$t" "$RUNS/$t" --last 5 --claim "mudhog_arm=mudhog > mudhog_arm=fedavg" \
    --panels det_signflip_recall,det_noise_recall,det_targeted_recall,det_unreliable_recall,det_fp,test_accuracy
done
# the authors' code behaviour (frozen short HoG, noise may be the largest cluster) vs fedsim's defaults
for pair in "mudhog_codeparity mudhog_mix" "mudhog_signflip_codeparity mudhog_signflip_heavy"; do
  set -- $pair
  [ -d "$RUNS/$1" ] && [ -d "$RUNS/$2" ] || continue
  rep "$1" "$RUNS/$1" "$RUNS/$2" --last 5 --where mudhog_arm=mudhog \
    --claim "strategy.short_hog=frozen > strategy.short_hog=moving" \
    --panels det_signflip_recall,det_noise_recall,det_targeted_recall,det_unreliable_recall,det_fp,test_accuracy
done
