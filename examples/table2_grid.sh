#!/usr/bin/env bash
# Table 2 of the paper: every architecture on D1C, D3C, D11C and D21C, k-fold CV.
#
#   ROIS=work/rois.h5 OUT=table2 ./examples/table2_grid.sh            # run every job here, one after another
#   ROIS=work/rois.h5 OUT=table2 ./examples/table2_grid.sh --list     # print the job list (one line per job)
#   sbatch --array=0-359 --wrap "ROIS=work/rois.h5 OUT=table2 ./examples/table2_grid.sh --job \$SLURM_ARRAY_TASK_ID"
#
# One job = one (architecture, dataset, fold). Jobs of one (architecture, dataset) share
# its RUNDIR (`nodulekit train --fold K`), so they can run at the same time on different
# GPUs/nodes; each resumes from its per-epoch checkpoint when re-run. When all jobs are
# done, `--report` writes the table: ./examples/table2_grid.sh --report
# 18 architectures x 4 datasets x 5 folds = 360 jobs; about 22-51 CPU hours per
# architecture and dataset, minutes on a GPU (see benchmarks/README.md).
set -euo pipefail

ROIS=${ROIS:?set ROIS to the rois.h5 written by nodulekit extract}
OUT=${OUT:-table2}
FOLDS=${FOLDS:-5}
EPOCHS=${EPOCHS:-90}
SEED=${SEED:-0}
DEVICE=${DEVICE:-auto}
NK=${NK:-nodulekit}
ARCHS=(${ARCHS:-pn-samp sag-c resnet18 resnet34 vgg16 densenet121
       resnet18-cam resnet34-cam vgg16-cam densenet121-cam
       resnet18-sam resnet34-sam vgg16-sam densenet121-sam
       baseline cam sam hesam})
CHANNELS=(${CHANNELS:-1 3 11 21})

jobs=()
for a in "${ARCHS[@]}"; do for c in "${CHANNELS[@]}"; do for k in $(seq 0 $((FOLDS - 1))); do
  jobs+=("$a $c $k")
done; done; done

datasets() {  # every dataset is built once (same seed => the same patient folds for all)
  mkdir -p "$OUT"
  for c in "${CHANNELS[@]}"; do
    [ -e "$OUT/d${c}c.h5" ] || $NK build "$ROIS" --channels "$c" --folds "$FOLDS" --seed "$SEED" -o "$OUT/d${c}c.h5"
  done
}

run_job() {
  read -r a c k <<<"${jobs[$1]}"
  $NK train "$OUT/d${c}c.h5" --arch "$a" --fold "$k" --folds "$FOLDS" --epochs "$EPOCHS" --seed "$SEED" \
    --device "$DEVICE" --no-progress -o "$OUT/runs/$a-d${c}c"
}

case "${1:-all}" in
  --list) for i in "${!jobs[@]}"; do echo "$i ${jobs[$i]}"; done ;;
  --job) datasets; run_job "$2" ;;
  --report)
    for c in "${CHANNELS[@]}"; do
      $NK evaluate $(for a in "${ARCHS[@]}"; do echo "$OUT/runs/$a-d${c}c"; done) -o "$OUT/report-d${c}c" --overwrite
    done
    echo "Table 2 per dataset: $OUT/report-d*c/table2.md" ;;
  all) datasets; for i in "${!jobs[@]}"; do run_job "$i"; done; "$0" --report ;;
  *) echo "usage: $0 [--list | --job INDEX | --report]" >&2; exit 2 ;;
esac
