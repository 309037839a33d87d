#!/usr/bin/env bash
# The README's figures (docs/img/*_vois_tiny.*) from a small, freshly trained run on the real
# LIDC-IDRI VOIs: HESAM at base_width=4, D11C, 5 folds by patient, 2 epochs (the reduced
# schedule's learning rate; fp32 without channels_last, see below), then evaluate (ROC with its patient-bootstrap band, training
# curves, reliability), HESAM and Grad-CAM maps, region scores and the map grid.
#
#   VOIS=/work/shared/data/lidc-vois OUT=figs-work ./examples/readme_figures.sh
#
# A smoke-scale model: its figures show what the figures look like, not the paper's numbers
# (those are in benchmarks/README.md). Every stage keeps its finished output on a re-run.
set -euo pipefail

VOIS=${VOIS:?set VOIS to the folder of NIfTI VOIs with manifest.csv}
OUT=${OUT:-figs-work}
IMG=${IMG:-docs/img}
EPOCHS=${EPOCHS:-2}
NK=${NK:-python -m nodulekit}

mkdir -p "$OUT"
[ -e "$OUT/rois.h5" ] || $NK extract --vois "$VOIS" -o "$OUT/rois.h5" --workers 2 --no-progress
[ -e "$OUT/d11c.h5" ] || $NK build "$OUT/rois.h5" --channels 11 --folds 5 --seed 0 -o "$OUT/d11c.h5" --no-progress
RUN="$OUT/runs/hesam-w4e2"
# --no-channels-last: on the shared CPU the channels_last variant `train` picked aborted twice
# with "free(): invalid next size" (heap corruption inside the process).
$NK train "$OUT/d11c.h5" --arch hesam --model-opt base_width=4 --epochs "$EPOCHS" --lr 5e-3 --lr-step 10 \
    --seed 0 --device cpu --no-channels-last --no-amp --no-progress -o "$RUN" -q
$NK evaluate "$RUN" -o "$OUT/report" --overwrite --format png --dpi 150 -q
for m in hesam gradcam; do
    [ -e "$OUT/maps_$m.h5" ] || $NK maps "$RUN" --method "$m" -d "$OUT/d11c.h5" -o "$OUT/maps_$m.h5" --no-progress -q
done
$NK scores "$OUT/maps_hesam.h5" "$OUT/maps_gradcam.h5" -d "$OUT/d11c.h5" -o "$OUT/scores.csv" --overwrite -q
$NK figures "$OUT/maps_hesam.h5" "$OUT/maps_gradcam.h5" -d "$OUT/d11c.h5" --scores "$OUT/scores.csv" \
    --n 4 --format png --dpi 150 -o "$OUT/figures" --overwrite -q
cp "$OUT/figures/map_grid.png" "$IMG/maps_vois_tiny.png"
cp "$OUT/report/roc.png" "$IMG/roc_vois_tiny.png"
cp "$OUT/report/curves.png" "$IMG/curves_vois_tiny.png"
echo "wrote $IMG/maps_vois_tiny.png $IMG/roc_vois_tiny.png $IMG/curves_vois_tiny.png"
# The model of the README's predict example (examples/predict_warnings_dicom.sh).
[ -e "$OUT/hesam-w4.onnx" ] || $NK export-onnx "$RUN" --ensemble -o "$OUT/hesam-w4.onnx" -q
