#!/bin/sh
# The pages of the primary comparisons (results/PLAN.md), regenerated from the committed runs in
# results/runs/: one report per setting (scores, paired differences, per-site PCK, curves), then
# the Holm-corrected family over the four primary comparisons, results/primary.md.
# Runs made by results/plan/primary.sh and results/plan/controls-synth-view.sh.
set -e
cd "$(dirname "$0")/../.."
FEDPOSE="${FEDPOSE:-fedpose}"
R=results/runs
report() {  # OUT TITLE RUN_DIR...
  out=$1 title=$2
  shift 2
  "$FEDPOSE" report "$@" --out "$out" --title "$title"
}
report results/primary_synth_view.md \
  "A: synth-arm by camera view, 4 clients: the primary pair (10 paired seeds) and its controls" \
  $R/primary-synth-view $R/controls-synth-view \
  --baselines fedyogi-lr3e-2,fedadam-lr3e-2,fedgh-adam-lr3e-2 --notes results/notes/primary_synth_view.md \
  --produced-by "results/plan/primary.sh; results/plan/controls-synth-view.sh"
report results/primary_synth_view20.md \
  "B: synth-arm over 20 clients (views x subsets), 5 a round: the primary pair, 10 paired seeds" \
  $R/primary-synth-view20 --baselines fedyogi-lr3e-2 --produced-by results/plan/primary.sh
report results/primary_lsp_dirichlet.md \
  "D: LSP across 8 sites skewed by pose (Dirichlet 0.3): the primary pair, 5 paired seeds" \
  $R/primary-lsp-dirichlet --baselines fedyogi-lr3e-2 --produced-by results/plan/primary.sh
report results/primary_synth_view100.md \
  "C: synth-arm over 100 small clients, 10 a round: the primary pair, 5 paired seeds" \
  $R/primary-synth-view100 --baselines fedyogi-lr3e-2 --produced-by results/plan/primary.sh
"$FEDPOSE" family --pair fedgh-adam-lr3e-2:fedyogi-lr3e-2 \
  --title "Which strategy? The primary comparisons of results/PLAN.md, Holm-corrected" \
  --notes results/notes/primary.md --out results/primary.md \
  A=results/primary_synth_view_summary.json B=results/primary_synth_view20_summary.json \
  C=results/primary_synth_view100_summary.json D=results/primary_lsp_dirichlet_summary.json
