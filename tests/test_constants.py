"""The one decision rule: malignant when p > 0.5, exactly argmax of the two softmax outputs."""

from __future__ import annotations

import numpy as np
import torch

from nodulekit.constants import MALIGNANT, predict_label


def test_predict_label_is_the_argmax_of_the_logits_ties_included():
    logits = torch.cat([torch.zeros(3, 2), torch.randn(200, 2, generator=torch.Generator().manual_seed(0))])
    prob = torch.softmax(logits, dim=1)[:, MALIGNANT].numpy()
    assert prob[0] == 0.5  # an exact tie: argmax says benign (the first maximum)
    np.testing.assert_array_equal(predict_label(prob), logits.argmax(1).numpy())
    assert predict_label(0.5) == 0 and predict_label(0.5000001) == 1 and isinstance(predict_label(0.7), int)


def test_predict_label_of_an_array_is_int64_of_the_same_shape():
    called = predict_label(np.array([[0.2, 0.7], [0.5, 0.51]]))
    assert called.dtype == np.int64 and called.tolist() == [[0, 1], [0, 1]]


def test_patient_of_splits_at_the_last_colon():
    from nodulekit.constants import patient_of

    assert patient_of("LIDC-IDRI-0001:3") == "LIDC-IDRI-0001"
    assert patient_of("LIDC-IDRI-0078:s2.10") == "LIDC-IDRI-0078"  # a second scan's cluster
    assert patient_of("site:A:12") == "site:A"  # a patient id that holds a colon itself
    assert patient_of(17) == "17"  # not a string: its text, no colon to split at
