"""The map-method registry: a method defined in one place is usable by name everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_maps import TinyNet, trained_like

import nodulekit.map_methods as mm
from nodulekit import maps as M

torch.set_num_threads(1)


def test_builtin_methods_are_registered_and_the_cli_offers_exactly_them():
    from nodulekit.cli.maps import MapMethodName

    names = mm.method_names()
    # the paper's order; each faithful map follows the map of the same head (Eq. 8 after 7, 12 after 11)
    assert names == ["cam", "gradcam", "sam", "sam-faithful", "hesam", "hesam-faithful", "he-cam", "he-gradcam"]
    assert [m.value for m in MapMethodName] == names
    assert all(mm.get_method(n).description for n in names)


def test_a_new_method_is_one_class_with_its_weights(monkeypatch):
    """A gradient method supplying only its weights (max instead of mean of the gradients):
    the base hooks g, back-propagates each class and combines; compute_maps takes its name."""
    monkeypatch.setattr(mm, "_METHODS", dict(mm.map_methods()))

    @mm.register_map_method
    class GradMax(mm.MapMethod):
        name = "grad-max"
        description = "example: ReLU(sum_k max_xy(d y^c / d g_k) g_k)"
        needs_gradients = True

        def weights(self, g, grad):
            return grad.amax(dim=(2, 3))

    torch.manual_seed(0)
    model = trained_like(TinyNet(head=None))
    assert "grad-max" in mm.method_names() and "grad-max" in M.supported_methods(model)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    out = M.compute_maps(model, x, "grad-max", device="cpu")
    for i in range(3):  # reference: one image at a time through the model's own pieces
        xi = torch.from_numpy(x[i : i + 1])
        g = model.body(model.conv1(xi)).detach().requires_grad_(True)
        for c in (0, 1):
            (grad,) = torch.autograd.grad(model.fc(g.flatten(1))[0, c], g)
            ref = torch.relu((grad.amax(dim=(2, 3))[0, :, None, None] * g[0]).sum(0)).detach().numpy()
            np.testing.assert_allclose(out["maps"][i, c], ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="registered twice"):

        @mm.register_map_method
        class Clash(mm.MapMethod):
            name = "grad-max"
