#!/usr/bin/env bash
# Table 2 of the paper: every architecture on D1C, D3C, D11C and D21C, k-fold CV.
#
#   ROIS=work/rois.h5 OUT=table2 ./examples/table2_grid.sh            # everything here, one job after another
#   ROIS=work/rois.h5 OUT=table2 ./examples/table2_grid.sh --list     # the job list (index arch channels fold)
#
# On a Slurm cluster (datasets first, then one array task per job, then the report):
#   export ROIS=work/rois.h5 OUT=table2
#   prep=$(sbatch --parsable --wrap "./examples/table2_grid.sh --prepare")
#   grid=$(sbatch --parsable --dependency=afterok:$prep --gres=gpu:1 --array=0-359 \
#          --wrap "./examples/table2_grid.sh --job \$SLURM_ARRAY_TASK_ID")
#   sbatch --dependency=afterok:$grid --wrap "./examples/table2_grid.sh --report"
#
# One job = one (architecture, dataset, fold). Jobs of one (architecture, dataset) share
# its RUNDIR (`nodulekit train --fold K`), so they can run at the same time on different
# GPUs/nodes; each resumes from its per-epoch checkpoint when re-run. When all jobs are
# done, `--report` writes one table per dataset.
# 18 architectures x 4 datasets x 5 folds = 360 jobs; for the cost per job on a CPU see
# benchmarks/execution_cost.py in benchmarks/README.md.
set -euo pipefail

ROIS=${ROIS:?set ROIS to the rois.h5 written by nodulekit extract}
OUT=${OUT:-table2}
FOLDS=${FOLDS:-5}
EPOCHS=${EPOCHS:-90}
SEED=${SEED:-0}
DEVICE=${DEVICE:-auto}
TRAIN_ARGS=${TRAIN_ARGS:-}        # e.g. "--model-opt base_width=16" for a quick try
NK=${NK:-nodulekit}
archs=(${ARCHS:-pn-samp sag-c resnet18 resnet34 vgg16 densenet121
       resnet18-cam resnet34-cam vgg16-cam densenet121-cam
       resnet18-sam resnet34-sam vgg16-sam densenet121-sam
       baseline cam sam hesam})
channels=(${CHANNELS:-1 3 11 21})

jobs=()
for a in "${archs[@]}"; do for c in "${channels[@]}"; do for k in $(seq 0 $((FOLDS - 1))); do
  jobs+=("$a $c $k")
done; done; done

datasets() {  # every dataset is built once (same seed => the same patient folds for all)
  mkdir -p "$OUT"
  for c in "${channels[@]}"; do
    [ -e "$OUT/d${c}c.h5" ] || $NK build "$ROIS" --channels "$c" --folds "$FOLDS" --seed "$SEED" -o "$OUT/d${c}c.h5"
  done
}

run_job() {
  [ "$1" -ge 0 ] && [ "$1" -lt "${#jobs[@]}" ] || { echo "job index $1 out of range 0..$((${#jobs[@]} - 1))" >&2; exit 2; }
  read -r a c k <<<"${jobs[$1]}"
  [ -e "$OUT/d${c}c.h5" ] || { echo "$OUT/d${c}c.h5 missing: run $0 --prepare first" >&2; exit 2; }
  $NK train "$OUT/d${c}c.h5" --arch "$a" --fold "$k" --folds "$FOLDS" --epochs "$EPOCHS" --seed "$SEED" \
    --device "$DEVICE" --no-progress $TRAIN_ARGS -o "$OUT/runs/$a-d${c}c"
}

report() {
  for c in "${channels[@]}"; do
    $NK evaluate $(for a in "${archs[@]}"; do echo "$OUT/runs/$a-d${c}c"; done) -o "$OUT/report-d${c}c" --overwrite
  done
  echo "Table 2 per dataset: $OUT/report-d*c/table2.md"
}

case "${1:-all}" in
  --list) for i in "${!jobs[@]}"; do echo "$i ${jobs[$i]}"; done ;;
  --prepare) datasets ;;
  --job) run_job "${2:?--job needs an index (see --list)}" ;;
  --report) report ;;
  all) datasets; for i in "${!jobs[@]}"; do run_job "$i"; done; report ;;
  *) echo "usage: $0 [--list | --prepare | --job INDEX | --report]" >&2; exit 2 ;;
esac
