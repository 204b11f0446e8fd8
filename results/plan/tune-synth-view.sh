#!/bin/sh
# Tuning stage of setting A (results/PLAN.md): every method's grid of 3 points on 2 tuning
# seeds (100, 101), scored on the validation split (20 % of every client's training records,
# data.val_fraction), never on the test split. Seed-major: both seeds' full grids are paired.
# Resumable: run it again and finished runs are kept, the others resume from their checkpoint.
# Writes runs/tune-synth-view/<label>-s<seed>/ and runs/tune-synth-view/report.md.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
exec nice -n 10 "${FEDPOSE:-fedpose}" compare configs/synth_view.toml \
  --name tune-synth-view --seeds 100,101 --jobs 1 --resume --baselines fedavg-lr1 \
  -c data.val_fraction=0.2 \
  --variant "fedavg-lr0.7:fed.method=fedavg;fed.server_lr=0.7" \
  --variant "fedavg-lr1:fed.method=fedavg;fed.server_lr=1.0" \
  --variant "fedavg-lr1.4:fed.method=fedavg;fed.server_lr=1.4" \
  --variant "fedavgm-b0.5:fed.method=fedavgm;fed.server_momentum=0.5;fed.server_lr=0.5" \
  --variant "fedavgm-b0.7:fed.method=fedavgm;fed.server_momentum=0.7;fed.server_lr=0.3" \
  --variant "fedavgm-b0.9:fed.method=fedavgm;fed.server_momentum=0.9;fed.server_lr=0.1" \
  --variant "fedadam-lr3e-3:fed.method=fedadam;fed.server_lr=0.003" \
  --variant "fedadam-lr1e-2:fed.method=fedadam;fed.server_lr=0.01" \
  --variant "fedadam-lr3e-2:fed.method=fedadam;fed.server_lr=0.03" \
  --variant "fedyogi-lr3e-3:fed.method=fedyogi;fed.server_lr=0.003" \
  --variant "fedyogi-lr1e-2:fed.method=fedyogi;fed.server_lr=0.01" \
  --variant "fedyogi-lr3e-2:fed.method=fedyogi;fed.server_lr=0.03" \
  --variant "feddyn-a1e-5:fed.method=feddyn;fed.dyn_alpha=0.00001" \
  --variant "feddyn-a3e-5:fed.method=feddyn;fed.dyn_alpha=0.00003" \
  --variant "feddyn-a1e-4:fed.method=feddyn;fed.dyn_alpha=0.0001" \
  --variant "fedprox-mu1e-5:fed.method=fedprox;fed.prox_mu=0.00001" \
  --variant "fedprox-mu1e-4:fed.method=fedprox;fed.prox_mu=0.0001" \
  --variant "fedprox-mu1e-3:fed.method=fedprox;fed.prox_mu=0.001" \
  --variant "scaffold-lr0.7:fed.method=scaffold;fed.server_lr=0.7" \
  --variant "scaffold-lr1:fed.method=scaffold;fed.server_lr=1.0" \
  --variant "scaffold-lr1.4:fed.method=scaffold;fed.server_lr=1.4" \
  --variant "fedgh-lr0.7:fed.method=fedgh;fed.server_lr=0.7" \
  --variant "fedgh-lr1:fed.method=fedgh;fed.server_lr=1.0" \
  --variant "fedgh-lr1.4:fed.method=fedgh;fed.server_lr=1.4" \
  --variant "pcgrad-lr0.7:fed.method=fedgh-noaw;fed.server_lr=0.7" \
  --variant "pcgrad-lr1:fed.method=fedgh-noaw;fed.server_lr=1.0" \
  --variant "pcgrad-lr1.4:fed.method=fedgh-noaw;fed.server_lr=1.4" \
  --variant "fedgh-adam-lr3e-3:fed.method=fedgh;fed.server_opt=adam;fed.server_lr=0.003" \
  --variant "fedgh-adam-lr1e-2:fed.method=fedgh;fed.server_opt=adam;fed.server_lr=0.01" \
  --variant "fedgh-adam-lr3e-2:fed.method=fedgh;fed.server_opt=adam;fed.server_lr=0.03" \
  --variant "fedgh-m0.5:fed.method=fedgh;fed.server_momentum=0.5;fed.server_lr=0.5" \
  --variant "fedgh-m0.7:fed.method=fedgh;fed.server_momentum=0.7;fed.server_lr=0.3" \
  --variant "fedgh-m0.9:fed.method=fedgh;fed.server_momentum=0.9;fed.server_lr=0.1" \
  "$@"
