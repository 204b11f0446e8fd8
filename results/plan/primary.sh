#!/bin/sh
# Stages 2, 4, 5 and 6 of results/PLAN.md: the primary comparison of every setting, the arms
# chosen on setting A's validation split (results/plan/status.md): FedGH + Adam (server lr 3e-2)
# against FedYogi (server lr 3e-2), on the test seeds, scored on the test split.
# Resumable: run it again and finished runs are kept, the others resume from their checkpoint.
# Writes runs/primary-<setting>/<label>-s<seed>/ and runs/primary-<setting>/report.md.
# LSP comes from $FEDPOSE_DATASETS/lsp (default ../shared/datasets/lsp); the script's own
# arguments (e.g. -c data.generate=true for a clone without data/synth-arm) go to the synth-arm
# settings only. Settings run in the plan's order and stop at the first that fails (set -e):
# without LSP, C does not run either. The pages read the committed copies: copy each finished
# run's config.json, clients.json and metrics.jsonl to results/runs/primary-<setting>/<run>/ and
# run results/plan/primary-report.sh.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
JOBS="${JOBS:-1}"
LSP_ROOT="${FEDPOSE_DATASETS:-../shared/datasets}/lsp"
compare() {
  nice -n 10 "${FEDPOSE:-fedpose}" compare "$@" --jobs "$JOBS" --resume \
    --baselines fedyogi-lr3e-2 \
    --variant "fedgh-adam-lr3e-2:fed.method=fedgh;fed.server_opt=adam;fed.server_lr=0.03" \
    --variant "fedyogi-lr3e-2:fed.method=fedyogi;fed.server_lr=0.03"
}
compare configs/synth_view.toml --name primary-synth-view --seeds 0-9 "$@"
compare configs/synth_view20.toml --name primary-synth-view20 --seeds 0-9 "$@"
compare configs/lsp_dirichlet.toml --name primary-lsp-dirichlet --seeds 0-4 -c "data.root=$LSP_ROOT"
compare configs/synth_view100.toml --name primary-synth-view100 --seeds 0-4 "$@"
