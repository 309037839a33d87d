#!/usr/bin/env bash
# Figs. 5-7 and the statistics: CAM / Grad-CAM / SAM / HESAM maps of the same nodules,
# where they put their energy (body / margin band / outside), the figures, the paired
# Wilcoxon tests between runs and the readers-vs-model comparison.
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

# Maps of every nodule from the model of the fold that did not train on it.
$NK maps "$RUNS/cam-$TAG"   --method cam     -o "$OUT/cam.h5"     -d "$D" --overwrite
$NK maps "$RUNS/cam-$TAG"   --method gradcam -o "$OUT/gradcam.h5" -d "$D" --overwrite
$NK maps "$RUNS/sam-$TAG"   --method sam     -o "$OUT/sam.h5"     -d "$D" --overwrite
$NK maps "$RUNS/hesam-$TAG" --method hesam   -o "$OUT/hesam.h5"   -d "$D" --overwrite --per-slice

# Share of map energy on the nodule body, in the margin band (+-2 mm around the
# consensus contour) and outside, per nodule and per method x class.
$NK scores "$OUT/cam.h5" "$OUT/gradcam.h5" "$OUT/sam.h5" "$OUT/hesam.h5" -d "$D" -o "$OUT/scores.csv" --overwrite

# Fig. 7-style grid, Fig. 5-style per-slice grid (from --per-slice), region-score box plots.
$NK figures "$OUT/cam.h5" "$OUT/gradcam.h5" "$OUT/sam.h5" "$OUT/hesam.h5" -d "$D" \
  --scores "$OUT/scores.csv" -o "$OUT/figures" --overwrite

# Paired Wilcoxon signed-rank tests between runs (same nodules, same folds).
RUNDIRS=()
for a in ${WILCOXON_ARCHS:-hesam sam cam resnet18 vgg16}; do
  [ -d "$RUNS/$a-$TAG" ] && RUNDIRS+=("$RUNS/$a-$TAG")
done
$NK wilcoxon "${RUNDIRS[@]}" -o "$OUT/wilcoxon.md" --overwrite

# Each LIDC reader vs the model on the nodules they rated (Table 6 style).
$NK readers "$RUNS/hesam-$TAG" -d "$D" -o "$OUT/readers.md" --overwrite

echo "done: $OUT/scores.md, $OUT/figures/, $OUT/wilcoxon.md, $OUT/readers.md"
