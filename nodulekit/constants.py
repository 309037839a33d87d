"""Facts every stage shares, defined once: the decision rule, class indices, input size, LIDC names.

The decision rule: a nodule is called malignant when its malignant probability is
*strictly greater* than :data:`THRESHOLD` (0.5). With two softmax outputs this is
exactly ``argmax`` of the logits (a tie, p = 0.5, goes to benign, as ``argmax`` returns
the first maximum), so the accuracy training logs and every report agree. The
threshold was fixed before any training and is never tuned on test data. Use
:func:`predict_label` instead of writing the comparison again.
"""

from __future__ import annotations

import numpy as np

# Decision threshold on the malignant probability; see the module docstring for the rule.
THRESHOLD = 0.5
BENIGN = 0
MALIGNANT = 1  # class index of "malignant" in every model's logits and probability columns
CLASS_NAMES = ("benign", "malignant")  # by class index
INPUT_SIZE = 32  # every dataset holds 32x32 patches (paper, Table 1); models take [B, C, 32, 32]
# The eight LIDC characteristics besides malignancy, in pylidc's order.
CHARACTERISTICS: tuple[str, ...] = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
)


def patient_of(nodule_id: str) -> str:
    """The patient of a nodule id: ``"<patient_id>:<cluster index>"`` (or ``":s<scan>.<k>"``)."""
    return str(nodule_id).rsplit(":", 1)[0]


def predict_label(prob):
    """The called class (1 malignant, 0 benign) of malignant probabilities: ``prob > THRESHOLD``.

    Accepts a scalar or an array; returns an int or an int64 array of the same shape.
    """
    called = np.asarray(prob, np.float64) > THRESHOLD
    return int(called) if called.ndim == 0 else called.astype(np.int64)
