#!/bin/sh
# Stage 3 of results/PLAN.md (exploratory): the step controls of setting A's primary pair, and
# FedAdam, the same server optimiser as the harmonised arm without the harmonisation, and FedGH +
# Yogi, the harmonised direction under the baseline's optimiser; the test seeds 0-9 of configs/synth_view.toml. Why these three: results/plan/status.md, "Stage 3".
# Resumable: run it again and finished runs are kept, the others resume from their checkpoint.
# Writes runs/controls-synth-view/<label>-s<seed>/ and runs/controls-synth-view/report.md.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
exec nice -n 10 "${FEDPOSE:-fedpose}" compare configs/synth_view.toml \
  --name controls-synth-view --seeds 0-9 --jobs "${JOBS:-1}" --resume --baselines fedadam-lr3e-2 \
  --variant "fedadam-lr3e-2:fed.method=fedadam;fed.server_lr=0.03" \
  --variant "fedgh-adam-rescale-lr3e-2:fed.method=fedgh;fed.server_opt=adam;fed.server_lr=0.03;fed.gh_rescale=true" \
  --variant "fedyogi-lr1.82e-2:fed.method=fedyogi;fed.server_lr=0.0182" \
  --variant "fedgh-yogi-lr3e-2:fed.method=fedgh;fed.server_opt=yogi;fed.server_lr=0.03" \
  "$@"
