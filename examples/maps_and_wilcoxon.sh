#!/usr/bin/env bash
# Figs. 5-7 and the statistics: CAM / SAM / HESAM maps (paper and faithful) and the Grad-CAM of
# each of those models on the same nodules, where they put their energy (body / margin band /
# outside), the figures, the paired comparisons between runs and the readers-vs-model table.
#
#   D=table2/d11c.h5 RUNS=table2/runs OUT=maps ./examples/maps_and_wilcoxon.sh
#
# Needs trained RUNDIRs of cam, sam and hesam on the same dataset, named $RUNS/<arch>-$TAG
# (`nodulekit train ... -o runs/hesam-d11c`). The grid (`nodulekit grid`, examples/grid/)
# runs these maps, scores, figures and tests itself, as part of the whole experiment.
set -euo pipefail

D=${D:?set D to the dataset artifact, e.g. table2/d11c.h5}
RUNS=${RUNS:-table2/runs}
OUT=${OUT:-maps}
TAG=${TAG:-d11c}
NK=${NK:-nodulekit}
mkdir -p "$OUT"

# Maps of every nodule from the model of the fold that did not train on it. Each run's
# maps come from that run's own model: its head map (paper Eq. 2 / 7 / 11), the faithful
# SAM/HESAM map (sums to the class score) and its Grad-CAM.
$NK maps "$RUNS/cam-$TAG"   --method cam            -o "$OUT/cam.h5"            -d "$D" --overwrite
$NK maps "$RUNS/cam-$TAG"   --method gradcam        -o "$OUT/cam-gradcam.h5"    -d "$D" --overwrite
$NK maps "$RUNS/sam-$TAG"   --method sam            -o "$OUT/sam.h5"            -d "$D" --overwrite
$NK maps "$RUNS/sam-$TAG"   --method sam-faithful   -o "$OUT/sam-faithful.h5"   -d "$D" --overwrite
$NK maps "$RUNS/sam-$TAG"   --method gradcam        -o "$OUT/sam-gradcam.h5"    -d "$D" --overwrite
$NK maps "$RUNS/hesam-$TAG" --method hesam          -o "$OUT/hesam.h5"          -d "$D" --overwrite --per-slice
$NK maps "$RUNS/hesam-$TAG" --method hesam-faithful -o "$OUT/hesam-faithful.h5" -d "$D" --overwrite
$NK maps "$RUNS/hesam-$TAG" --method gradcam        -o "$OUT/hesam-gradcam.h5"  -d "$D" --overwrite
MAPS=("$OUT/cam.h5" "$OUT/cam-gradcam.h5" "$OUT/sam.h5" "$OUT/sam-faithful.h5" "$OUT/sam-gradcam.h5"
      "$OUT/hesam.h5" "$OUT/hesam-faithful.h5" "$OUT/hesam-gradcam.h5")

# Share of map energy on the nodule body, in the margin band (+-2 mm around the
# consensus contour) and outside, per nodule and per map x class, with patient intervals.
$NK scores "${MAPS[@]}" -d "$D" -o "$OUT/scores.csv" --overwrite

# Fig. 7-style grid, Fig. 5-style per-slice grid (from --per-slice), region-score box plots.
$NK figures "${MAPS[@]}" -d "$D" --scores "$OUT/scores.csv" -o "$OUT/figures" --overwrite

# HESAM against each other run on the same nodules: AUC difference and DeLong's test,
# patient-level error test, the paper's Wilcoxon test; Holm over the comparisons.
RUNDIRS=()
for a in ${WILCOXON_ARCHS:-hesam sam cam resnet18 vgg16}; do
  [ -d "$RUNS/$a-$TAG" ] && RUNDIRS+=("$RUNS/$a-$TAG")
done
$NK wilcoxon "${RUNDIRS[@]}" -o "$OUT/wilcoxon.md" --overwrite

# Each LIDC reader against the other readers' consensus, beside the model on the same nodules (Table 6).
$NK readers "$RUNS/hesam-$TAG" -d "$D" -o "$OUT/readers.md" --overwrite

echo "done: $OUT/scores.md, $OUT/figures/, $OUT/wilcoxon.md, $OUT/readers.md"
