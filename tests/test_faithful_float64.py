"""The faithful map methods on a float64 model (they cast to fp32 and failed there)."""

from __future__ import annotations

import pytest
import torch
from test_faithful_maps import random_model

from nodulekit.map_methods import get_method


@pytest.mark.parametrize("arch,name", [("sam", "sam-faithful"), ("hesam", "hesam-faithful")])
def test_faithful_method_runs_on_a_float64_model(arch, name):
    model = random_model(arch, seed=3, dtype=torch.float64)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, maps = get_method(name).maps(model, x)
        _, offset = model.head.faithful_map(*(model.forward_features(x)[k] for k in ("features", "high_level")))
    assert maps.dtype == torch.float64 and logits.dtype == torch.float64
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + offset, logits, rtol=0, atol=1e-10)
